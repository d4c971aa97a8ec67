"""Optimizers by name, and gradient-norm clipping that works on FSDP2 (DTensor) parameters.

- adamw / adam: torch's implementations; `fused=True` on CUDA and CPU (one pass per tensor,
  all parameters in one call; on CPU ~6x faster than foreach for AdamW), `foreach=True`
  elsewhere. `adam` applies weight decay as L2 on the gradient, `adamw` decoupled, as in torch.
- sgd: momentum 0.9 (no Nesterov), weight decay as L2; a plain, memory-light baseline.
- adamw8bit / adamw4bit: torchao's AdamW with blockwise-quantised moments (~4x / ~8x less
  optimizer memory than fp32 state), reached through `finetune.ao`.

Optimizer state has the parameters' dtype (see `finetune.training.precision`).
"""

from typing import Iterable

import torch
from torch.distributed.tensor import DTensor

from finetune import ao
from finetune.errors import UserError

OPTIMIZERS = ("adamw", "adam", "sgd", "adamw8bit", "adamw4bit")
SGD_MOMENTUM = 0.9


def build_optimizer(
    name: str, params: Iterable, *, lr: float, weight_decay: float, device: torch.device
) -> torch.optim.Optimizer:
    """Build optimizer `name` over `params` (tensors or param-group dicts)."""
    fused = device.type in ("cuda", "cpu")
    impl = {"fused": True} if fused else {"foreach": True}
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **impl)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, **impl)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=SGD_MOMENTUM, weight_decay=weight_decay, **impl)
    if name == "adamw8bit":
        return ao.low_bit_adamw(8, params, lr=lr, weight_decay=weight_decay)
    if name == "adamw4bit":
        return ao.low_bit_adamw(4, params, lr=lr, weight_decay=weight_decay)
    raise UserError(f"unknown optimizer {name!r}; use one of: {', '.join(OPTIMIZERS)}")


def clip_grad_norm(parameters: Iterable[torch.Tensor], max_norm: float) -> float:
    """Scale gradients so their global L2 norm is at most `max_norm`; return the norm before.

    With FSDP2 the norm comes back as a DTensor (each rank holds part of the sum); the
    all-reduce to the full value is collective, so every rank must call this.
    Pass `max_norm=float("inf")` to only measure.
    """
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return norm.item()
