"""Process-group setup from torchrun's environment, and the few collectives recipes need.

A run launched without torchrun (no WORLD_SIZE in the environment, or WORLD_SIZE=1) is a
plain single process: every helper here then does nothing, so recipes call them unconditionally.
"""

import os
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
