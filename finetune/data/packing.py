"""Packing: many short samples per row of exactly `max_seq_len` tokens.

Rows carry `position_ids` that restart at 0 for every document and `document_ids` that
tell the model which tokens may attend to which, so a packed row trains exactly like its
documents would one by one, with fewer pad tokens. Labels are already shifted per sample
(the last label of each document is ignored), so no target crosses a document boundary.
"""

from array import array
from typing import Iterable, Optional, Sequence

from torch.utils.data import Dataset
from tqdm.auto import tqdm

from finetune.data.labels import IGNORE_INDEX
from finetune.data.reporting import LogFn, is_rank_zero, rank_zero_log

PACKED_FIELDS = ("tokens", "labels", "position_ids", "document_ids")


class PackedDataset(Dataset):
    """Samples of `dataset` packed greedily, in order, into rows of `max_seq_len` tokens.

    The tail of a row that the next sample does not fit into is padding: tokens `pad_id`,
    labels ignored, and a document id of its own so no real token attends to it.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        max_seq_len: int,
        pad_id: int,
        show_progress: Optional[bool] = None,
        log: Optional[LogFn] = None,
    ) -> None:
        self.max_seq_len = max_seq_len
        self.pad_id = pad_id
        self._fields = {name: array("i") for name in PACKED_FIELDS}
        self._row: dict[str, list[int]] = {name: [] for name in PACKED_FIELDS}
        self._num_real_tokens = 0
        self.num_samples = len(dataset)  # type: ignore[arg-type]
        show = is_rank_zero() if show_progress is None else show_progress
        for i in tqdm(range(self.num_samples), desc="packing", unit="sample", disable=not show):
            sample = dataset[i]
            self._add(sample["tokens"], sample["labels"])
        if self._row["tokens"]:
            self._close_row()
        rank_zero_log(log)(packing_message(self.num_samples, len(self), max_seq_len, self.efficiency))

    def _add(self, tokens: Sequence[int], labels: Sequence[int]) -> None:
        n = len(tokens)
        if n > self.max_seq_len:
            raise ValueError(f"a sample of {n} tokens does not fit max_seq_len={self.max_seq_len}")
        if len(self._row["tokens"]) + n > self.max_seq_len:
            self._close_row()
        row = self._row
        document = row["document_ids"][-1] + 1 if row["document_ids"] else 0
        row["tokens"].extend(tokens)
        row["labels"].extend(labels)
        row["position_ids"].extend(range(n))
        row["document_ids"].extend([document] * n)
        self._num_real_tokens += n

    def _close_row(self) -> None:
        row = self._row
        pad = self.max_seq_len - len(row["tokens"])
        if pad:
            row["tokens"].extend([self.pad_id] * pad)
            row["labels"].extend([IGNORE_INDEX] * pad)
            row["position_ids"].extend(range(pad))
            row["document_ids"].extend([row["document_ids"][-1] + 1] * pad)
        for name in PACKED_FIELDS:
            self._fields[name].extend(row[name])
            row[name] = []

    @property
    def efficiency(self) -> float:
        """Share of tokens that are real rather than padding."""
        total = len(self._fields["tokens"])
        return self._num_real_tokens / total if total else 0.0

    def __len__(self) -> int:
        return len(self._fields["tokens"]) // self.max_seq_len

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"row {index} out of range for {len(self)} rows")
        start = (index % len(self)) * self.max_seq_len
        end = start + self.max_seq_len
        return {name: self._fields[name][start:end].tolist() for name in PACKED_FIELDS}


def packing_message(num_samples: int, num_rows: int, max_seq_len: int, efficiency: float) -> str:
    return (
        f"packed {num_samples} samples into {num_rows} rows of {max_seq_len} tokens; "
        f"packing efficiency {efficiency:.1%} (non-pad tokens / all tokens)"
    )


def greedy_rows(lengths: Iterable[int], max_seq_len: int) -> array:
    """Where each row starts, as sample indices (and the sample count at the end): the rows
    `PackedDataset` fills, computed from sample lengths alone."""
    starts, used, total = array("q", [0]), 0, 0
    for index, n in enumerate(lengths):
        if n > max_seq_len:
            raise ValueError(f"a sample of {n} tokens does not fit max_seq_len={max_seq_len}")
        if used + n > max_seq_len:
            starts.append(index)
            used = 0
        used += n
        total = index + 1
    if total:
        starts.append(total)
    return starts
