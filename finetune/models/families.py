"""Published Mistral, Qwen 2.5, Qwen 3 and Gemma 3 (text) architectures, as `ModelArgs` values.

Each family is Llama's blocks with its switches set; the shapes are those of the released
checkpoints' config.json files.
"""

from finetune.models.args import FULL_ATTENTION, SLIDING_ATTENTION, RopeScaling


def _arch(dim: int, n_layers: int, n_heads: int, n_kv_heads: int, hidden_dim: int, **more) -> dict:
    return dict(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, hidden_dim=hidden_dim, **more)


def gemma3_layer_types(n_layers: int, every: int = 6) -> list[str]:
    """Gemma 3's interleaving: five sliding-window layers, then one global, repeated."""
    return [FULL_ATTENTION if (i + 1) % every == 0 else SLIDING_ATTENTION for i in range(n_layers)]


_MISTRAL = dict(vocab_size=32_768, norm_eps=1e-5, rope_theta=1_000_000.0, max_seq_len=32_768, family="mistral")
_QWEN2_5 = dict(
    vocab_size=151_936, norm_eps=1e-6, rope_theta=1_000_000.0, max_seq_len=32_768, family="qwen2", qkv_bias=True
)
_QWEN2_5_LARGE = dict(_QWEN2_5, vocab_size=152_064)
_QWEN3 = dict(
    vocab_size=151_936,
    norm_eps=1e-6,
    rope_theta=1_000_000.0,
    max_seq_len=40_960,
    family="qwen3",
    attn_head_dim=128,
    qk_norm=True,
)
_GEMMA3 = dict(
    vocab_size=262_208,
    norm_eps=1e-6,
    rope_theta=1_000_000.0,
    local_rope_theta=10_000.0,
    rope_scaling=RopeScaling(factor=8.0, kind="linear"),
    max_seq_len=131_072,
    family="gemma3",
    tie_embeddings=True,
    attn_head_dim=256,
    query_pre_attn_scalar=256.0,
    qk_norm=True,
    norm_plus_one=True,
    sandwich_norms=True,
    mlp_activation="gelu_tanh",
    scale_embeddings=True,
    sliding_window=1024,
)


def _gemma3(dim: int, n_layers: int, n_heads: int, n_kv_heads: int, hidden_dim: int, **more) -> dict:
    shape = _arch(dim, n_layers, n_heads, n_kv_heads, hidden_dim, layer_types=gemma3_layer_types(n_layers))
    return dict(_GEMMA3, **shape, **more)


DEFINITIONS: dict[str, dict] = {
    "mistral_7b_v0_3": dict(_MISTRAL, **_arch(4096, 32, 32, 8, 14_336)),
    "qwen2_5_0_5b": dict(_QWEN2_5, tie_embeddings=True, **_arch(896, 24, 14, 2, 4864)),
    "qwen2_5_1_5b": dict(_QWEN2_5, tie_embeddings=True, **_arch(1536, 28, 12, 2, 8960)),
    "qwen2_5_3b": dict(_QWEN2_5, tie_embeddings=True, **_arch(2048, 36, 16, 2, 11_008)),
    "qwen2_5_7b": dict(_QWEN2_5_LARGE, **_arch(3584, 28, 28, 4, 18_944)),
    "qwen2_5_14b": dict(_QWEN2_5_LARGE, **_arch(5120, 48, 40, 8, 13_824)),
    "qwen2_5_32b": dict(_QWEN2_5_LARGE, **_arch(5120, 64, 40, 8, 27_648)),
    "qwen2_5_72b": dict(_QWEN2_5_LARGE, **_arch(8192, 80, 64, 8, 29_568)),
    "qwen3_0_6b": dict(_QWEN3, tie_embeddings=True, **_arch(1024, 28, 16, 8, 3072)),
    "qwen3_1_7b": dict(_QWEN3, tie_embeddings=True, **_arch(2048, 28, 16, 8, 6144)),
    "qwen3_4b": dict(_QWEN3, tie_embeddings=True, **_arch(2560, 36, 32, 8, 9728)),
    "qwen3_8b": dict(_QWEN3, **_arch(4096, 36, 32, 8, 12_288)),
    "qwen3_14b": dict(_QWEN3, **_arch(5120, 40, 40, 8, 17_408)),
    "qwen3_32b": dict(_QWEN3, **_arch(5120, 64, 64, 8, 25_600)),
    "gemma3_1b": _gemma3(
        1152, 26, 4, 1, 6912, vocab_size=262_144, sliding_window=512, rope_scaling=None, max_seq_len=32_768
    ),
    "gemma3_4b": _gemma3(2560, 34, 8, 4, 10_240),
    "gemma3_12b": _gemma3(3840, 48, 16, 8, 15_360),
    "gemma3_27b": _gemma3(5376, 62, 32, 16, 21_504, attn_head_dim=128, query_pre_attn_scalar=168.0),
}
