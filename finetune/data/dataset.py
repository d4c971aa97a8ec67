"""Datasets of tokenized samples, and `build_dataset`, the one entry point recipes use.

Records are tokenized once, up front: problems in the data surface before training
starts, the too-long samples can be counted and reported once, and DataLoader workers
never need the tokenizer. Samples are kept in flat int arrays (a Python list of ints costs
about 9x more memory).
"""

from array import array
from dataclasses import dataclass
from typing import Iterable, Literal, Optional, Union

from torch.utils.data import Dataset
from tqdm.auto import tqdm

from finetune.data.labels import has_targets, shifted_labels, truncate
from finetune.data.packing import PackedDataset
from finetune.data.reporting import LogFn, is_rank_zero, rank_zero_log
from finetune.data.sources import Records, load_records
from finetune.data.templates import InstructTemplate, get_template
from finetune.data.transforms import chat_messages, text_chunks, tokenize_instruct
from finetune.errors import UserError
from finetune.tokenizers import Tokenizer

DATASET_TYPES = ("instruct", "chat", "text")
DatasetType = Literal[DATASET_TYPES]  # type: ignore[valid-type]  # one list: Params reads this too


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


@dataclass
class TokenizeStats:
    """What tokenization did to the records, for the one report at start."""

    records: int = 0
    truncated: int = 0
    longest: int = 0
    no_targets: int = 0


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
) -> Dataset:
    """Load, tokenize and (when `packed`) pack a dataset for training.

    `dataset_type`: "instruct" (instruction / input / output records rendered with
    `template`), "chat" (`messages` with role/content, or ShareGPT `conversations` with
    from/value, rendered by the tokenizer's chat format) or "text" (a `text` column, cut
    into `max_seq_len` chunks). `train_on_input=False` trains only on responses. `split_key`
    names the parameter `split` came from, for messages.
    """
    if dataset_type not in DATASET_TYPES:
        raise UserError(f"dataset_type '{dataset_type}' is unknown; choose one of {', '.join(DATASET_TYPES)}")
    if not isinstance(max_seq_len, int) or max_seq_len < 2:
        raise UserError(f"max_seq_len={max_seq_len!r} is too small; use at least 2 tokens")
    records = load_records(source, split=split, split_key=split_key, column_map=column_map, subset=subset)
    report = rank_zero_log(log)
    if dataset_type == "text":
        dataset = _tokenize_text(records, tokenizer, max_seq_len, report)
    else:
        tmpl = get_template(template) if dataset_type == "instruct" else None
        dataset = _tokenize_turns(records, tokenizer, max_seq_len, tmpl, train_on_input, report)
    if packed:
        return PackedDataset(dataset, max_seq_len=max_seq_len, pad_id=tokenizer.pad_id, log=log)
    return dataset


def _tokenize_turns(
    records: Records,
    tokenizer: Tokenizer,
    max_seq_len: int,
    template: Optional[InstructTemplate],
    train_on_input: bool,
    report: LogFn,
) -> TokenizedDataset:
    """Instruct records (with `template`) or chat records (without), truncated and shifted."""
    dataset, stats = TokenizedDataset(), TokenizeStats(records=len(records))
    progress = tqdm(range(len(records)), desc="tokenizing", unit="record", disable=not is_rank_zero())
    for i in progress:
        where = records.where(i)
        if template is not None:
            tokens, mask = tokenize_instruct(records[i], where, tokenizer, template, train_on_input)
        else:
            messages = chat_messages(records[i], where, train_on_input)
            tokens, mask = tokenizer.tokenize_messages(messages, add_eos=True)
        if len(tokens) > max_seq_len:
            stats.truncated += 1
            stats.longest = max(stats.longest, len(tokens))
            prompt = _prompt_mask(records[i], where, tokenizer, template) if train_on_input else None
            tokens, mask = truncate(tokens, mask, max_seq_len, prompt)
        labels = shifted_labels(tokens, mask)
        if not has_targets(labels):
            stats.no_targets += 1
            continue
        dataset.append(tokens, labels)
    _report_turns(records, dataset, stats, max_seq_len, report)
    return dataset


def _prompt_mask(record: dict, where: str, tokenizer: Tokenizer, template: Optional[InstructTemplate]) -> list[bool]:
    """True on the prompt tokens of a record (what train_on_input=False would mask): where
    truncation must not teach the closing token."""
    if template is not None:
        return tokenize_instruct(record, where, tokenizer, template, train_on_input=False)[1]
    return tokenizer.tokenize_messages(chat_messages(record, where, train_on_input=False), add_eos=True)[1]


def _report_turns(
    records: Records,
    dataset: TokenizedDataset,
    stats: TokenizeStats,
    max_seq_len: int,
    report: LogFn,
) -> None:
    if not len(dataset):
        raise UserError(
            f"no sample of {records.source} has a token to learn from after masking and "
            f"truncation to max_seq_len={max_seq_len}; raise max_seq_len or unmask some turns"
        )
    message = f"dataset {records.source}: {len(dataset)} samples, {dataset.num_tokens} tokens"
    if stats.truncated:
        message += (
            f"; {stats.truncated} of {stats.records} samples were longer than "
            f"max_seq_len={max_seq_len} and were truncated (longest {stats.longest} tokens)"
        )
    if stats.no_targets:
        message += f"; {stats.no_targets} samples with nothing left to learn were skipped"
    report(message)


def _tokenize_text(records: Records, tokenizer: Tokenizer, max_seq_len: int, report: LogFn) -> TokenizedDataset:
    """Every token of every document is a target; long documents become several samples."""
    dataset = TokenizedDataset()
    progress = tqdm(range(len(records)), desc="tokenizing", unit="doc", disable=not is_rank_zero())
    for i in progress:
        for chunk in text_chunks(records[i], records.where(i), tokenizer, max_seq_len):
            dataset.append(chunk, shifted_labels(chunk, [False] * len(chunk)))
    if not len(dataset):
        raise UserError(f"dataset {records.source} holds no text; add text to its 'text' column")
    report(
        f"dataset {records.source}: {len(records)} documents -> {len(dataset)} samples of at "
        f"most max_seq_len={max_seq_len} tokens, {dataset.num_tokens} tokens"
    )
    return dataset
