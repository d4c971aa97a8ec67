"""From params to batches: the dataset, this rank's resumable sampler and the DataLoader."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional, Union

import torch

from finetune.data import ResumableDistributedSampler, build_dataloader, build_dataset, collate
from finetune.data.sources import parse_split
from finetune.data.stream import StreamedSamples, streamed_samples
from finetune.data.templates import get_template
from finetune.data.tokenize import TokenizeSpec
from finetune.errors import UserError
from finetune.params import FullFinetuneParams, resolve_path
from finetune.tokenizers import Tokenizer
from finetune.training.distributed import DistInfo


@dataclass
class TrainingData:
    """Everything a training loop reads: batches, the sampler that orders them, held-out batches."""

    train_loader: torch.utils.data.DataLoader
    sampler: Union[ResumableDistributedSampler, StreamedSamples]
    eval_loader: Optional[torch.utils.data.DataLoader]
    steps_per_epoch: int


def build_training_data(
    params: FullFinetuneParams, tokenizer: Tokenizer, dist: DistInfo, log: Callable[[str], None]
) -> TrainingData:
    """The training and held-out loaders of a run, and how many optimizer steps an epoch takes."""
    if params.data_streaming:
        train_loader, sampler = build_stream(params, tokenizer, dist, log)
    else:
        train_loader, sampler = build_data(
            params, tokenizer, dist, source=params.dataset, split=params.split, shuffle=params.shuffle, log=log
        )
    eval_loader = build_eval_data(params, tokenizer, dist, log=log)
    return TrainingData(train_loader, sampler, eval_loader, steps_per_epoch(params, sampler, dist.world_size))


def build_data(
    params: FullFinetuneParams,
    tokenizer: Tokenizer,
    dist: DistInfo,
    *,
    source: str,
    split: str,
    shuffle: bool,
    split_key: str = "split",
    log: Optional[Callable[[str], None]] = None,
) -> tuple[torch.utils.data.DataLoader, ResumableDistributedSampler]:
    """A loader over `source` whose order is fixed by the seed and resumable mid-epoch.

    Training data drops the tail that does not fill every rank equally; evaluation data keeps
    every sample (`shuffle=False` marks it). `split_key` names the parameter `split` came from.
    """
    # dataset_subset names a subset of `dataset`; an eval_dataset from elsewhere has its own layout.
    subset = params.dataset_subset if _local_name(source) == _local_name(params.dataset) else None
    dataset = build_dataset(
        _local_name(source),
        dataset_type=params.dataset_type,
        tokenizer=tokenizer,
        max_seq_len=params.max_seq_len,
        template=params.template,
        train_on_input=params.train_on_input,
        column_map=params.column_map,
        split=split,
        split_key=split_key,
        subset=subset,
        packed=params.packed,
        log=log,
        cache_dir=params.data_cache_dir,
        num_proc=params.data_build_workers,
    )
    sampler = ResumableDistributedSampler(
        len(dataset),
        rank=dist.rank,
        world_size=dist.world_size,
        seed=params.seed,
        shuffle=shuffle,
        drop_last=shuffle,
    )
    loader = build_dataloader(
        dataset,
        batch_size=params.batch_size,
        sampler=sampler,
        num_workers=params.num_workers,
        collate_fn=partial(collate, pad_id=tokenizer.pad_id),
        seed=params.seed,
    )
    return loader, sampler


def build_stream(
    params: FullFinetuneParams, tokenizer: Tokenizer, dist: DistInfo, log: Callable[[str], None]
) -> tuple[torch.utils.data.DataLoader, StreamedSamples]:
    """A loader over the training data read in order while training (data_streaming); the stream
    is also the sampler the loop steers."""
    if params.shuffle and dist.rank == 0:
        log("note: data_streaming reads the data in its order; shuffle does not apply")
    if params.num_workers:
        raise UserError("data_streaming=true tokenizes in the training process; set num_workers=0")
    stream = streamed_samples(
        _local_name(params.dataset),
        spec=TokenizeSpec(
            params.dataset_type,
            params.max_seq_len,
            get_template(params.template) if params.dataset_type == "instruct" else None,
            params.train_on_input,
        ),
        tokenizer=tokenizer,
        column_map=params.column_map,
        split=params.split,
        subset=params.dataset_subset,
        split_key="split",
        rank=dist.rank,
        world_size=dist.world_size,
        num_samples=(params.max_steps_per_epoch or 0) * params.batch_size * params.gradient_accumulation_steps,
    )
    loader = torch.utils.data.DataLoader(
        stream, batch_size=params.batch_size, collate_fn=partial(collate, pad_id=tokenizer.pad_id)
    )
    return loader, stream


def build_eval_data(
    params: FullFinetuneParams, tokenizer: Tokenizer, dist: DistInfo, log: Callable[[str], None]
) -> Optional[torch.utils.data.DataLoader]:
    """The loader over eval_dataset (None without one); a note when it overlaps the training data."""
    if not params.eval_dataset:
        return None
    if eval_overlaps_training(params):
        log(
            f"note: the eval data overlaps the training data ({params.eval_dataset}, split={params.split}, "
            f"eval_split={params.eval_split}), so the eval loss is measured on samples the model trains on; "
            "to hold some out, set e.g. split=train[:95%] eval_split=train[95%:]"
        )
    loader, _ = build_data(
        params,
        tokenizer,
        dist,
        source=params.eval_dataset,
        split=params.eval_split,
        shuffle=False,
        split_key="eval_split",
        log=log,
    )
    return loader


def eval_overlaps_training(params: FullFinetuneParams) -> bool:
    """Whether eval_dataset/eval_split surely shares samples with dataset/split (same source and
    split, slices not disjoint). Slices in different units (90% against 1000) are not compared."""
    if params.eval_dataset is None or _local_name(params.eval_dataset) != _local_name(params.dataset):
        return False
    train_name, train_bounds = parse_split(params.split)
    eval_name, eval_bounds = parse_split(params.eval_split, "eval_split")
    if train_name != eval_name:
        return False
    train_span, eval_span = _span(train_bounds), _span(eval_bounds)
    if train_span is None or eval_span is None:  # the whole split overlaps any part of it
        return True
    (train_lo, train_hi, train_unit), (eval_lo, eval_hi, eval_unit) = train_span, eval_span
    if train_unit != eval_unit or train_unit == "?":
        return False  # not known without counting the records
    return train_lo < eval_hi and eval_lo < train_hi


def _span(bounds: tuple[Optional[str], Optional[str]]) -> Optional[tuple[float, float, str]]:
    """(start, stop, unit) of a split's slice, unit '%' or 'records'; None without a slice; unit
    '?' where placing it needs the record count (mixed units, bounds counted from the end)."""
    start, stop = bounds
    if start is None and stop is None:
        return None
    given = [bound for bound in bounds if bound is not None]
    percent = {bound.endswith("%") for bound in given}
    if len(percent) > 1 or any(bound.startswith("-") for bound in given):
        return 0.0, 0.0, "?"
    unit = "%" if percent == {True} else "records"
    lo = float(start.rstrip("%")) if start is not None else 0.0
    hi = float(stop.rstrip("%")) if stop is not None else (100.0 if unit == "%" else math.inf)
    return lo, hi, unit


def _local_name(source: str) -> str:
    return str(resolve_path(source)) if source.startswith("pkg:") else source


def steps_per_epoch(
    params: FullFinetuneParams, sampler: Union[ResumableDistributedSampler, StreamedSamples], world_size: int
) -> int:
    """Optimizer steps in one epoch: whole accumulation groups only, capped by max_steps_per_epoch."""
    samples_per_step = params.batch_size * params.gradient_accumulation_steps
    full_steps = sampler.num_samples // samples_per_step
    if full_steps == 0:
        raise UserError(
            f"the dataset gives each of the {world_size} process(es) {sampler.num_samples} samples, fewer than "
            f"one step needs (batch_size x gradient_accumulation_steps = {samples_per_step}); lower them or add data"
        )
    return min(full_steps, params.max_steps_per_epoch or full_steps)
