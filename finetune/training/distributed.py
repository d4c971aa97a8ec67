"""Process-group setup from torchrun's environment, and the few collectives recipes need.

A run launched without torchrun (no WORLD_SIZE in the environment, or WORLD_SIZE=1) is a
plain single process: every helper here then does nothing, so recipes call them unconditionally.
"""

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Optional, TypeVar

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


# torchrun's rendezvous store lives in the launcher, not in a worker, so it outlasts a worker that
# stopped on an input error; workers use it to print that error once and to stay quiet after it.
# The store outlives a restart of the workers (torchrun --max_restarts), so each attempt has its key.
def _user_error_key() -> str:
    return f"finetune/user_error/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def _launcher_store() -> Optional[dist.Store]:
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    try:
        return dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timedelta(seconds=10)
        )
    except (KeyError, ValueError, RuntimeError):
        return None


def first_to_report_user_error() -> bool:
    """Record that this process stops on an input error; True for the first such process on
    its node, which prints it (every rank usually hits the same error). Outside torchrun:
    local rank 0 prints."""
    store = _launcher_store()
    if store is None:
        return os.environ.get("LOCAL_RANK", "0") == "0"
    try:
        store.add(_user_error_key(), 1)
        return store.add(f"{_user_error_key()}/node{os.environ.get('GROUP_RANK', '0')}", 1) == 1
    except RuntimeError:
        return os.environ.get("LOCAL_RANK", "0") == "0"


def peer_stopped_on_user_error() -> bool:
    """Whether another worker of this torchrun job stopped on an input error (and reported it):
    a collective failing in this process afterwards is a consequence, not a second problem."""
    store = _launcher_store()
    if store is None:
        return False
    try:
        return store.check([_user_error_key()])
    except RuntimeError:
        return False


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
            raise UserError(
                "device=cuda was requested but no CUDA GPU is available; set device=cpu or device=auto"
            )
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise UserError(
                f"local rank {local_rank} has no GPU (this node has {count}); "
                f"launch at most {count} processes per node"
            )
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    raise UserError(f"unknown device {name!r}; use one of: {', '.join(DEVICES)}")
