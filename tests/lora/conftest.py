"""Fixtures for the LoRA tests: token batches, a seeded transformers Llama on disk, adapter randomising."""

from pathlib import Path
from typing import Callable

import pytest
import torch

TINY = dict(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, max_seq_len=64)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls gain nothing from threads, and on a shared, busy CPU two OpenMP threads waiting
    on each other made these tests up to 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(7))


@pytest.fixture
def hf_checkpoint(tmp_path: Path) -> Callable:
    """hf_checkpoint(seed=0, **config) -> (eval-mode LlamaForCausalLM, directory it was saved to)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def make(seed: int = 0, **overrides):
        torch.manual_seed(seed)
        values = dict(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            rms_norm_eps=1e-5,
            rope_theta=10_000.0,
            tie_word_embeddings=False,
        )
        values.update(overrides)
        model = LlamaForCausalLM(LlamaConfig(**values)).eval()
        directory = tmp_path / f"base_{seed}"
        model.save_pretrained(directory)
        return model, directory

    return make


def randomize_adapters(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-zero B (and DoRA magnitudes away from ||W||) so parity tests exercise the adapter math."""
    from finetune.models.lora import lora_modules

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in lora_modules(model).values():
            b = module.lora_b.weight
            b.copy_(torch.randn(b.shape, generator=generator) * 0.05)
            if module.magnitude is not None:
                scale = torch.empty(module.magnitude.shape).uniform_(0.5, 1.5, generator=generator)
                module.magnitude.mul_(scale)
