"""The numbers that define a decoder architecture (`ModelArgs`): Llama and the families that
share its blocks (Mistral, Qwen 2.5, Qwen 3, Gemma 3) with a few named switches."""

from dataclasses import asdict, dataclass
from typing import Any, Optional

from finetune.errors import UserError

FAMILIES = ("llama2", "llama3", "mistral", "qwen2", "qwen3", "gemma3")
MLP_ACTIVATIONS = ("silu", "gelu_tanh")
ROPE_SCALINGS = ("llama3", "linear")
FULL_ATTENTION, SLIDING_ATTENTION = "full_attention", "sliding_attention"


@dataclass
class RopeScaling:
    """Rotary frequency scaling. "llama3" (Llama 3.1): long wavelengths are stretched by
    `factor`, short ones kept, and the band between is interpolated smoothly. "linear" (Gemma 3's
    global layers): every frequency divided by `factor`; the other fields are unused."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    kind: str = "llama3"


@dataclass
class ModelArgs:
    """Architecture of a decoder. `head_dim` is `dim / n_heads` unless `attn_head_dim` says otherwise.

    `family` names the checkpoint family, which picks the tokenizer, the chat format and the
    config.json written out: "llama2" (SentencePiece), "llama3" (tiktoken), "mistral", "qwen2"
    (Qwen 2 / 2.5), "qwen3" or "gemma3". The fields after `family` switch on what a family's
    blocks do differently from Llama's; their defaults are Llama.
    """

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    hidden_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    family: str = "llama2"
    attn_head_dim: Optional[int] = None  # per-head width when it is not dim / n_heads (Qwen 3, Gemma 3)
    qkv_bias: bool = False  # biases on the q, k and v projections (Qwen 2.5)
    qk_norm: bool = False  # an RMSNorm over each query and key head before rotary (Qwen 3, Gemma 3)
    norm_plus_one: bool = False  # RMSNorm scales by (1 + w), its weights stored as offsets from one (Gemma)
    sandwich_norms: bool = False  # attention and MLP outputs normed again before the residual add (Gemma 3)
    mlp_activation: str = "silu"  # the gate's activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU, Gemma)
    scale_embeddings: bool = False  # embeddings multiplied by sqrt(dim) (Gemma)
    query_pre_attn_scalar: Optional[float] = None  # attention scores scaled by its -1/2 power, not head_dim's
    sliding_window: Optional[int] = None  # how far back a sliding-attention layer sees (itself included)
    layer_types: Optional[list[str]] = None  # per layer "full_attention" or "sliding_attention"; None: all full
    local_rope_theta: Optional[float] = None  # rotary base of the sliding layers, unscaled (Gemma 3)

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        if self.layer_types is not None:
            self.layer_types = list(self.layer_types)
        if self.attn_head_dim is not None and self.attn_head_dim * self.n_heads == self.dim:
            self.attn_head_dim = None  # one spelling per architecture, so equal shapes compare equal
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise UserError(f"model argument {name}={value!r} must be a positive integer")
        if self.attn_head_dim is None and self.dim % self.n_heads != 0:
            raise UserError(
                f"model argument dim={self.dim} is not divisible by n_heads={self.n_heads}; "
                "pick a dim that is a multiple of n_heads"
            )
        if self.n_heads % self.n_kv_heads != 0:
            raise UserError(
                f"model argument n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}; "
                "grouped-query attention needs n_heads divisible by n_kv_heads"
            )
        if self.head_dim % 2 != 0:
            raise UserError(f"head_dim={self.head_dim} (dim / n_heads) must be even for rotary embeddings")
        if self.family not in FAMILIES:
            raise UserError(f"model argument family={self.family!r} is unknown; use one of {', '.join(FAMILIES)}")
        self._check_variant()

    def _check_variant(self) -> None:
        if self.mlp_activation not in MLP_ACTIVATIONS:
            raise UserError(
                f"model argument mlp_activation={self.mlp_activation!r} is unknown; "
                f"use one of {', '.join(MLP_ACTIVATIONS)}"
            )
        if self.rope_scaling is not None and self.rope_scaling.kind not in ROPE_SCALINGS:
            raise UserError(
                f"rope scaling kind {self.rope_scaling.kind!r} is unknown; use one of {', '.join(ROPE_SCALINGS)}"
            )
        if self.layer_types is None:
            return
        if len(self.layer_types) != self.n_layers:
            raise UserError(
                f"model argument layer_types has {len(self.layer_types)} entries for n_layers={self.n_layers}; "
                "give one per layer"
            )
        unknown = sorted(set(self.layer_types) - {FULL_ATTENTION, SLIDING_ATTENTION})
        if unknown:
            raise UserError(
                f"model argument layer_types has unknown kind(s) {', '.join(unknown)}; "
                f"use {FULL_ATTENTION} or {SLIDING_ATTENTION}"
            )
        if SLIDING_ATTENTION in self.layer_types and not (
            isinstance(self.sliding_window, int) and self.sliding_window > 0
        ):
            raise UserError("sliding_attention layers need a positive sliding_window")

    @property
    def head_dim(self) -> int:
        return self.attn_head_dim if self.attn_head_dim is not None else self.dim // self.n_heads

    def is_sliding(self, layer: int) -> bool:
        """Whether layer `layer` attends only to the last `sliding_window` positions."""
        return self.layer_types is not None and self.layer_types[layer] == SLIDING_ATTENTION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelArgs":
        """Inverse of `to_dict` (a nested `rope_scaling` dict becomes a `RopeScaling`)."""
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"unknown model argument(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**values)


def meta_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float]) -> int:
    """SwiGLU width the way Meta's reference code derives it from params.json."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


# (multiple_of, ffn_dim_multiplier) pairs used by published Meta checkpoints, tried first so a
# saved params.json looks like the original.
_PUBLISHED_FFN_PARAMS = (
    (256, None),
    (4096, 1.3),
    (1024, 1.3),
    (4096, 1.2),
    (256, 1.5),
    (256, 1.0),
    (1024, None),
    (1, None),
)


def meta_ffn_params(dim: int, hidden_dim: int) -> tuple[int, Optional[float]]:
    """(multiple_of, ffn_dim_multiplier) for which `meta_hidden_dim` gives back `hidden_dim`."""
    for multiple_of, multiplier in _PUBLISHED_FFN_PARAMS:
        if meta_hidden_dim(dim, multiple_of, multiplier) == hidden_dim:
            return multiple_of, multiplier
    # Any width is reachable with multiple_of=1 and a multiplier just above the target ratio:
    # int() then truncates to hidden_dim exactly.
    base = int(2 * (4 * dim) / 3)
    for nudge in (0.0, 0.25, 0.5):
        multiplier = (hidden_dim + nudge) / base
        if meta_hidden_dim(dim, 1, multiplier) == hidden_dim:
            return 1, multiplier
    raise ValueError(f"no Meta ffn parameters reproduce hidden_dim={hidden_dim} for dim={dim}")


def infer_family(vocab_size: int) -> str:
    """Llama 3 moved to a 128k-entry tiktoken vocabulary; Llama 2 uses a 32k SentencePiece one."""
    return "llama3" if vocab_size >= 100_000 else "llama2"
