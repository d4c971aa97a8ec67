"""The numbers that define a Llama-family architecture (`ModelArgs`)."""

from dataclasses import asdict, dataclass
from typing import Any, Optional

from finetune.errors import UserError

FAMILIES = ("llama2", "llama3")


@dataclass
class RopeScaling:
    """Llama 3.1 rotary frequency scaling: long wavelengths are stretched by `factor`,
    short ones kept, and the band between is interpolated smoothly."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass
class ModelArgs:
    """Architecture of a Llama-family decoder. `head_dim` is derived from `dim / n_heads`.

    `family` picks the tokenizer family: "llama2" (SentencePiece) or "llama3" (tiktoken).
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

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise UserError(f"model argument {name}={value!r} must be a positive integer")
        if self.dim % self.n_heads != 0:
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

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

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
