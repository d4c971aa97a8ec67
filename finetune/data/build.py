"""Tokenizing a dataset into flat arrays on disk, in parallel over chunks of its source.

The source is cut into chunks that worker processes tokenize independently; their pieces
come back in source order and are appended to `tokens.bin` (int32) and `trained.bin` (a
byte a token: whether it has a target; finetune/data/labels.py) as they arrive, so the
samples are the same, in the same order, whatever the number of processes, and memory
holds a few chunks rather than the dataset.

A single JSON Lines file is cut into byte ranges that each worker reads and parses itself:
no record crosses a process boundary, and a run holds no record of the file in the parent.
Hub datasets and `save_to_disk` folders are Arrow tables memory-mapped by `datasets`: each
worker converts only its own rows. Every other source (other file types, dataset folders)
is loaded into memory and its records are tokenized in ranges by the workers.
"""

import ctypes
import multiprocessing
import os
import signal
import sys
from array import array
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
from tqdm.auto import tqdm

from finetune.data.labels import trained_flags
from finetune.data.sources import (
    FILE_SUFFIXES,
    Records,
    check_file_split,
    hub_dataset,
    is_saved_dataset,
    jsonl_items,
    load_records,
    no_records,
    parse_split,
    refuse_subset,
    rename_columns,
    saved_dataset,
    slice_range,
)
from finetune.data.tokenize import TokenizeSpec, TokenizeStats, tokenize_record
from finetune.errors import UserError
from finetune.tokenizers import Tokenizer

CHUNK_BYTES = 4 << 20  # of a JSON Lines file per task
CHUNK_RECORDS = 2048  # of loaded records per task
TOKEN_DTYPE = np.int32


@dataclass
class Piece:
    """What one chunk tokenized to."""

    tokens: np.ndarray
    trained: np.ndarray  # uint8 per token: 1 where its label is the next token
    lengths: np.ndarray  # tokens of each sample
    stats: TokenizeStats
    size: int  # bytes or records of the source it covered, for the progress bar


@dataclass
class Built:
    """What `write_samples` wrote: counts for the report."""

    source: str  # the name messages use
    stats: TokenizeStats
    num_samples: int
    num_tokens: int


@dataclass
class _Job:
    """What every task of one build reads. Set in the parent before the workers fork, so the
    tokenizer and loaded records reach them without being pickled."""

    tokenizer: Tokenizer
    spec: TokenizeSpec
    column_map: Optional[dict[str, str]]
    name: str = ""
    path: Optional[Path] = None  # a JSON Lines file read by byte ranges
    records: Optional[Records] = None  # loaded records read by index ranges
    table: Any = None  # a `datasets.Dataset` read by row ranges


@dataclass(frozen=True)
class _ByteTask:
    """A byte range of the JSON Lines file and where it stands in the file."""

    start: int
    stop: int
    first_line: int  # line number of its first line
    first_record: int  # index of its first record (only counted for a sliced split)
    window: tuple[int, int]  # the file's records the split keeps


_JOB: Optional[_Job] = None


def default_num_proc() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def write_samples(
    folder: Path,
    source: str,
    *,
    spec: TokenizeSpec,
    tokenizer: Tokenizer,
    column_map: Optional[dict[str, str]],
    split: str,
    split_key: str,
    subset: Optional[str],
    num_proc: int,
    show_progress: bool,
) -> Built:
    """Tokenize `source` into `folder`/tokens.bin and trained.bin with `num_proc` processes."""
    num_proc = num_proc or default_num_proc()
    path = Path(source).expanduser()
    if path.is_file() and path.suffix.lower() == ".jsonl":
        check_file_split(source, split, subset, split_key)
        job = _Job(tokenizer, spec, column_map, name=str(path), path=path)
        ranges = _byte_ranges(path, CHUNK_BYTES)
        sliced = parse_split(split, split_key)[1] != (None, None)
        with _shared(job), _workers(num_proc, len(ranges)) as run:
            counted = list(run(_count_records if sliced else _count_lines, ranges))
            window = (0, 2**62)
            if sliced:
                total = sum(n for _, n in counted)
                window = slice_range(parse_split(split, split_key)[1], total, f"{split_key} '{split}'", source)
            tasks, first_line, first_record = [], 1, 0
            for (start, stop), (lines, records) in zip(ranges, counted):
                tasks.append(_ByteTask(start, stop, first_line, first_record, window))
                first_line, first_record = first_line + lines, first_record + records
            built = _write(folder, run(_tokenize_bytes, tasks), job.name, path.stat().st_size, "B", show_progress)
        if not built.stats.records:
            raise no_records(source, split, split_key)
        return built
    unit = "doc" if spec.dataset_type == "text" else "record"
    table = _arrow_table(source, split, subset, split_key)
    if table is not None:
        start, stop = table.window
        job = _Job(tokenizer, spec, column_map, name=table.name, table=table.rows)
        ranges = [(i, min(i + CHUNK_RECORDS, stop)) for i in range(start, stop, CHUNK_RECORDS)]
        if not ranges:
            raise no_records(source, split, split_key)
        with _shared(job), _workers(num_proc, len(ranges)) as run:
            return _write(folder, run(_tokenize_rows, ranges), job.name, stop - start, unit, show_progress)
    records = load_records(source, split=split, split_key=split_key, column_map=column_map, subset=subset)
    job = _Job(tokenizer, spec, None, name=records.source, records=records)
    ranges = [(start, min(start + CHUNK_RECORDS, len(records))) for start in range(0, len(records), CHUNK_RECORDS)]
    with _shared(job), _workers(num_proc, len(ranges)) as run:
        return _write(folder, run(_tokenize_records, ranges), job.name, len(records), unit, show_progress)


@dataclass
class _ArrowTable:
    name: str  # as messages name the source
    rows: Any  # datasets.Dataset
    window: tuple[int, int]  # the rows the split keeps


def _arrow_table(source: str, split: str, subset: Optional[str], split_key: str) -> Optional[_ArrowTable]:
    """A Hub dataset's or `save_to_disk` folder's table (None for other sources)."""
    path = Path(source).expanduser()
    if path.is_dir() and is_saved_dataset(path):
        refuse_subset(subset, f"{path}, a dataset saved with save_to_disk")
        name, bounds = parse_split(split, split_key)
        rows = saved_dataset(path, name, split_key)
        return _ArrowTable(str(path), rows, slice_range(bounds, len(rows), f"{split_key} '{split}'", str(path)))
    if path.exists() or path.suffix.lower() in FILE_SUFFIXES or source.startswith((".", "/", "~")):
        return None
    rows = hub_dataset(source, split, subset, split_key)  # datasets slices the split itself
    return _ArrowTable(source, rows, (0, len(rows)))


def _write(folder: Path, pieces: Iterator[Piece], name: str, total: int, unit: str, show_progress: bool) -> Built:
    """Append each piece to tokens.bin and trained.bin, and where each sample ends to offsets.bin
    (nothing per sample stays in memory: at 4M samples an index is 32 MB a copy)."""
    stats, num_samples, num_tokens = TokenizeStats(), 0, 0
    progress = tqdm(total=total, desc="tokenizing", unit=unit, unit_scale=unit == "B", disable=not show_progress)
    files = {name: open(folder / f"{name}.bin", "wb") for name in ("tokens", "trained", "offsets")}
    try:
        np.zeros(1, np.int64).tofile(files["offsets"])
        for piece in pieces:
            piece.tokens.tofile(files["tokens"])
            piece.trained.tofile(files["trained"])
            (np.cumsum(piece.lengths) + num_tokens).tofile(files["offsets"])
            num_samples += len(piece.lengths)
            num_tokens += len(piece.tokens)
            stats.merge(piece.stats)
            progress.update(piece.size)
    finally:
        for file in files.values():
            file.close()
    progress.close()
    return Built(name, stats, num_samples, num_tokens)


@contextmanager
def _shared(job: _Job) -> Iterator[None]:
    global _JOB
    _JOB = job
    try:
        yield
    finally:
        _JOB = None


@contextmanager
def _workers(num_proc: int, tasks: int) -> Iterator[Callable[[Callable, list], Iterator[Any]]]:
    """`run(fn, tasks)` -> fn's results in task order: in this process for one task or one
    process, else in a pool of forked processes (which inherit the job without pickling)."""
    processes = min(num_proc, tasks)
    if processes <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        yield lambda fn, items: map(fn, items)
        return
    with multiprocessing.get_context("fork").Pool(processes, initializer=_worker_signals) as pool:
        yield lambda fn, items: pool.imap(fn, items)


def _worker_signals() -> None:
    """Signals in a build worker: SIGTERM kills it, SIGINT is the parent's to handle, and the
    worker dies with its parent.

    A forked worker inherits the run's Python SIGTERM handler, which raises an exception the
    pool catches between tasks; the worker then lives on, waiting for a task that never comes,
    and the pool's exit (which ends its workers with SIGTERM) waits for it forever. A worker
    left behind by a killed build would also hold the cache entry's lock (inherited with the
    parent's files) and keep the next run waiting."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which ends the pool
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before the line above ran
            os._exit(1)


def _byte_ranges(path: Path, size: int) -> list[tuple[int, int]]:
    """[start, stop) byte ranges of about `size` bytes, each ending just after a newline."""
    total = path.stat().st_size
    starts = [0]
    with open(path, "rb") as f:
        while starts[-1] + size < total:
            f.seek(starts[-1] + size)
            f.readline()
            if f.tell() >= total:
                break
            starts.append(f.tell())
    return list(zip(starts, starts[1:] + [total]))


def _read_range(path: Path, start: int, stop: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(stop - start)


def _count_lines(byte_range: tuple[int, int]) -> tuple[int, int]:
    assert _JOB is not None and _JOB.path is not None
    return _read_range(_JOB.path, *byte_range).count(b"\n"), 0


def _count_records(byte_range: tuple[int, int]) -> tuple[int, int]:
    """(newlines, records) of a byte range: what a sliced split needs to place its window."""
    assert _JOB is not None and _JOB.path is not None
    data = _read_range(_JOB.path, *byte_range)
    # A bad byte is reported, with its line, when the range is tokenized.
    text = data.decode("utf-8", errors="replace")
    records = sum(1 for line in text.split("\n") if line.removesuffix("\r").strip())
    return data.count(b"\n"), records


def _decode(data: bytes, start: int, first_line: int, name: str) -> str:
    """UTF-8 text of the bytes at offset `start` of the file, naming the file's first bad byte
    as reading the whole file would (a leading byte-order mark is allowed)."""
    skip = 3 if start == 0 and data.startswith(b"\xef\xbb\xbf") else 0
    try:
        return data[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = skip + e.start
        line = first_line + data.count(b"\n", 0, offset)
        raise UserError(
            f"{name} is not valid UTF-8 at byte offset {start + offset} (line {line}); "
            "re-save the file with UTF-8 encoding"
        ) from None


def _tokenize_bytes(task: _ByteTask) -> Piece:
    """Parse and tokenize one byte range of the JSON Lines file."""
    job = _JOB
    assert job is not None and job.path is not None
    text = _decode(_read_range(job.path, task.start, task.stop), task.start, task.first_line, job.name)
    items, lines = [], []
    low, high = task.window
    for number, (lineno, item) in enumerate(jsonl_items(text, job.name, task.first_line), start=task.first_record):
        if low <= number < high:
            items.append(item)
            lines.append(lineno)
    records = Records(items, source=job.name, lines=lines)
    if job.column_map:
        records = rename_columns(records, job.column_map)
    return _tokenize(records, range(len(records)), task.stop - task.start)


def _tokenize_records(index_range: tuple[int, int]) -> Piece:
    assert _JOB is not None and _JOB.records is not None
    return _tokenize(_JOB.records, range(*index_range), index_range[1] - index_range[0])


def _tokenize_rows(index_range: tuple[int, int]) -> Piece:
    """Convert and tokenize rows [start, stop) of the Arrow table."""
    job = _JOB
    assert job is not None and job.table is not None
    start, stop = index_range
    columns = job.table[start:stop]
    rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
    records = Records(rows, source=job.name, first=start)
    if job.column_map:
        records = rename_columns(records, job.column_map)
    return _tokenize(records, range(len(records)), stop - start)


def _tokenize(records: Records, indices: range, size: int) -> Piece:
    assert _JOB is not None
    tokens, labels, lengths = array("i"), array("i"), array("q")
    stats = TokenizeStats()
    for i in indices:
        for sample_tokens, sample_labels in tokenize_record(
            records[i], records.where(i), _JOB.tokenizer, _JOB.spec, stats
        ):
            tokens.extend(sample_tokens)
            labels.extend(sample_labels)
            lengths.append(len(sample_tokens))
    token_array = np.frombuffer(tokens, dtype=TOKEN_DTYPE) if tokens else np.zeros(0, TOKEN_DTYPE)
    length_array = np.frombuffer(lengths, dtype=np.int64) if lengths else np.zeros(0, np.int64)
    label_array = np.frombuffer(labels, dtype=TOKEN_DTYPE) if labels else np.zeros(0, TOKEN_DTYPE)
    return Piece(token_array, trained_flags(token_array, label_array, length_array), length_array, stats, size)
