"""Guards that stop a run with a message a person can act on: a non-finite loss, out of memory,
and Ctrl-C, which stops at a step boundary so the checkpoint it leaves resumes exactly."""

from __future__ import annotations

import math
import signal
import threading
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Optional

import torch
import torch.distributed as dist

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


class StopAtStepBoundary:
    """While active, SIGINT (Ctrl-C, or torchrun passing one on) asks the run to stop after
    the step in progress instead of interrupting it.

    An interrupt inside a step would save weights, data position and RNG state from different
    moments (dropout masks already drawn, an optimizer step half-counted), and the resumed run
    would drift from an uninterrupted one. Every rank must stop after the same step, so the
    request is agreed with one tiny all-reduce per step. Off the main thread (where signal
    handlers cannot be set) Ctrl-C keeps Python's default behaviour.
    """

    def __init__(self, device: torch.device, log: Any = None) -> None:
        self.requested = False
        self._device = device
        self._log = log
        self._previous: Any = None

    def __enter__(self) -> "StopAtStepBoundary":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._request)
        return self

    def __exit__(self, kind: Optional[type], error: Optional[BaseException], trace: Optional[TracebackType]) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _request(self, signum: int, frame: Optional[FrameType]) -> None:
        if not self.requested and self._log is not None:
            self._log("interrupt: stopping after this step and saving a checkpoint (kill the process to stop at once)")
        self.requested = True

    def agreed(self) -> bool:
        """Whether any rank was asked to stop; call once per step on every rank."""
        if not (dist.is_available() and dist.is_initialized()):
            return self.requested
        flag = torch.tensor([float(self.requested)], device=self._device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
