"""Batching: pad samples to the longest in the batch, and build the DataLoader."""

from functools import partial
from typing import Callable, Mapping, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from finetune.data.labels import IGNORE_INDEX

Sample = Mapping[str, Sequence[int]]
Batch = dict[str, torch.Tensor]


def collate(batch: Sequence[Sample], pad_id: int = 0) -> Batch:
    """Stack samples into LongTensors [batch, longest], padding at the end.

    Tokens are padded with `pad_id` and labels with the ignore index. Packed rows also
    carry `position_ids` and `document_ids`; their padding counts positions from 0 and gets
    a document id of its own, as packing does.
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    longest = max(len(sample["tokens"]) for sample in batch)
    out = {
        "tokens": _pad([s["tokens"] for s in batch], longest, lambda row: pad_id),
        "labels": _pad([s["labels"] for s in batch], longest, lambda row: IGNORE_INDEX),
    }
    if "position_ids" in batch[0]:
        out["position_ids"] = _pad([s["position_ids"] for s in batch], longest, None)
    if "document_ids" in batch[0]:
        out["document_ids"] = _pad([s["document_ids"] for s in batch], longest, lambda row: max(row, default=-1) + 1)
    return out


def _pad(rows: Sequence[Sequence[int]], length: int, fill: Optional[Callable[[Sequence[int]], int]]) -> torch.Tensor:
    """`fill(row)` gives a row's pad value; None pads with 0, 1, 2, ... (fresh positions)."""
    out = torch.empty(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row)
        out[i, :n] = torch.as_tensor(row, dtype=torch.long)
        if n < length:
            if fill is None:
                out[i, n:] = torch.arange(length - n)
            else:
                out[i, n:] = fill(row)
    return out


def build_dataloader(
    dataset: Dataset,
    *,
    batch_size: int,
    sampler: Sampler[int],
    collate_fn: Optional[Callable[[Sequence[Sample]], Batch]] = None,
    num_workers: int = 0,
    drop_last: bool = False,
    seed: int = 0,
) -> torch.utils.data.DataLoader:
    """A DataLoader whose order comes from `sampler` alone (default collate pads with 0).

    Its own generator seeds the worker processes: starting an iterator would otherwise draw
    from the global RNG, and a resumed run (which restores that RNG, then starts a fresh
    iterator) would see different dropout masks from an uninterrupted one.
    """
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate_fn or partial(collate, pad_id=0),
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )
