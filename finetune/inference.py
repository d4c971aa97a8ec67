"""Loading a checkpoint for inference: the setup `tune generate` and `tune eleuther_eval` share.

It comes in two steps, so that a recipe can check its own input between them, before
gigabytes of weights are read: `prepare_inference` resolves the device and dtype, reads the
architecture, the tokenizer and (for a `tune quantize` output) the quantization record;
`load_inference_model` then loads the weights in any supported format (Hugging Face, Meta or
quantized) and puts an optional PEFT LoRA adapter on top.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import torch

from finetune.checkpointing import load_model
from finetune.checkpointing.model_configs import resolve_model_args
from finetune.checkpointing.peft import apply_lora_settings, describe_adapted, load_peft_adapter
from finetune.checkpointing.quantized import is_quantized_checkpoint, load_quantized_model, read_quantization_record
from finetune.models import ModelArgs, TransformerDecoder
from finetune.models.lora import apply_lora, load_adapter_state_dict
from finetune.params import resolve_path
from finetune.tokenizers import Tokenizer
from finetune.tokenizers.loader import load_tokenizer_for_model
from finetune.training.distributed import resolve_device
from finetune.training.precision import resolve_run_dtype

Log = Callable[[str], None]


class InferenceParams(Protocol):
    """The keys of GenerateParams and EvalParams that say which model to load and where."""

    @property
    def model(self) -> str: ...
    @property
    def checkpoint_dir(self) -> Optional[str]: ...
    @property
    def checkpoint_format(self) -> str: ...
    @property
    def tokenizer_path(self) -> Optional[str]: ...
    @property
    def device(self) -> str: ...
    @property
    def dtype(self) -> str: ...


@dataclass
class InferenceSetup:
    """All that is known about the model before any weight is read."""

    checkpoint_dir: Path
    checkpoint_format: str
    device: torch.device
    dtype: torch.dtype  # what an unquantized checkpoint is loaded in; a quantized one keeps its own
    model_args: ModelArgs
    tokenizer: Tokenizer
    quantization: Optional[dict[str, Any]]  # the quantization.json record of a quantized checkpoint


def tokenizer_location(tokenizer_path: Optional[str], checkpoint_dir: Path) -> Path:
    """Where the tokenizer is: the tokenizer_path param, or else the checkpoint's own files."""
    return resolve_path(tokenizer_path) if tokenizer_path else checkpoint_dir


def prepare_inference(params: InferenceParams) -> InferenceSetup:
    """Device, dtype, architecture, tokenizer and quantization record: everything but the weights."""
    device = resolve_device(params.device)
    dtype = resolve_run_dtype(params.dtype, device)
    checkpoint_dir = resolve_path(params.checkpoint_dir)  # type: ignore[arg-type]  # the params require it
    model_args = resolve_model_args(params.model, checkpoint_dir, params.checkpoint_format)
    tokenizer = load_tokenizer_for_model(
        tokenizer_location(params.tokenizer_path, checkpoint_dir), model_args.family, model_args.vocab_size
    )
    quantization = read_quantization_record(checkpoint_dir) if is_quantized_checkpoint(checkpoint_dir) else None
    return InferenceSetup(checkpoint_dir, params.checkpoint_format, device, dtype, model_args, tokenizer, quantization)


def load_inference_model(setup: InferenceSetup, adapter_dir: Optional[str], log: Log) -> TransformerDecoder:
    """The checkpoint's model on the setup's device, in eval mode, with the PEFT LoRA adapter in
    `adapter_dir` (none: the base model) on top."""
    # The adapter is checked against the architecture before any base weight is read.
    adapter = (
        load_peft_adapter(resolve_path(adapter_dir), setup.model_args, base_dir=setup.checkpoint_dir)
        if adapter_dir
        else None
    )
    if setup.quantization is not None:
        # A quantized model computes in the dtype it was quantized in.
        model, _ = load_quantized_model(setup.checkpoint_dir, device=setup.device, args=setup.model_args)
    else:
        model, _ = load_model(
            setup.checkpoint_dir,
            setup.model_args,
            checkpoint_format=setup.checkpoint_format,
            device=setup.device,
            dtype=setup.dtype,
        )
    if adapter is not None:
        weights, config = adapter
        settings = apply_adapter(model, weights, config)
        log(f"adapter {adapter_dir}: LoRA rank {config['r']} on {describe_adapted(settings)}")
    return model.eval()


def apply_adapter(
    model: TransformerDecoder, weights: dict[str, torch.Tensor], config: dict[str, Any]
) -> dict[str, Any]:
    """Wrap the adapted linears in LoRA modules holding the adapter's weights, in the model's
    dtype and on its device; returns the `apply_lora` settings used.

    The adapter stays unmerged, so the base weights (quantized ones too) stay exactly as loaded.
    """
    settings = apply_lora_settings(config, weights)  # from the tensors: target_modules may be a pattern
    apply_lora(model, **settings)
    embedding = model.tok_embeddings.weight
    load_adapter_state_dict(
        model, {name: w.to(embedding.device, embedding.dtype) for name, w in weights.items()}, strict=False
    )
    return settings
