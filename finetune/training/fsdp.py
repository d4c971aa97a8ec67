"""FSDP2 sharding and full (unsharded) state dicts for model and optimizer.

`shard_model` puts each decoder layer in its own FSDP unit and everything else (embedding,
final norm, output head) in the root unit, so a tied embedding/output weight lives in one unit.
The state-dict helpers work on sharded and plain modules alike, so a recipe calls one API
whether it runs on one process or many. The state dicts they return are snapshots: they never
share memory with the live model or optimizer, so they can be saved in the background while
training goes on.
"""

from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor


def _check_layers_own_their_params(model: nn.Module) -> None:
    # A parameter shared between a layer and the rest of the model would be sharded twice.
    outside: set[int] = set()
    layer_params: list[set[int]] = []
    for layer in model.layers:
        layer_params.append({id(p) for p in layer.parameters()})
    all_layer_ids = set().union(*layer_params) if layer_params else set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if not name.startswith("layers."):
            outside.add(id(p))
    shared = outside & all_layer_ids
    if shared:
        raise ValueError("a parameter is shared between model.layers and the rest of the model")
    for i, ids in enumerate(layer_params):
        for j in range(i + 1, len(layer_params)):
            if ids & layer_params[j]:
                raise ValueError(f"layers {i} and {j} share a parameter")


def shard_model(
    model: nn.Module,
    *,
    reshard_after_forward: bool = True,
    cpu_offload: bool = False,
    param_dtype: Optional[torch.dtype] = None,
    mesh: Optional[DeviceMesh] = None,
    ignored_params: Optional[set[nn.Parameter]] = None,
) -> nn.Module:
    """Apply FSDP2 to each `model.layers[i]`, then to the root; returns the model (sharded in place).

    Apply activation checkpointing before this. `param_dtype` casts parameters for compute
    (gradients are reduced in fp32); leave it None when the weights already hold the run's dtype.
    `mesh` defaults to all ranks, on CPU for a gloo process group and on the GPU otherwise.
    `ignored_params` stay whole on every rank, outside FSDP (QLoRA's 4-bit base weights).
    """
    _check_layers_own_their_params(model)
    kwargs: dict[str, Any] = {"reshard_after_forward": reshard_after_forward}
    if mesh is None and dist.is_initialized() and dist.get_backend() == "gloo":
        # FSDP2's default mesh is on the GPU whenever one exists; a gloo run computes on CPU.
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    if mesh is not None:
        kwargs["mesh"] = mesh
    if param_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    if ignored_params:
        kwargs["ignored_params"] = ignored_params
    if cpu_offload:
        # Pinning needs CUDA; without it CPUOffloadPolicy() fails at construction.
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    for layer in model.layers:
        fully_shard(layer, **kwargs)
    # The root (embedding, final norm, output head) stays gathered after forward, as FSDP2 does by
    # default for a root: backward needs the head first, and a loss that applies `model.output`
    # to the returned hidden states (chunked cross-entropy) needs its full weight.
    fully_shard(model, **dict(kwargs, reshard_after_forward=False))
    return model


def _storage_ptr(tensor: torch.Tensor) -> int:
    if isinstance(tensor, DTensor):
        tensor = tensor.to_local()
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return 0  # tensor subclasses without a plain storage (e.g. quantised optimizer state)


def _live_storages(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> set[int]:
    tensors = [*model.parameters(), *model.buffers()]
    if optimizer is not None:
        tensors += [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    return {ptr for ptr in map(_storage_ptr, tensors) if ptr != 0}


def _copy(value: Any, clone: Callable[[torch.Tensor], bool]) -> Any:
    """Copy dicts and lists; clone the tensors for which `clone` says so."""
    if isinstance(value, dict):
        return {k: _copy(v, clone) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v, clone) for v in value]
    if torch.is_tensor(value) and clone(value):
        return value.clone()
    return value


def _snapshot(state_dict: dict[str, Any], live: set[int]) -> dict[str, Any]:
    # Where no gather or device copy happened (one process, or CPU scalars such as Adam's
    # step), torch hands back the live tensors; a state dict must not change as training goes on.
    return _copy(state_dict, lambda t: _storage_ptr(t) in live)


def _use_collectives() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def full_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state on CPU; on rank 0 only (other ranks get an empty dict).

    Every rank must call this: gathering shards is collective.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return _snapshot(get_model_state_dict(model, options=options), _live_storages(model))


def load_full_model_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], *, strict: bool = True) -> None:
    """Load a full state dict held on rank 0 (others may pass {}) into a sharded or plain model."""
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=_use_collectives(), strict=strict)
    # torch writes the sharded tensors back into the dict it is given: pass a copy.
    set_model_state_dict(model, dict(state_dict), options=options)


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state keyed by parameter name, on CPU, on rank 0 only. Collective."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state_dict = get_optimizer_state_dict(model, optimizer, options=options)
    return _snapshot(state_dict, _live_storages(model, optimizer))


def load_full_optimizer_state_dict(
    model: nn.Module, optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]
) -> None:
    """Load a state dict from `full_optimizer_state_dict` (held on rank 0) into `optimizer`."""
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=_use_collectives())
    # Copy the containers (torch writes into them) and clone scalars (Adam's step), which torch
    # would otherwise adopt as they are, sharing them with the caller's dict.
    state_dict = _copy(state_dict, lambda t: t.dim() == 0)
    set_optimizer_state_dict(model, optimizer, state_dict, options=options)
