"""Loading Hugging Face or Meta checkpoints into a `TransformerDecoder`.

The model is built on the meta device (no memory), names and shapes are checked against it
before any tensor data is read, and then tensors stream in one file at a time and are
assigned in place, so peak memory stays near one copy of the weights.
"""

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from finetune.checkpointing.formats import check_format_name, checkpoint_directory, describe_listing, detect_format
from finetune.checkpointing.key_mapping import (
    GEMMA3_VISION,
    HF_IGNORED,
    META_IGNORED,
    from_hf_name,
    from_meta_name,
    is_rotary_projection,
    meta_to_rotate_half,
    to_hf_name,
    to_meta_name,
)
from finetune.checkpointing.model_configs import read_model_args
from finetune.checkpointing.readers import HFReader, MetaReader, TensorEntry
from finetune.errors import UserError
from finetune.models import ModelArgs, TransformerDecoder, model_args

PathLike = Union[str, os.PathLike]
Device = Union[str, torch.device]


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Our parameter names and shapes for `args`, the tied output excluded (nothing is allocated)."""
    with torch.device("meta"):
        model = TransformerDecoder(args)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if args.tie_embeddings:
        del shapes["output.weight"]
    return shapes


class _CheckpointPlan:
    """What to read from a checkpoint directory and under which of our names."""

    def __init__(self, directory: Path, args: ModelArgs, checkpoint_format: str) -> None:
        self.args = args
        self.directory = directory
        self.format = detect_format(directory) if checkpoint_format == "auto" else checkpoint_format
        if self.format == "hf":
            self.reader: Union[HFReader, MetaReader] = HFReader(directory)
            sandwich = args.sandwich_norms
            ignored = (
                re.compile(f"{HF_IGNORED.pattern}|{GEMMA3_VISION.pattern}") if args.family == "gemma3" else HF_IGNORED
            )

            def to_ours(name: str) -> Optional[str]:
                return from_hf_name(name, sandwich)

            def to_theirs(name: str) -> Optional[str]:
                return to_hf_name(name, sandwich)

            self.to_theirs = to_theirs
        else:
            self.reader = MetaReader(directory, args.dim)
            to_ours, ignored, self.to_theirs = from_meta_name, META_IGNORED, to_meta_name
        entries = self.reader.entries()
        self.our_names: dict[str, str] = {}  # their name -> ours
        unexpected = []
        for name in entries:
            if ignored.search(name):
                continue
            ours = to_ours(name)
            if ours is not None:
                self.our_names[name] = ours
            else:
                unexpected.append(name)
        self._check(directory, entries, unexpected)

    def _check(self, directory: Path, entries: dict[str, TensorEntry], unexpected: list[str]) -> None:
        shapes = expected_shapes(self.args)
        by_ours = {ours: theirs for theirs, ours in self.our_names.items()}
        # A tied model may meet a checkpoint that also stores the output layer: it must be a copy.
        self.tied_output = by_ours.pop("output.weight", None) if self.args.tie_embeddings else None
        unexpected += sorted(theirs for ours, theirs in by_ours.items() if ours not in shapes)
        if unexpected:
            raise UserError(
                f"checkpoint {directory} has tensors this model does not know: "
                f"{describe_listing(sorted(unexpected), 3)}; "
                "it is not a Llama checkpoint of this layout"
            )
        missing = sorted(self.to_theirs(ours) for ours in shapes if ours not in by_ours)
        if missing:
            raise UserError(
                f"checkpoint {directory} lacks tensors the model needs: {describe_listing(missing, 3)}; "
                "the checkpoint is incomplete or for a different model"
            )
        checks = list(by_ours.items())
        if self.tied_output is not None:
            checks.append(("tok_embeddings.weight", self.tied_output))
        for ours, theirs in checks:
            found, wanted = entries[theirs].shape, shapes[ours]
            if found != wanted:
                raise UserError(
                    f"tensor {theirs} in {entries[theirs].file} has shape {list(found)} but the model expects "
                    f"{list(wanted)}; the checkpoint is for a different model (try model='auto')"
                )

    def iter_tensors(self, dtype: Optional[torch.dtype], device: Device) -> Iterator[tuple[str, torch.Tensor]]:
        """(our name, tensor) pairs, converted, permuted and on `device`."""
        embedding: Optional[torch.Tensor] = None
        pending_output: Optional[torch.Tensor] = None
        wanted = set(self.our_names)
        for theirs, tensor in self.reader.iter_tensors(wanted):
            ours = self.our_names[theirs]
            if self.format == "meta" and is_rotary_projection(ours):
                n_heads = self.args.n_heads if "q_proj" in ours else self.args.n_kv_heads
                tensor = meta_to_rotate_half(tensor, n_heads)
            tensor = tensor.to(device=device, dtype=dtype if dtype is not None and tensor.is_floating_point() else None)
            if theirs == self.tied_output:
                pending_output = tensor
            else:
                if ours == "tok_embeddings.weight" and self.tied_output is not None:
                    embedding = tensor
                yield ours, tensor
            if pending_output is not None and embedding is not None:
                if not torch.equal(pending_output, embedding):
                    raise UserError(
                        f"checkpoint {self.directory} stores {self.tied_output} different from the embeddings, "
                        "but this model ties them; "
                        "load it with model='auto' or a model name without tied embeddings"
                    )
                pending_output = embedding = None


def _resolve_args(directory: Path, model: Union[str, ModelArgs], checkpoint_format: str) -> ModelArgs:
    if isinstance(model, ModelArgs):
        return model
    if model == "auto":
        return read_model_args(directory, checkpoint_format)
    return model_args(model)


def load_state_dict(
    checkpoint_dir: PathLike,
    args: Union[str, ModelArgs] = "auto",
    checkpoint_format: str = "auto",
    dtype: Optional[torch.dtype] = torch.float32,
    device: Device = "cpu",
) -> dict[str, torch.Tensor]:
    """All weights of a checkpoint under our names (no `output.weight` for tied models)."""
    directory = checkpoint_directory(checkpoint_dir)
    fmt = check_format_name(checkpoint_format)
    plan = _CheckpointPlan(directory, _resolve_args(directory, args, fmt), fmt)
    return dict(plan.iter_tensors(dtype, device))


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    old = getattr(module, leaf)
    setattr(module, leaf, nn.Parameter(tensor, requires_grad=old.requires_grad))


def load_model(
    checkpoint_dir: PathLike,
    model: Union[str, ModelArgs] = "auto",
    *,
    checkpoint_format: str = "auto",
    device: Device = "cpu",
    dtype: Optional[torch.dtype] = torch.float32,
) -> tuple[TransformerDecoder, ModelArgs]:
    """Build the model named `model` ("auto" reads config.json / params.json) from a checkpoint.

    dtype=None keeps each tensor's stored dtype.
    """
    directory = checkpoint_directory(checkpoint_dir)
    fmt = check_format_name(checkpoint_format)
    args = _resolve_args(directory, model, fmt)
    plan = _CheckpointPlan(directory, args, fmt)
    with torch.device("meta"):
        decoder = TransformerDecoder(args)
    for name, tensor in plan.iter_tensors(dtype, device):
        _assign(decoder, name, tensor)
    decoder.tie_weights()
    decoder.init_rope(torch.device(device))
    still_meta = [name for name, p in decoder.named_parameters() if p.is_meta]
    assert not still_meta, f"parameters left unloaded: {still_meta}"
    return decoder, args
