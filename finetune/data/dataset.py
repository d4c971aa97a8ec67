"""Datasets of tokenized samples, and `build_dataset`, the one entry point recipes use.

Records are tokenized once, up front: problems in the data surface before training
starts, the too-long samples can be counted and reported once, and DataLoader workers
never need the tokenizer. Samples are kept in flat int arrays (a Python list of ints costs
about 9x more memory): in memory here, or on disk in the tokenized-data cache
(finetune/data/cache.py), where later runs and every rank map them instead of tokenizing again.
"""

from array import array
from typing import Iterable, Optional, Union

from torch.utils.data import Dataset
from tqdm.auto import tqdm

from finetune.data.cache import cached_dataset
from finetune.data.packing import PackedDataset
from finetune.data.reporting import LogFn, is_rank_zero, rank_zero_log
from finetune.data.sources import Records, load_records
from finetune.data.templates import InstructTemplate, get_template
from finetune.data.tokenize import (
    DATASET_TYPES,
    DatasetType,
    TokenizeSpec,
    TokenizeStats,
    summary,
    tokenize_record,
)
from finetune.errors import UserError
from finetune.tokenizers import Tokenizer

__all__ = ["DATASET_TYPES", "DatasetType", "TokenizedDataset", "build_dataset"]


class TokenizedDataset(Dataset):
    """Map-style dataset of `{"tokens": [...], "labels": [...]}` samples."""

    def __init__(self, samples: Iterable[tuple[list[int], list[int]]] = ()) -> None:
        self._tokens = array("i")
        self._labels = array("i")
        self._offsets = array("q", [0])
        for tokens, labels in samples:
            self.append(tokens, labels)

    def append(self, tokens: list[int], labels: list[int]) -> None:
        if len(tokens) != len(labels):
            raise ValueError(f"tokens and labels differ in length: {len(tokens)} != {len(labels)}")
        self._tokens.extend(tokens)
        self._labels.extend(labels)
        self._offsets.append(len(self._tokens))

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample {index} out of range for {len(self)} samples")
        index %= len(self)
        start, end = self._offsets[index], self._offsets[index + 1]
        return {
            "tokens": self._tokens[start:end].tolist(),
            "labels": self._labels[start:end].tolist(),
        }

    def sample_len(self, index: int) -> int:
        return self._offsets[index + 1] - self._offsets[index]

    @property
    def num_tokens(self) -> int:
        return len(self._tokens)


def build_dataset(
    source: str,
    *,
    dataset_type: DatasetType,
    tokenizer: Tokenizer,
    max_seq_len: int,
    template: Union[str, InstructTemplate] = "alpaca",
    train_on_input: bool = False,
    column_map: Optional[dict[str, str]] = None,
    split: str = "train",
    split_key: str = "split",
    subset: Optional[str] = None,
    packed: bool = False,
    log: Optional[LogFn] = None,
    cache_dir: Optional[str] = None,
    num_proc: int = 0,
) -> Dataset:
    """Load, tokenize and (when `packed`) pack a dataset for training.

    `dataset_type`: "instruct" (instruction / input / output records rendered with
    `template`), "chat" (`messages` with role/content, or ShareGPT `conversations` with
    from/value, rendered by the tokenizer's chat format) or "text" (a `text` column, cut
    into `max_seq_len` chunks). `train_on_input=False` trains only on responses. `split_key`
    names the parameter `split` came from, for messages.

    With `cache_dir`, samples are tokenized once into memory-mapped arrays there (by
    `num_proc` processes, 0 = every core) and later runs with the same data and settings map
    them instead (finetune/data/cache.py); without it, they are tokenized into memory.
    """
    if dataset_type not in DATASET_TYPES:
        raise UserError(f"dataset_type '{dataset_type}' is unknown; choose one of {', '.join(DATASET_TYPES)}")
    if not isinstance(max_seq_len, int) or max_seq_len < 2:
        raise UserError(f"max_seq_len={max_seq_len!r} is too small; use at least 2 tokens")
    tmpl = get_template(template) if dataset_type == "instruct" else None
    spec = TokenizeSpec(dataset_type, max_seq_len, tmpl, train_on_input)
    if cache_dir is not None:
        return cached_dataset(
            source,
            spec=spec,
            tokenizer=tokenizer,
            column_map=column_map,
            split=split,
            split_key=split_key,
            subset=subset,
            packed=packed,
            cache_dir=cache_dir,
            num_proc=num_proc,
            log=log,
        )
    records = load_records(source, split=split, split_key=split_key, column_map=column_map, subset=subset)
    dataset = _tokenize(records, tokenizer, spec, rank_zero_log(log))
    if packed:
        return PackedDataset(dataset, max_seq_len=max_seq_len, pad_id=tokenizer.pad_id, log=log)
    return dataset


def _tokenize(records: Records, tokenizer: Tokenizer, spec: TokenizeSpec, report: LogFn) -> TokenizedDataset:
    dataset, stats = TokenizedDataset(), TokenizeStats()
    unit = "doc" if spec.dataset_type == "text" else "record"
    for i in tqdm(range(len(records)), desc="tokenizing", unit=unit, disable=not is_rank_zero()):
        for tokens, labels in tokenize_record(records[i], records.where(i), tokenizer, spec, stats):
            dataset.append(tokens, labels)
    report(summary(records.source, spec, stats, len(dataset), dataset.num_tokens))
    return dataset
