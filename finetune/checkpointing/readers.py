"""Streaming readers over a checkpoint's weight files, in the checkpoint's own tensor names.

Each reader first lists names and shapes without reading tensor data (so a wrong checkpoint
fails fast), then yields tensors one file at a time, so loading holds about one copy of the
weights: the copy being built, plus at most the not-yet-consumed rest of one shard.
"""

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from finetune.checkpointing.formats import hf_weight_files, meta_weight_files
from finetune.checkpointing.safetensors_io import iter_safetensors, read_header
from finetune.checkpointing.torch_files import load_torch_file, owned_tensor
from finetune.errors import UserError


@dataclass(frozen=True)
class TensorEntry:
    shape: tuple[int, ...]
    file: Path


def _entries_from_torch_file(path: Path) -> dict[str, TensorEntry]:
    return {name: TensorEntry(tuple(t.shape), path) for name, t in load_torch_file(path, mmap=True).items()}


def _drain(tensors: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    # Popping lets each tensor be freed as soon as the consumer is done with it.
    for name in list(tensors):
        yield name, owned_tensor(tensors.pop(name))


class HFReader:
    """model*.safetensors (one file or shards) or pytorch_model*.bin."""

    def __init__(self, directory: Path) -> None:
        self.files = hf_weight_files(directory)

    def entries(self) -> dict[str, TensorEntry]:
        entries: dict[str, TensorEntry] = {}
        for path in self.files:
            if path.suffix == ".safetensors":
                header, _ = read_header(path)
                found = {name: TensorEntry(tuple(e["shape"]), path) for name, e in header.items()}
            else:
                found = _entries_from_torch_file(path)
            for name in found.keys() & entries.keys():
                raise UserError(
                    f"tensor {name} appears in both {entries[name].file.name} and {path.name}; "
                    "the checkpoint is inconsistent"
                )
            entries.update(found)
        return entries

    def iter_tensors(self, names: Optional[set[str]] = None) -> Iterator[tuple[str, torch.Tensor]]:
        for path in self.files:
            if path.suffix == ".safetensors":
                yield from iter_safetensors(path, names)
            else:
                for name, tensor in _drain(load_torch_file(path)):
                    if names is None or name in names:
                        yield name, tensor


def _meta_split_dim(name: str, part_shape: tuple[int, ...], model_dim: Optional[int]) -> Optional[int]:
    """Dimension along which Meta's model-parallel shards split a tensor (None = replicated)."""
    if len(part_shape) < 2:
        return None  # norms and rope.freqs are replicated
    if name == "tok_embeddings.weight":
        # Llama 2 splits the embedding dimension, Llama 3 the vocabulary.
        return 1 if model_dim is not None and part_shape[1] != model_dim else 0
    if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
        return 1  # row-parallel layers split their input features
    return 0


class MetaReader:
    """consolidated.NN.pth; several files are a model-parallel split merged tensor by tensor."""

    def __init__(self, directory: Path, model_dim: Optional[int]) -> None:
        self.files = meta_weight_files(directory)
        self.model_dim = model_dim

    def entries(self) -> dict[str, TensorEntry]:
        per_file = [_entries_from_torch_file(path) for path in self.files]
        first = per_file[0]
        for path, entries in zip(self.files[1:], per_file[1:]):
            if entries.keys() != first.keys():
                differing = sorted(entries.keys() ^ first.keys())
                raise UserError(
                    f"model-parallel shards {self.files[0].name} and {path.name} hold different tensors "
                    f"(e.g. {differing[0]}); the checkpoint is incomplete, re-download it"
                )
        merged = {}
        for name, entry in first.items():
            shape = list(entry.shape)
            split = _meta_split_dim(name, entry.shape, self.model_dim) if len(per_file) > 1 else None
            if split is not None:
                shape[split] = sum(entries[name].shape[split] for entries in per_file)
            merged[name] = TensorEntry(tuple(shape), entry.file)
        return merged

    def iter_tensors(self, names: Optional[set[str]] = None) -> Iterator[tuple[str, torch.Tensor]]:
        if len(self.files) == 1:
            for name, tensor in _drain(load_torch_file(self.files[0])):
                if names is None or name in names:
                    yield name, tensor
            return
        # Mapped, not read: each merged tensor touches only its own slices of every shard.
        shards = [load_torch_file(path, mmap=True) for path in self.files]
        for name in list(shards[0]):
            parts = [shard.pop(name) for shard in shards]
            if names is not None and name not in names:
                continue
            split = _meta_split_dim(name, tuple(parts[0].shape), self.model_dim)
            yield name, parts[0].clone() if split is None else torch.cat(parts, dim=split)


def inspect_meta_weights(directory: Path, model_dim: Optional[int]) -> tuple[Optional[int], bool]:
    """(vocab size seen in the weights, whether the output layer is tied to the embeddings).

    Tied when the checkpoint has no `output.weight` or stores an exact copy of the embeddings
    (params.json has no field for tying, and Meta-layout writers may keep a separate copy).
    """
    reader = MetaReader(directory, model_dim)
    entries = reader.entries()
    embedding = entries.get("tok_embeddings.weight")
    vocab_size = embedding.shape[0] if embedding is not None else None
    if "output.weight" not in entries:
        return vocab_size, True
    if embedding is None or entries["output.weight"].shape != embedding.shape:
        return vocab_size, False
    pair = dict(reader.iter_tensors({"tok_embeddings.weight", "output.weight"})) if len(reader.files) > 1 else None
    if pair is None:
        mapped = load_torch_file(reader.files[0], mmap=True)
        pair = {"tok_embeddings.weight": mapped["tok_embeddings.weight"], "output.weight": mapped["output.weight"]}
    return vocab_size, torch.equal(pair["tok_embeddings.weight"], pair["output.weight"])
