"""Turning params into a model ready to train: architecture, initial weights, memory features,
compilation and FSDP, in the order they must be applied.

Weights are read (or randomly initialised, seeded) on rank 0 only and reach the other ranks
through FSDP's broadcast, so a 2-process run starts from exactly the weights a 1-process run
does. The model itself is built on the meta device first: nothing is allocated twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from finetune.errors import UserError
from finetune.models import ModelArgs, TransformerDecoder, model_args, model_args_from_checkpoint
from finetune.params import resolve_path
from finetune.training.activations import apply_activation_checkpointing
from finetune.training.distributed import DistInfo
from finetune.training.fsdp import load_full_model_state_dict, shard_model


def resolve_model_args(model: str, checkpoint_dir: Optional[str]) -> ModelArgs:
    """The architecture: a registry name, or `auto` = read from the checkpoint's config."""
    if model == "auto":
        assert checkpoint_dir is not None  # params validation guarantees it
        return model_args_from_checkpoint(resolve_path(checkpoint_dir))
    return model_args(model)


def initial_state_dict(
    args: ModelArgs,
    *,
    weights_dir: Optional[Path],
    checkpoint_format: str,
    dtype: torch.dtype,
    seed: int,
) -> dict[str, torch.Tensor]:
    """Full weights on CPU: read from `weights_dir`, or a seeded random init when it is None."""
    if weights_dir is not None:
        from finetune.checkpointing import load_state_dict

        return load_state_dict(weights_dir, args, checkpoint_format=checkpoint_format, dtype=dtype)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = TransformerDecoder(args)
    model.reset_parameters()
    torch.random.set_rng_state(generator_state)
    return {k: v.to(dtype) for k, v in model.state_dict().items()}


def prepare_model(
    model: TransformerDecoder,
    state_dict: dict[str, torch.Tensor],
    *,
    dist: DistInfo,
    device: torch.device,
    dtype: torch.dtype,
    activation_checkpointing: bool,
    compile: bool,
    reshard_after_forward: bool,
    cpu_offload: bool,
    before_sharding: Optional[Callable[[nn.Module], None]] = None,
) -> TransformerDecoder:
    """Put weights into a meta-device model and apply the memory and speed features.

    Order matters: activation checkpointing wraps each layer before compile, and both come
    before FSDP wraps the layers. `before_sharding` lets a recipe change modules (LoRA) first.
    `state_dict` is only needed on rank 0 when distributed; other ranks pass {}.
    """
    if before_sharding is not None:
        before_sharding(model)
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        for layer in model.layers:
            layer.compile()
    if not dist.is_distributed:
        if cpu_offload:
            raise UserError("cpu_offload is an FSDP option: it needs --nproc_per_node 2 or more; unset it")
        model.load_state_dict(state_dict, strict=False, assign=True)
        _check_all_materialised(model)
        model.tie_weights()
        model.init_rope(torch.device("cpu"))  # a meta buffer cannot be moved
        model.to(device=device, dtype=dtype)
        model.init_rope(device)  # recomputed in fp32 whatever the weights' dtype
        return model
    shard_model(model, reshard_after_forward=reshard_after_forward, cpu_offload=cpu_offload)
    model.to_empty(device="cpu" if cpu_offload else device)
    model.to(dtype=dtype)
    model.init_rope(device)
    load_full_model_state_dict(model, state_dict, strict=False)
    return model


def _check_all_materialised(model: nn.Module) -> None:
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise UserError(f"the checkpoint has no weights for {', '.join(missing[:3])}{more}; "
                        "check that checkpoint_dir holds the whole model")
