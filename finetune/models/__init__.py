"""Llama-family models: the decoder, its architecture arguments and the named-model registry."""

from typing import Optional, Union

import torch
from torch import nn

from finetune.errors import UserError
from finetune.models.args import ModelArgs, RopeScaling
from finetune.models.llama import MODEL_NAMES, published_args
from finetune.models.transformer import TransformerDecoder

__all__ = [
    "MODEL_NAMES",
    "ModelArgs",
    "RopeScaling",
    "TransformerDecoder",
    "build_model",
    "model_args",
    "num_params",
]


def model_args(name: str) -> ModelArgs:
    """Architecture of a named model, e.g. "llama3_1_8b" or "tiny"."""
    if name not in MODEL_NAMES:
        raise UserError(
            f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)} (or 'auto' to read the checkpoint)"
        )
    return published_args(name)


def build_model(
    name_or_args: Union[str, ModelArgs],
    *,
    device: Optional[Union[str, torch.device]] = None,
    dtype: Optional[torch.dtype] = None,
) -> TransformerDecoder:
    """A randomly initialised decoder. On device="meta" nothing is allocated (shapes only)."""
    args = model_args(name_or_args) if isinstance(name_or_args, str) else name_or_args
    device = torch.device(device if device is not None else "cpu")
    # Shapes first, memory once: build on meta, allocate in the final dtype, then initialise.
    with torch.device("meta"):
        model = TransformerDecoder(args)
    if dtype is not None:
        model.to(dtype=dtype)
    if device.type != "meta":
        model.to_empty(device=device)
        model.tie_weights()
        model.reset_parameters()
    model.init_rope(device)  # rotary frequencies stay fp32 whatever the weights' dtype
    return model


def num_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters, each shared Parameter (tied embeddings) counted once; a sharded
    (FSDP2 DTensor) parameter counts its full size on every rank."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
