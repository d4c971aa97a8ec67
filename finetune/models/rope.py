"""Rotary position embeddings in the "rotate_half" layout used by Hugging Face checkpoints.

Each head's vector is split into a first and a second half; frequency i rotates the pair
(x[i], x[i + head_dim/2]). Meta checkpoints pair neighbours instead, so only the Meta
loader/saver permutes q/k weights; Hugging Face weights and PEFT adapters map unchanged.
"""

import math
from typing import Optional

import torch
from torch import nn

from finetune.models.args import RopeScaling


def rope_inverse_frequencies(
    head_dim: int, theta: float, scaling: Optional[RopeScaling] = None, device: Optional[torch.device] = None
) -> torch.Tensor:
    """inv_freq[i] = theta^(-2i/head_dim), with Llama 3.1 or linear scaling applied when given."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling is not None and scaling.kind == "linear":
        return inv_freq / scaling.factor
    if scaling is not None:
        inv_freq = _apply_llama3_scaling(inv_freq, scaling)
    return inv_freq


def _apply_llama3_scaling(inv_freq: torch.Tensor, scaling: RopeScaling) -> torch.Tensor:
    old_context = scaling.original_max_position_embeddings
    low_freq_wavelen = old_context / scaling.low_freq_factor
    high_freq_wavelen = old_context / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths (low frequencies) are slowed down by `factor`; short ones are kept.
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_context / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    in_between = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(in_between, blended, scaled)


class RotaryEmbedding(nn.Module):
    """Turns position ids into the (cos, sin) tables that `apply_rotary` consumes.

    `inv_freq` is a non-persistent buffer: it never appears in checkpoints, and after a
    meta-device build it must be recomputed with `reset_parameters()` once on a real device.
    """

    def __init__(self, head_dim: int, theta: float, scaling: Optional[RopeScaling] = None) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.scaling = scaling
        self.register_buffer("inv_freq", torch.empty(head_dim // 2), persistent=False)
        self.reset_parameters()

    def reset_parameters(self, device: Optional[torch.device] = None) -> None:
        device = device if device is not None else self.inv_freq.device
        if torch.device(device).type == "meta":
            self.inv_freq = torch.empty(self.head_dim // 2, device="meta")
            return
        # Computed on CPU in fp32 so every device sees the same frequencies.
        inv_freq = rope_inverse_frequencies(self.head_dim, self.theta, self.scaling)
        self.inv_freq = inv_freq.to(device)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [b, s] -> cos, sin each [b, 1, s, head_dim] in `dtype` (angles in fp32)."""
        angles = position_ids[..., None].float() * self.inv_freq.float()
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [b, heads, s, head_dim] by the angles behind cos/sin [b, 1, s, head_dim]."""
    return x * cos + _rotate_half(x) * sin
