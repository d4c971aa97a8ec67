"""Guards that stop a run with a message a person can act on: a non-finite loss, out of memory,
and Ctrl-C or SIGTERM, which stop at a step boundary so the checkpoint they leave resumes exactly."""

from __future__ import annotations

import math
import signal
import threading
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Callable, Optional

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


class Preempted(BaseException):
    """SIGTERM, what Slurm and Kubernetes send before they preempt a job, stopped the run.

    Like KeyboardInterrupt for Ctrl-C it is a BaseException, so no `except Exception` on the
    way out mistakes it for a failure. A run stopped by it exits with PREEMPTED_EXIT_STATUS.
    """


# The shell's convention, 128 + the signal's number: what the process would report had the
# signal killed it, so a scheduler reads the same status either way.
STOPPED_EXIT_STATUS = 128 + signal.SIGINT  # 130: Ctrl-C
PREEMPTED_EXIT_STATUS = 128 + signal.SIGTERM  # 143: SIGTERM

# Which stop wins when ranks were asked differently: a preemption is coming whatever a person asked.
_STOP_CODES = {signal.SIGINT: 1, signal.SIGTERM: 2}


def stop_exception(signum: int) -> BaseException:
    """What a stop asked for by `signum` raises: KeyboardInterrupt for SIGINT, Preempted for SIGTERM."""
    return Preempted() if signum == signal.SIGTERM else KeyboardInterrupt()


class _SigtermSeen:
    """Whether SIGTERM already asked this process to stop: handlers are per process, so is this.
    A plain attribute, not an Event, since a handler must never wait for a lock its own thread holds."""

    value = False


def preempt_on_sigterm() -> Callable[[], None]:
    """Make SIGTERM raise Preempted, as Ctrl-C raises KeyboardInterrupt; returns the undo.

    Only the first SIGTERM raises (or is deferred by StopAtStepBoundary in the training loop);
    later ones are ignored so they cannot cut short the way out (the checkpoint, the job status,
    the cleanup): under Slurm every process gets SIGTERM and torchrun then passes the launcher's
    on to the workers, so a worker often gets two. Off the main thread, where handlers cannot
    be set, nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    _SigtermSeen.value = False

    def raise_once(signum: int, frame: Optional[FrameType]) -> None:
        if not _SigtermSeen.value:
            _SigtermSeen.value = True
            raise Preempted()

    previous = signal.signal(signal.SIGTERM, raise_once)

    def restore() -> None:
        signal.signal(signal.SIGTERM, previous)

    return restore


class StopAtStepBoundary:
    """While active, SIGINT (Ctrl-C, or torchrun passing one on) and SIGTERM (a scheduler about
    to preempt the job) ask the run to stop after the step in progress instead of interrupting it.

    An interrupt inside a step would save weights, data position and RNG state from different
    moments (dropout masks already drawn, an optimizer step half-counted), and the resumed run
    would drift from an uninterrupted one. Every rank must stop after the same step, so the
    request is agreed with one tiny all-reduce per step; the agreed request also says which
    signal asked (SIGTERM when any rank got one), so every rank records the same reason. Off the
    main thread (where signal handlers cannot be set) both signals keep their behaviour outside.
    """

    def __init__(self, device: torch.device, log: Any = None) -> None:
        self.requested: Optional[int] = None  # the signal that asked, SIGTERM over SIGINT
        self._device = device
        self._log = log
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopAtStepBoundary":
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._request) for signum in _STOP_CODES}
        return self

    def __exit__(self, kind: Optional[type], error: Optional[BaseException], trace: Optional[TracebackType]) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)

    def _request(self, signum: int, frame: Optional[FrameType]) -> None:
        if signum == signal.SIGTERM:
            _SigtermSeen.value = True  # a second one on the way out is ignored (preempt_on_sigterm)
        if self.requested is None and self._log is not None:
            reason = "SIGTERM (preemption)" if signum == signal.SIGTERM else "interrupt"
            self._log(f"{reason}: stopping after this step and saving a checkpoint (kill the process to stop at once)")
        if self.requested is None or _STOP_CODES[signum] > _STOP_CODES[self.requested]:
            self.requested = signum

    def agreed(self) -> Optional[int]:
        """The signal any rank was asked to stop by (SIGTERM first), or None; call once per step on every rank."""
        code = 0 if self.requested is None else _STOP_CODES[self.requested]
        if dist.is_available() and dist.is_initialized():
            flag = torch.tensor([float(code)], device=self._device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            code = int(flag.item())
        return next((signum for signum, c in _STOP_CODES.items() if c == code), None)
