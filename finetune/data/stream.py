"""Streaming: training samples tokenized while training, read from the source in order.

For data too large for the disk cache. The source is read from its start, in order: a JSON
Lines or Parquet file a block at a time, a dataset folder file by file (as its split lists
them), a `save_to_disk` folder row by row, and a Hub dataset through `datasets`' own streaming
(nothing is downloaded ahead). Sample g of the stream goes to rank g % world_size, as the
sampler deals an unshuffled dataset, so a stream trains on the samples a cached, unshuffled run
would, in the same order. An epoch is `num_samples` samples per rank (max_steps_per_epoch
steps), each epoch continuing where the last stopped, wrapping to the start of the source at
its end. A resumed run finds its position again by reading the stream up to it (tokenizing
what it skips), so the rest of the run is exactly what the interrupted one would have seen.
"""

from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from torch.utils.data import IterableDataset

from finetune.data.folders import split_files
from finetune.data.sources import (
    FILE_SUFFIXES,
    Records,
    check_file_split,
    hub_dataset,
    hub_error,
    is_saved_dataset,
    jsonl_items,
    parse_split,
    read_file,
    refuse_subset,
    rename_columns,
    saved_dataset,
)
from finetune.data.tokenize import TokenizeSpec, TokenizeStats, tokenize_record
from finetune.errors import UserError
from finetune.tokenizers import Tokenizer

_READ_BYTES = 1 << 20  # of a JSON Lines file per block
_BLOCK_ROWS = 1024  # of a Parquet file, a saved dataset or a Hub stream per block

RecordBlocks = Callable[[], Iterator[Records]]  # the source's records from its start, a block at a time


class StreamedSamples(IterableDataset):
    """This rank's `{"tokens", "labels"}` samples of a source, in its order; also the sampler a
    training loop steers (`set_epoch`, `num_samples`)."""

    def __init__(
        self,
        name: str,
        blocks: RecordBlocks,
        *,
        spec: TokenizeSpec,
        tokenizer: Tokenizer,
        column_map: Optional[dict[str, str]],
        rank: int,
        world_size: int,
        num_samples: int,
    ) -> None:
        self.name = name
        self.blocks = blocks
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
        """Every sample of the source, over and over."""
        while True:
            found = False
            for records in self.blocks():
                if self.column_map:
                    records = rename_columns(records, self.column_map)
                for i, record in enumerate(records):
                    for sample in tokenize_record(record, records.where(i), self.tokenizer, self.spec, TokenizeStats()):
                        found = True
                        yield sample
            if not found:
                raise UserError(f"dataset {self.name} has no sample to train on; point data_streaming at data")


def streamed_samples(
    source: str,
    *,
    spec: TokenizeSpec,
    tokenizer: Tokenizer,
    column_map: Optional[dict[str, str]],
    split: str,
    subset: Optional[str] = None,
    split_key: str,
    rank: int,
    world_size: int,
    num_samples: int,
) -> StreamedSamples:
    """The stream of `source`'s `split`: a local file, a dataset folder or a Hub dataset."""
    name, bounds = parse_split(split, split_key)
    if bounds != (None, None):
        raise UserError(
            f"data_streaming reads the whole {split_key} in order and cannot slice it ({split_key}={split}); "
            f"use {split_key}={name} or set data_streaming=false"
        )
    subset = subset or None
    path = Path(source).expanduser()
    blocks: RecordBlocks
    if path.is_file():
        check_file_split(source, split, subset, split_key)
        blocks = _file_blocks_reader(path)
    elif path.is_dir() and is_saved_dataset(path):
        refuse_subset(subset, f"{path}, a dataset saved with save_to_disk")
        blocks = _rows_reader(saved_dataset(path, name, split_key), str(path))
    elif path.is_dir():
        blocks = _folder_reader(split_files(path, name, subset=subset, split_key=split_key, suffixes=FILE_SUFFIXES))
    elif path.suffix.lower() in FILE_SUFFIXES or source.startswith((".", "/", "~")):
        raise UserError(f"dataset file {source} does not exist; check the path")
    else:
        stream = hub_dataset(source, name, subset, split_key, streaming=True)
        blocks = _rows_reader(stream, source, lambda e: hub_error(e, source, split, subset, split_key))
    return StreamedSamples(
        source,
        blocks,
        spec=spec,
        tokenizer=tokenizer,
        column_map=column_map,
        rank=rank,
        world_size=world_size,
        num_samples=num_samples,
    )


def _file_blocks_reader(path: Path) -> RecordBlocks:
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        read_file(path)  # names the supported types
    return lambda: _file_blocks(path)


def _file_blocks(path: Path) -> Iterator[Records]:
    """JSON Lines and Parquet a block at a time; the other types are read whole, file by file."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _jsonl_blocks(path)
    elif suffix == ".parquet":
        yield from _parquet_blocks(path)
    else:
        yield read_file(path)


def _folder_reader(files: list[Path]) -> RecordBlocks:
    def blocks() -> Iterator[Records]:
        for file in files:
            yield from _file_blocks(file)

    return blocks


def _jsonl_blocks(path: Path) -> Iterator[Records]:
    name, line, offset = str(path), 1, 0
    with open(path, "rb") as f:
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
            yield Records([item for _, item in items], source=name, lines=[n for n, _ in items])
            if not block:
                return


def _parquet_blocks(path: Path) -> Iterator[Records]:
    # pyarrow comes with the optional `datasets` extra and is slow to import: only Parquet needs it.
    import pyarrow
    import pyarrow.parquet as pq

    first = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=_BLOCK_ROWS):
            rows = batch.to_pylist()
            yield Records(rows, source=str(path), first=first)
            first += len(rows)
    except (pyarrow.ArrowException, OSError) as e:
        raise UserError(f"cannot read {path} as Parquet ({str(e).strip().splitlines()[0]}); check the file") from None


def _rows_reader(rows: Any, name: str, error: Optional[Callable[[BaseException], UserError]] = None) -> RecordBlocks:
    """Blocks of a `datasets` Dataset or IterableDataset, in its order. `error` turns a failure
    while reading (a stream's network) into the line a user gets."""

    def blocks() -> Iterator[Records]:
        first, block = 0, []
        iterator = iter(rows)
        while True:
            try:
                row = next(iterator, None)
            except Exception as e:  # datasets raises many types from the network and its readers
                if error is None:
                    raise
                raise error(e) from None
            if row is not None:
                block.append(row)
            if block and (row is None or len(block) == _BLOCK_ROWS):
                yield Records(block, source=name, first=first)
                first, block = first + len(block), []
            if row is None:
                return

    return blocks


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
