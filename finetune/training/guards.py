"""Guards that stop a run with a message a person can act on: a non-finite loss, out of memory."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch

from finetune.errors import UserError

MEMORY_KNOBS = (
    "lower batch_size (raise gradient_accumulation_steps to keep the effective batch) or max_seq_len, "
    "set enable_activation_checkpointing=true, enable_activation_offloading=true, dtype=bf16, "
    "optimizer=adamw8bit, or with several GPUs cpu_offload=true"
)


def check_finite_loss(loss: float, step: int, last_checkpoint: Optional[Path]) -> None:
    """Raise before the optimizer step, so a NaN never reaches the weights or a checkpoint."""
    if math.isfinite(loss):
        return
    kept = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was saved yet"
    raise UserError(
        f"loss is {loss} at step {step}; stopped before updating the weights ({kept}); "
        "lower lr, set clip_grad_norm, or use dtype=fp32"
    )


def out_of_memory_error(step: int, device: torch.device) -> UserError:
    where = f"step {step + 1}" if step else "the first step"
    return UserError(f"out of memory on {device} at {where}; to use less memory: {MEMORY_KNOBS}")
