"""Tiny seeded Hugging Face models of every family beside Llama, built by transformers from
small random configs (nothing downloaded)."""

from typing import Callable

import pytest
import torch

SLIDING_WINDOW = 8  # shorter than the test sequences, so the window changes the result

_COMMON = dict(
    vocab_size=160,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
)

FAMILY_CONFIGS = {
    # name: (transformers classes, config overrides)
    "mistral": ("Mistral", dict(rope_theta=1_000_000.0, sliding_window=None, rms_norm_eps=1e-5)),
    "mistral_sliding": ("Mistral", dict(sliding_window=SLIDING_WINDOW)),
    "qwen2": ("Qwen2", dict(rope_theta=1_000_000.0, tie_word_embeddings=True)),
    "qwen2_untied": ("Qwen2", dict(tie_word_embeddings=False, num_key_value_heads=1)),
    "qwen3": ("Qwen3", dict(head_dim=32, rope_theta=1_000_000.0, tie_word_embeddings=True)),
    "qwen3_untied": ("Qwen3", dict(head_dim=16, tie_word_embeddings=False)),
    "gemma3": (
        "Gemma3",
        dict(
            head_dim=32,
            query_pre_attn_scalar=24,
            sliding_window=SLIDING_WINDOW,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            },
            pad_token_id=0,
        ),
    ),
}
FAMILIES = tuple(FAMILY_CONFIGS)


def hf_classes(prefix: str):
    import transformers

    if prefix == "Gemma3":
        return transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM
    return getattr(transformers, f"{prefix}Config"), getattr(transformers, f"{prefix}ForCausalLM")


def build_family_model(name: str, seed: int = 0, **overrides):
    """An eval-mode transformers model of config `name` with random fp32 weights, norms and biases
    included (transformers starts norms at one, biases at zero)."""
    prefix, values = FAMILY_CONFIGS[name]
    config_class, model_class = hf_classes(prefix)
    torch.manual_seed(seed)
    model = model_class(config_class(**{**_COMMON, **values, **overrides})).eval()
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param_name.endswith("norm.weight"):
                param.uniform_(-0.5, 0.5) if prefix == "Gemma3" else param.uniform_(0.5, 1.5)
            elif param_name.endswith(".bias"):
                param.normal_(0.0, 0.5)
    return model


@pytest.fixture
def make_family_model() -> Callable:
    """make_family_model(name, seed=0, **config overrides) -> see build_family_model."""
    return build_family_model
