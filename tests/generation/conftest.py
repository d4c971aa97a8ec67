"""Tiny random Llama 2- and Llama 3-style decoders for the generation tests."""

import pytest
import torch

from finetune.models import ModelArgs, RopeScaling, TransformerDecoder, build_model

# One intra-op thread: the tensors are tiny and the CPUs are shared.
torch.set_num_threads(1)

ARCHS = {
    "llama2": dict(n_heads=4, n_kv_heads=4, rope_theta=10_000.0),
    # Grouped-query attention and Llama 3.1 rope scaling, with a short original context so the
    # scaled band is reached within the test's positions.
    "llama3": dict(
        n_heads=4,
        n_kv_heads=2,
        rope_theta=500_000.0,
        family="llama3",
        rope_scaling=RopeScaling(factor=8.0, original_max_position_embeddings=16),
    ),
}


def tiny_model(
    arch: str = "llama2", *, vocab_size: int = 96, max_seq_len: int = 128, seed: int = 0
) -> TransformerDecoder:
    """A random fp32 decoder in eval mode. Weights are drawn larger than the training init so
    attention is sharp and greedy text varies, which makes masking mistakes visible."""
    args = ModelArgs(vocab_size=vocab_size, dim=64, n_layers=2, hidden_dim=128, max_seq_len=max_seq_len, **ARCHS[arch])
    torch.manual_seed(seed)
    model = build_model(args)
    model.reset_parameters(std=0.15)
    return model.eval()


@pytest.fixture(params=sorted(ARCHS))
def model(request) -> TransformerDecoder:
    return tiny_model(request.param)
