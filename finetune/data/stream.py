"""Streaming: training samples tokenized while training, read from the source in order.

For data too large for the disk cache. The source (a JSON Lines file) is read from the
start; sample g of the stream goes to rank g % world_size, as the sampler deals an unshuffled
dataset, so a stream trains on the samples a cached, unshuffled run would, in the same
order. An epoch is `num_samples` samples per rank (max_steps_per_epoch steps), each epoch
continuing where the last stopped, wrapping to the start of the file at its end. A resumed run
finds its position again by reading the stream up to it (tokenizing what it skips), so the
rest of the run is exactly what the interrupted one would have seen.
"""

from pathlib import Path
from typing import Iterator, Optional

from torch.utils.data import IterableDataset

from finetune.data.sources import Records, check_file_split, jsonl_items, parse_split, rename_columns
from finetune.data.tokenize import TokenizeSpec, TokenizeStats, tokenize_record
from finetune.errors import UserError
from finetune.tokenizers import Tokenizer

_READ_BYTES = 1 << 20


class StreamedSamples(IterableDataset):
    """This rank's `{"tokens", "labels"}` samples of a JSON Lines file, in file order; also the
    sampler a training loop steers (`set_epoch`, `num_samples`)."""

    def __init__(
        self,
        path: Path,
        *,
        spec: TokenizeSpec,
        tokenizer: Tokenizer,
        column_map: Optional[dict[str, str]],
        rank: int,
        world_size: int,
        num_samples: int,
    ) -> None:
        self.path = path
        self.spec = spec
        self.tokenizer = tokenizer
        self.column_map = column_map
        self.rank = rank
        self.world_size = world_size
        self.num_samples = num_samples
        # Unknown until the stream is read through: a resume cannot check that the data kept its size.
        self.dataset_len: Optional[int] = None
        self.epoch = 0
        self.start_index = 0

    def set_epoch(self, epoch: int, start_index: int = 0) -> None:
        """Select the epoch; skip the first `start_index` samples of this rank's share of it."""
        if not 0 <= start_index <= self.num_samples:
            raise ValueError(f"start_index {start_index} is outside this rank's {self.num_samples} samples")
        self.epoch = epoch
        self.start_index = start_index

    def __len__(self) -> int:
        return self.num_samples - self.start_index

    def __iter__(self) -> Iterator[dict[str, list[int]]]:
        skip = self.epoch * self.num_samples + self.start_index  # of this rank's samples
        stop = (self.epoch + 1) * self.num_samples
        mine = 0
        for index, (tokens, labels) in enumerate(self._samples()):
            if index % self.world_size != self.rank:
                continue
            if mine >= skip:
                yield {"tokens": tokens, "labels": labels}
            mine += 1
            if mine >= stop:
                return

    def _samples(self) -> Iterator[tuple[list[int], list[int]]]:
        """Every sample of the file, over and over."""
        while True:
            found = False
            for record, where in self._records():
                for sample in tokenize_record(record, where, self.tokenizer, self.spec, TokenizeStats()):
                    found = True
                    yield sample
            if not found:
                raise UserError(f"dataset {self.path} has no sample to train on; point data_streaming at data")

    def _records(self) -> Iterator[tuple[dict, str]]:
        name, line, offset = str(self.path), 1, 0
        with open(self.path, "rb") as f:
            pending = b""
            while True:
                block = f.read(_READ_BYTES)
                data = pending + block
                cut = data.rfind(b"\n") + 1 if block else len(data)
                pending = data[cut:]
                text = _decode(data[:cut], name, offset, line)
                items = list(jsonl_items(text, name, line))
                line += data.count(b"\n", 0, cut)
                offset += cut
                records = Records([item for _, item in items], source=name, lines=[n for n, _ in items])
                if self.column_map:
                    records = rename_columns(records, self.column_map)
                yield from ((record, records.where(i)) for i, record in enumerate(records))
                if not block:
                    return


def _decode(data: bytes, name: str, offset: int, first_line: int) -> str:
    """Text of the bytes at `offset` of the file, naming a bad byte as reading the whole file would."""
    skip = 3 if offset == 0 and data.startswith(b"\xef\xbb\xbf") else 0
    try:
        return data[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + data.count(b"\n", 0, skip + e.start)
        raise UserError(
            f"{name} is not valid UTF-8 at byte offset {offset + skip + e.start} (line {line}); "
            "re-save the file with UTF-8 encoding"
        ) from None


def streamed_samples(
    source: str,
    *,
    spec: TokenizeSpec,
    tokenizer: Tokenizer,
    column_map: Optional[dict[str, str]],
    split: str,
    split_key: str,
    rank: int,
    world_size: int,
    num_samples: int,
) -> StreamedSamples:
    """The stream of a local JSON Lines file's samples (streaming reads no other source yet)."""
    path = Path(source).expanduser()
    if not (path.is_file() and path.suffix.lower() == ".jsonl"):
        raise UserError(
            f"data_streaming reads a local .jsonl file, and dataset={source} is not one; "
            "convert the data to JSON Lines or set data_streaming=false"
        )
    check_file_split(source, split, None, split_key)
    if parse_split(split, split_key)[1] != (None, None):
        raise UserError(
            f"data_streaming reads the whole file in order and cannot slice it ({split_key}={split}); "
            f"use {split_key}=train or set data_streaming=false"
        )
    return StreamedSamples(
        path,
        spec=spec,
        tokenizer=tokenizer,
        column_map=column_map,
        rank=rank,
        world_size=world_size,
        num_samples=num_samples,
    )
