"""Process-group setup from torchrun's environment, the few collectives recipes need, and a
watch that ends a worker whose launcher died.

A run launched without torchrun (no WORLD_SIZE in the environment, or WORLD_SIZE=1) is a
plain single process: every helper here then does nothing, so recipes call them unconditionally.
"""

import os
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from finetune.errors import UserError

T = TypeVar("T")

# What a config's `device` may say; "auto" is cuda when a GPU is there (see resolve_device).
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    is_distributed: bool


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(
            f"environment variable {name}={value!r} is not an integer; launch with torchrun or unset it"
        ) from None


def init_distributed(device_kind: str, *, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group described by torchrun's env vars (gloo on CPU, nccl on CUDA)."""
    world_size = _env_int("WORLD_SIZE", 1)
    _env_int("RANK", 0)  # a malformed RANK fails here with a clear message, before any collective
    local_rank = _env_int("LOCAL_RANK", 0)
    if world_size <= 1:
        return DistInfo(rank=0, world_size=1, local_rank=0, is_distributed=False)
    exit_with_launcher()  # before joining: a launcher gone already would leave the join waiting
    if not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        if backend == "nccl":
            # Bind the device first so NCCL's communicator lands on this rank's GPU.
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return DistInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        is_distributed=True,
    )


# The process that started this one, read when this module is first imported (as early as a
# worker gets to it): under torchrun, the launcher's agent. The watch compares against it rather
# than reading it when the watch starts, so a launcher that died in between is noticed too.
_LAUNCHER_PID = os.getppid()
_launcher_death_hooks: list[Callable[[str], None]] = []
_watching_launcher = False
LAUNCHER_GONE_EXIT_STATUS = 1


def exit_with_launcher(interval_s: float = 0.5) -> None:
    """Under torchrun, end this worker within a second of its launcher's death.

    The launcher stops its workers when it exits on its own or on a signal it handles; killed
    with SIGKILL (or by the OOM killer) it cannot, and its workers would train on, writing
    checkpoints into output_dir, also while a new run starts there. A daemon thread polls the
    parent pid: the kernel re-parents an orphan, so a changed parent means the launcher is gone.
    (PR_SET_PDEATHSIG would be immediate, but it fires when the parent *thread* that started the
    worker ends, which need not be when the launcher does.) The worker then exits at once without
    a checkpoint, as its peers do: a step half done cannot be saved and they cannot agree on one.
    """
    global _watching_launcher
    if _watching_launcher or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    _watching_launcher = True
    threading.Thread(target=_watch_launcher, args=(interval_s,), name="launcher-watch", daemon=True).start()


def on_launcher_death(hook: Callable[[str], None]) -> Callable[[], None]:
    """Have `hook(message)` run (briefly: a few seconds at most) before a worker whose launcher died
    exits, to record why; returns the function that unregisters it."""
    _launcher_death_hooks.append(hook)

    def unregister() -> None:
        if hook in _launcher_death_hooks:
            _launcher_death_hooks.remove(hook)

    return unregister


def _launcher_gone() -> bool:
    return _watching_launcher and os.getppid() != _LAUNCHER_PID


def _watch_launcher(interval_s: float) -> None:
    while not _launcher_gone():
        time.sleep(interval_s)
    _exit_without_launcher()


def exit_if_launcher_gone() -> None:
    """End this worker now, as the watch would, if its launcher died: called on an error, which
    is then most likely a peer's exit breaking a collective, so the launcher's death is the cause
    to record (and no traceback is worth printing)."""
    if _launcher_gone():
        _exit_without_launcher()


def _exit_without_launcher() -> None:
    # A hook stuck on a hung file system must not keep the worker alive.
    backstop = threading.Timer(5.0, os._exit, (LAUNCHER_GONE_EXIT_STATUS,))
    backstop.daemon = True
    backstop.start()
    message = (
        f"the launcher (pid {_LAUNCHER_PID}) ended without stopping its workers; they stopped "
        "without saving (resume_from_checkpoint=true continues from the last checkpoint)"
    )
    for hook in list(_launcher_death_hooks):
        try:
            hook(message)
        except Exception:
            pass  # exiting matters more than the record
    if os.environ.get("LOCAL_RANK", "0") == "0":  # one line per node, as for an input error
        try:
            print(f"error: {message}", file=sys.stderr, flush=True)
        except (OSError, ValueError):
            pass  # the launcher's terminal may be gone with it
    os._exit(LAUNCHER_GONE_EXIT_STATUS)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_rank_zero() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: object, src: int = 0) -> object:
    """`obj` from rank `src` on every rank (pickled; for the odd tensor subclass that FSDP's
    broadcast does not carry). Returns `obj` unchanged in a single process."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def run_on_rank_zero(load: Callable[[], T], default: T) -> T:
    """`load()` on rank 0 and `default` on the other ranks (all of it in a single process).

    An input error in `load` is raised on every rank: the others would otherwise wait for
    rank 0 in their next collective (NCCL: until its timeout) instead of stopping with it.
    """
    if not is_distributed():
        return load()
    result, error = default, None
    if dist.get_rank() == 0:
        try:
            result = load()
        except UserError as exc:
            error = str(exc)
    error = broadcast_object(error)
    if error is not None:
        raise UserError(error)
    return result


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` in place across ranks and return it (unchanged in a single process)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def destroy_distributed() -> None:
    if is_distributed():
        dist.destroy_process_group()


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """Map a config's device name (one of DEVICES) to this rank's torch.device."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserError("device=cuda was requested but no CUDA GPU is available; set device=cpu or device=auto")
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise UserError(
                f"local rank {local_rank} has no GPU (this node has {count}); launch at most {count} processes per node"
            )
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    raise UserError(f"unknown device {name!r}; use one of: {', '.join(DEVICES)}")
