"""Turning params into a model ready to train: architecture, initial weights, adapters, memory
features, compilation and FSDP, in the order they must be applied.

The complete starting model (base weights, plus adapters for LoRA) is built on CPU by the one
process that owns it: rank 0 when distributed. Other ranks build the same module structure on
the meta device, shard it, and receive the weights through FSDP's broadcast, so a 2-process run
starts from exactly the weights a 1-process run does. Nothing is allocated twice: weights are
assigned into meta-device modules, never copied into a random init.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from finetune.checkpointing import load_state_dict
from finetune.errors import UserError
from finetune.models import ModelArgs, TransformerDecoder
from finetune.models.lora import nf4_base_modules, quantize_nf4_bases
from finetune.training.activations import apply_activation_checkpointing
from finetune.training.distributed import DistInfo, broadcast_object, run_on_rank_zero
from finetune.training.fsdp import load_full_model_state_dict, shard_model
from finetune.training.memory import keep_freed_host_memory

ModuleHook = Callable[[nn.Module], None]


def initial_state_dict(
    args: ModelArgs,
    *,
    weights_dir: Optional[Path],
    checkpoint_format: str,
    dtype: torch.dtype,
    seed: int,
) -> dict[str, torch.Tensor]:
    """Full base weights on CPU: read from `weights_dir`, or a seeded random init when None."""
    if weights_dir is not None:
        return load_state_dict(weights_dir, args, checkpoint_format=checkpoint_format, dtype=dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TransformerDecoder(args)
        model.reset_parameters()
    return {k: v.to(dtype) for k, v in model.state_dict().items()}


def build_on_cpu(
    args: ModelArgs,
    state_dict: dict[str, torch.Tensor],
    *,
    adapt: Optional[ModuleHook] = None,
    initialize: Optional[ModuleHook] = None,
    quantize_on: Optional[torch.device] = None,
) -> TransformerDecoder:
    """The complete starting model on CPU: `adapt` changes modules (LoRA) on the meta device,
    the base weights are assigned, then `initialize` fills what the checkpoint has not (adapters).

    `state_dict` is consumed: its tensors become the model's and the dict is emptied, so that each
    dense weight is freed once the model lets go of it. With `quantize_on`, QLoRA base weights are
    quantized to NF4 on that device one at a time, before `initialize`, and stay there: on a GPU
    that takes seconds where the CPU takes minutes, and the host never holds the NF4 copy beside
    the dense one. Without it, `initialize` quantizes them where they are (weights gathered for a
    merged save may already be NF4)."""
    with torch.device("meta"):
        model = TransformerDecoder(args)
    if adapt is not None:
        adapt(model)
    model.load_state_dict(state_dict, strict=False, assign=True)
    state_dict.clear()
    if quantize_on is not None:
        quantize_nf4_bases(model, quantize_on)
    model.tie_weights()
    model.init_rope(torch.device("cpu"))
    if initialize is not None:
        initialize(model)
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise UserError(
            f"the checkpoint has no weights for {', '.join(missing[:3])}{more}; "
            "check that checkpoint_dir holds the whole model"
        )
    return model


def prepare_model(
    args: ModelArgs,
    state_dict: dict[str, torch.Tensor],
    *,
    dist: DistInfo,
    device: torch.device,
    dtype: torch.dtype,
    activation_checkpointing: bool,
    compile: bool,
    reshard_after_forward: bool,
    cpu_offload: bool,
    adapt: Optional[ModuleHook] = None,
    initialize: Optional[ModuleHook] = None,
) -> TransformerDecoder:
    """A model on `device` (sharded across ranks when distributed) with the memory features on.

    `state_dict` holds the base weights in the run's dtype; only the owning process (rank 0
    when distributed) needs it, other ranks pass {}. Activation checkpointing wraps each layer
    before compile, and both come before FSDP wraps the layers.

    A CPU run keeps freed host memory in its heap once the model is built (`keep_freed_host_memory`): good
    for steps, which allocate the same sizes each time, but not while the model is built, when
    dense weights are freed as their NF4 forms appear and the heap would keep every one of them.
    """
    if not dist.is_distributed:
        if cpu_offload:
            raise UserError("cpu_offload is an FSDP option: it needs --nproc_per_node 2 or more; unset it")
        model = build_on_cpu(args, state_dict, adapt=adapt, initialize=initialize, quantize_on=device)
        _apply_features(model, activation_checkpointing, compile)
        model.to(device=device)
        model.init_rope(device)  # recomputed in fp32 on the device
        _keep_freed_memory_for_steps(device)
        return model
    full_state = run_on_rank_zero(
        lambda: build_on_cpu(args, state_dict, adapt=adapt, initialize=initialize).state_dict(), default={}
    )
    with torch.device("meta"):
        model = TransformerDecoder(args).to(dtype)
    if adapt is not None:
        adapt(model)
    _apply_features(model, activation_checkpointing, compile)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    # QLoRA: the 4-bit base weights stay whole on every rank, outside FSDP (about 0.56 bytes per
    # weight; NF4 tensors do not shard cleanly through FSDP's state-dict loading). Until their
    # broadcast they are empty placeholders, so no rank ever allocates a dense copy.
    replicated = nf4_base_modules(model)
    for module in replicated.values():
        module.weight = nn.Parameter(torch.empty(0, device="meta"), requires_grad=False)
    shard_model(
        model,
        reshard_after_forward=reshard_after_forward,
        cpu_offload=cpu_offload,
        ignored_params={module.weight for module in replicated.values()},
    )
    model.to_empty(device="cpu" if cpu_offload else device)
    model.init_rope(device)
    replicated_keys = {f"{name}.weight" for name in replicated}
    load_full_model_state_dict(
        model, {k: v for k, v in full_state.items() if k not in replicated_keys}, strict=not replicated_keys
    )
    for name, module in replicated.items():
        weight = broadcast_object(full_state.get(f"{name}.weight"))
        module.weight = nn.Parameter(weight.to(device), requires_grad=False)
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
    _keep_freed_memory_for_steps(device)
    return model


def _keep_freed_memory_for_steps(device: torch.device) -> None:
    if device.type == "cpu":
        keep_freed_host_memory()


def _apply_features(model: nn.Module, activation_checkpointing: bool, compile: bool) -> None:
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        for layer in model.layers:
            layer.compile()
