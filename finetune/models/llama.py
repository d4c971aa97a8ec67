"""Published Llama 2 / 3 / 3.1 / 3.2 architectures, plus `tiny` for tests and the CPU demo; the
registry of every named model (the other families' shapes are in families.py)."""

from finetune.models.args import ModelArgs, RopeScaling
from finetune.models.families import DEFINITIONS as FAMILY_DEFINITIONS

_LLAMA2 = dict(vocab_size=32_000, norm_eps=1e-5, rope_theta=10_000.0, max_seq_len=4096, family="llama2")
_LLAMA3 = dict(vocab_size=128_256, norm_eps=1e-5, rope_theta=500_000.0, max_seq_len=8192, family="llama3")
_LLAMA3_1 = dict(_LLAMA3, max_seq_len=131_072, rope_scaling=RopeScaling(factor=8.0))
_LLAMA3_2 = dict(_LLAMA3, max_seq_len=131_072, rope_scaling=RopeScaling(factor=32.0), tie_embeddings=True)


def _arch(dim: int, n_layers: int, n_heads: int, n_kv_heads: int, hidden_dim: int) -> dict:
    return dict(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, hidden_dim=hidden_dim)


_DEFINITIONS: dict[str, dict] = {
    "llama2_7b": dict(_LLAMA2, **_arch(4096, 32, 32, 32, 11_008)),
    "llama2_13b": dict(_LLAMA2, **_arch(5120, 40, 40, 40, 13_824)),
    "llama2_70b": dict(_LLAMA2, **_arch(8192, 80, 64, 8, 28_672)),
    "llama3_8b": dict(_LLAMA3, **_arch(4096, 32, 32, 8, 14_336)),
    "llama3_70b": dict(_LLAMA3, **_arch(8192, 80, 64, 8, 28_672)),
    "llama3_1_8b": dict(_LLAMA3_1, **_arch(4096, 32, 32, 8, 14_336)),
    "llama3_1_70b": dict(_LLAMA3_1, **_arch(8192, 80, 64, 8, 28_672)),
    "llama3_1_405b": dict(_LLAMA3_1, **_arch(16_384, 126, 128, 8, 53_248)),
    "llama3_2_1b": dict(_LLAMA3_2, **_arch(2048, 16, 32, 8, 8192)),
    "llama3_2_3b": dict(_LLAMA3_2, **_arch(3072, 28, 24, 8, 8192)),
    "tiny": dict(
        vocab_size=512,
        dim=256,
        n_layers=4,
        n_heads=8,
        n_kv_heads=4,
        hidden_dim=768,
        norm_eps=1e-5,
        rope_theta=10_000.0,
        max_seq_len=512,
        family="llama2",
        tie_embeddings=False,
    ),
    **FAMILY_DEFINITIONS,
}

MODEL_NAMES: tuple[str, ...] = tuple(_DEFINITIONS)


def published_args(name: str) -> ModelArgs:
    """A fresh ModelArgs for a known name (KeyError otherwise)."""
    values = dict(_DEFINITIONS[name])
    scaling = values.get("rope_scaling")
    if scaling is not None:
        values["rope_scaling"] = RopeScaling(**vars(scaling))
    if values.get("layer_types") is not None:
        values["layer_types"] = list(values["layer_types"])
    return ModelArgs(**values)
