"""Tiny seeded Hugging Face Llama models for interop tests."""

from typing import Callable

import pytest
import torch

HF_VARIANTS = {
    # name: LlamaConfig overrides on top of the common tiny shape
    "llama2": dict(num_attention_heads=4, num_key_value_heads=4, rope_theta=10_000.0),
    "llama3_scaled": dict(
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=500_000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    "tied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=500_000.0),
    "mqa": dict(num_attention_heads=4, num_key_value_heads=1),
}


@pytest.fixture
def make_hf_model() -> Callable:
    """make_hf_model(variant, seed=0) -> an eval-mode LlamaForCausalLM with random fp32 weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def make(variant: str = "llama2", seed: int = 0, **overrides):
        torch.manual_seed(seed)
        values = dict(
            vocab_size=160,
            hidden_size=64,
            intermediate_size=112,
            num_hidden_layers=2,
            max_position_embeddings=256,
            rms_norm_eps=1e-5,
            bos_token_id=1,
            eos_token_id=2,
        )
        values.update(HF_VARIANTS[variant])
        values.update(overrides)
        model = LlamaForCausalLM(LlamaConfig(**values)).eval()
        # HF initialises norms to ones; random norms make the parity check see them.
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.uniform_(0.5, 1.5)
        return model

    return make
