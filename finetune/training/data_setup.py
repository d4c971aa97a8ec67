"""From params to batches: the dataset, this rank's resumable sampler and the DataLoader."""

from __future__ import annotations

from functools import partial
from typing import Callable, Optional

import torch

from finetune.data import ResumableDistributedSampler, build_dataloader, build_dataset, collate
from finetune.errors import UserError
from finetune.params import FullFinetuneParams, resolve_path
from finetune.tokenizers import Tokenizer
from finetune.training.distributed import DistInfo


def build_data(
    params: FullFinetuneParams,
    tokenizer: Tokenizer,
    dist: DistInfo,
    *,
    source: str,
    split: str,
    shuffle: bool,
    log: Optional[Callable[[str], None]] = None,
) -> tuple[torch.utils.data.DataLoader, ResumableDistributedSampler]:
    """A loader over `source` whose order is fixed by the seed and resumable mid-epoch.

    Training data drops the tail that does not fill every rank equally; evaluation data keeps
    every sample (`shuffle=False` marks it).
    """
    dataset = build_dataset(
        str(resolve_path(source)) if source.startswith("pkg:") else source,
        dataset_type=params.dataset_type, tokenizer=tokenizer, max_seq_len=params.max_seq_len,
        template=params.template, train_on_input=params.train_on_input, column_map=params.column_map,
        split=split, subset=params.dataset_subset, packed=params.packed, log=log,
    )
    sampler = ResumableDistributedSampler(
        len(dataset), rank=dist.rank, world_size=dist.world_size, seed=params.seed, shuffle=shuffle,
        drop_last=shuffle,
    )
    loader = build_dataloader(
        dataset, batch_size=params.batch_size, sampler=sampler, num_workers=params.num_workers,
        collate_fn=partial(collate, pad_id=tokenizer.pad_id), seed=params.seed,
    )
    return loader, sampler


def steps_per_epoch(params: FullFinetuneParams, sampler: ResumableDistributedSampler, world_size: int) -> int:
    """Optimizer steps in one epoch: whole accumulation groups only, capped by max_steps_per_epoch."""
    samples_per_step = params.batch_size * params.gradient_accumulation_steps
    full_steps = sampler.num_samples // samples_per_step
    if full_steps == 0:
        raise UserError(
            f"the dataset gives each of the {world_size} process(es) {sampler.num_samples} samples, fewer than "
            f"one step needs (batch_size x gradient_accumulation_steps = {samples_per_step}); lower them or add data"
        )
    return min(full_steps, params.max_steps_per_epoch or full_steps)
