"""The tokenized-data cache: tokenize once, memory-map in every later run and every rank.

A cache entry is a folder named by a digest of everything that decides its tokens: the
source (its name, and each data file's size, modification time and a digest of sampled
blocks, or a Hub dataset's fingerprint), the split, subset and column map, the tokenizer
file, the dataset type, template, max_seq_len, train_on_input, packing, and the code that
tokenizes. A change to any of them names another folder, so a stale entry is never read.

An entry is built in a hidden temporary folder and renamed into place with a `complete`
marker inside, so a build killed half way leaves nothing a later run trusts; the next
build of that key clears the leftovers. One process builds under a file lock while the
others wait for it (on a node: local rank 0 takes the lock first), then every process
maps the same files: pages are shared through the page cache instead of each rank
holding its own copy of the data.

Files of an entry: `tokens.bin` (int32, samples end to end), `trained.bin` (a byte a token:
whether its label is the next token; the labels are rebuilt from it), `offsets.bin`
(int64, where each sample starts, plus the end), `rows.bin` (int64, packed data only:
the first sample of each row, plus the sample count) and `meta.json` (counts, and the
lines the run logs, replayed unchanged on reuse).
"""

import errno
import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch.distributed as dist
from torch.utils.data import Dataset

from finetune.data.build import TOKEN_DTYPE, default_num_proc, write_samples
from finetune.data.labels import IGNORE_INDEX, labels_from_flags
from finetune.data.packing import greedy_rows, packing_message
from finetune.data.reporting import LogFn, is_rank_zero, rank_zero_log
from finetune.data.sources import FILE_SUFFIXES, hub_dataset
from finetune.data.tokenize import TokenizeSpec, summary
from finetune.errors import UserError
from finetune.tokenizers import Tokenizer

CACHE_FORMAT = 2  # 2: labels kept as trained.bin flags
COMPLETE = "complete"
_SAMPLE_BLOCK = 1 << 18  # bytes per sampled block of a data file
_SAMPLE_BLOCKS = 16
# The modules whose code decides the tokens: an edit to any of them invalidates the cache.
_CODE = (
    "data/build.py",
    "data/labels.py",
    "data/packing.py",
    "data/sources.py",
    "data/templates.py",
    "data/tokenize.py",
    "data/transforms.py",
    "tokenizers",
)


def default_cache_dir() -> Path:
    """$FINETUNE_DATA_CACHE, else $XDG_CACHE_HOME/finetune/data, else ~/.cache/finetune/data."""
    if os.environ.get("FINETUNE_DATA_CACHE"):
        return Path(os.environ["FINETUNE_DATA_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "finetune" / "data"


def resolve_cache_dir(value: str) -> Path:
    """The folder `data_cache_dir` names (`auto`: the default)."""
    return default_cache_dir() if value == "auto" else Path(value).expanduser()


class CachedSamples(Dataset):
    """Map-style dataset of `{"tokens": [...], "labels": [...]}` samples read from a cache entry."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._open()

    def _open(self) -> None:
        self._tokens = np.memmap(self.folder / "tokens.bin", dtype=TOKEN_DTYPE, mode="r")
        self._trained = np.memmap(self.folder / "trained.bin", dtype=np.uint8, mode="r")
        self._offsets = np.memmap(self.folder / "offsets.bin", dtype=np.int64, mode="r")

    # DataLoader workers get the folder and map it again, rather than a pickled copy of the data.
    def __getstate__(self) -> dict[str, Any]:
        return {"folder": self.folder}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.folder = state["folder"]
        self._open()

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample {index} out of range for {len(self)} samples")
        index %= len(self)
        tokens, labels, _ = self.span(index, index + 1)
        return {"tokens": tokens.tolist(), "labels": labels.tolist()}

    def sample_len(self, index: int) -> int:
        return int(self._offsets[index + 1] - self._offsets[index])

    def span(self, first: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Tokens, labels and per-sample lengths of samples [first, stop), end to end."""
        offsets = np.asarray(self._offsets[first : stop + 1])
        start, end = int(offsets[0]), int(offsets[-1])
        tokens = self._tokens[start:end]
        return tokens, labels_from_flags(tokens, self._trained[start:end]), np.diff(offsets)

    @property
    def num_tokens(self) -> int:
        return len(self._tokens)


class CachedPackedRows(Dataset):
    """Rows of `max_seq_len` tokens packed from a cache entry's samples, exactly as
    `PackedDataset` packs them (finetune/data/packing.py), built on demand from the row index."""

    def __init__(self, folder: Path, *, max_seq_len: int, pad_id: int) -> None:
        self.samples = CachedSamples(folder)
        self.max_seq_len = max_seq_len
        self.pad_id = pad_id
        self._rows = np.memmap(Path(folder) / "rows.bin", dtype=np.int64, mode="r")
        self.num_samples = len(self.samples)

    def __getstate__(self) -> dict[str, Any]:
        return {"folder": self.samples.folder, "max_seq_len": self.max_seq_len, "pad_id": self.pad_id}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["folder"], max_seq_len=state["max_seq_len"], pad_id=state["pad_id"])  # type: ignore[misc]

    def __len__(self) -> int:
        return len(self._rows) - 1

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"row {index} out of range for {len(self)} rows")
        index %= len(self)
        tokens, labels, lengths = self.samples.span(int(self._rows[index]), int(self._rows[index + 1]))
        pad = self.max_seq_len - len(tokens)
        documents = len(lengths)
        position_ids = np.concatenate([np.arange(n) for n in lengths] + [np.arange(pad)])
        document_ids = np.concatenate([np.repeat(np.arange(documents), lengths), np.full(pad, documents)])
        return {
            "tokens": tokens.tolist() + [self.pad_id] * pad,
            "labels": labels.tolist() + [IGNORE_INDEX] * pad,
            "position_ids": position_ids.tolist(),
            "document_ids": document_ids.tolist(),
        }


def cached_dataset(
    source: str,
    *,
    spec: TokenizeSpec,
    tokenizer: Tokenizer,
    column_map: Optional[dict[str, str]],
    split: str,
    split_key: str,
    subset: Optional[str],
    packed: bool,
    cache_dir: str,
    num_proc: int,
    log: Optional[LogFn],
) -> Dataset:
    """The dataset `build_dataset` describes, read from its cache entry under `cache_dir`
    (built first when no complete entry exists)."""
    report = rank_zero_log(log)
    key = cache_key(source, spec, tokenizer, column_map, split, split_key, subset, packed)
    root = resolve_cache_dir(cache_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"cannot create the data cache folder {root} ({e.strerror}); set data_cache_dir to a writable folder"
        ) from None
    digest = _digest(key)
    folder = root / digest
    built = False
    with _build_turn(root / f"{digest}.lock"):
        if not (folder / COMPLETE).is_file():
            num_proc = num_proc or default_num_proc()
            began = time.perf_counter()
            _build(folder, key, source, spec, tokenizer, column_map, split, split_key, subset, packed, num_proc)
            built = True
            report(
                f"data cache: tokenized into {folder} in {time.perf_counter() - began:.1f}s with {num_proc} process(es)"
            )
        else:
            report(f"data cache: reusing {folder}")
    meta = json.loads((folder / "meta.json").read_text())
    for message in meta["messages"]:
        report(message)
    dataset: Dataset
    if packed:
        dataset = CachedPackedRows(folder, max_seq_len=spec.max_seq_len, pad_id=tokenizer.pad_id)
    else:
        dataset = CachedSamples(folder)
    dataset.built_here = built  # type: ignore[attr-defined]  # read by tests and benchmarks
    return dataset


def cache_key(
    source: str,
    spec: TokenizeSpec,
    tokenizer: Tokenizer,
    column_map: Optional[dict[str, str]],
    split: str,
    split_key: str,
    subset: Optional[str],
    packed: bool,
) -> dict[str, Any]:
    """Everything that decides the samples (and the messages about them) of a dataset."""
    template = spec.template
    return {
        "format": CACHE_FORMAT,
        "code": _code_digest(),
        "source": source,
        "data": _source_fingerprint(source, split, split_key, subset),
        "split": split,
        "subset": subset or None,
        "column_map": column_map or None,
        "dataset_type": spec.dataset_type,
        "max_seq_len": spec.max_seq_len,
        "train_on_input": spec.train_on_input,
        "template": None if template is None else [template.with_input, template.without_input],
        "tokenizer": _tokenizer_fingerprint(tokenizer),
        "packed": packed,
        "pad_id": tokenizer.pad_id if packed else None,
    }


def _digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def _code_digest() -> str:
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for name in _CODE:
        path = package / name
        for file in sorted(path.glob("*.py")) if path.is_dir() else [path]:
            digest.update(file.name.encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()[:16]


def _tokenizer_fingerprint(tokenizer: Tokenizer) -> dict[str, Any]:
    file = getattr(tokenizer, "path", None)
    if file is None or not Path(file).is_file():
        raise UserError(
            f"the {type(tokenizer).__name__} tokenizer has no file the data cache can be keyed by; "
            "load it with finetune.tokenizers.load_tokenizer, or set data_cache_dir=none"
        )
    return {
        "class": type(tokenizer).__name__,
        "family": tokenizer.family,
        "file": hashlib.sha256(Path(file).read_bytes()).hexdigest(),
        "ids": [tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.vocab_size],
    }


def _source_fingerprint(source: str, split: str, split_key: str, subset: Optional[str]) -> Any:
    path = Path(source).expanduser()
    if path.is_file():
        return [_file_fingerprint(path, path.name)]
    if path.is_dir():
        files = sorted(
            file
            for file in path.rglob("*")
            if file.is_file() and not any(part.startswith(".") for part in file.relative_to(path).parts)
        )
        return [_file_fingerprint(file, str(file.relative_to(path))) for file in files]
    if path.suffix.lower() in FILE_SUFFIXES or source.startswith((".", "/", "~")):
        return None  # missing: reading it says so
    return {"hub": hub_dataset(source, split, subset, split_key)._fingerprint}


def _file_fingerprint(path: Path, name: str) -> list[Any]:
    """Name, size, modification time and a digest of evenly spaced blocks of a file (all of a
    small one): a changed file is caught without reading gigabytes on every run."""
    stat = path.stat()
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        if stat.st_size <= _SAMPLE_BLOCK * _SAMPLE_BLOCKS:
            digest.update(f.read())
        else:
            last = stat.st_size - _SAMPLE_BLOCK
            for i in range(_SAMPLE_BLOCKS):
                f.seek(last * i // (_SAMPLE_BLOCKS - 1))
                digest.update(f.read(_SAMPLE_BLOCK))
    return [name, stat.st_size, stat.st_mtime_ns, digest.hexdigest()]


@contextmanager
def _build_turn(lock_path: Path) -> Iterator[None]:
    """Hold the entry's file lock. In a process group, each node's local rank 0 tries to take
    it before the others may (without blocking, so nodes sharing one cache folder cannot
    deadlock in the barrier); every process then waits on the lock for whoever builds."""
    group = dist.is_available() and dist.is_initialized()
    with open(lock_path, "a+b") as lock:
        held = False
        if not group or int(os.environ.get("LOCAL_RANK", "0")) == 0:
            held = _lock(lock, block=not group)
        if group:
            dist.barrier()
        if not held:
            _lock(lock, block=True)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _lock(lock: Any, *, block: bool) -> bool:
    try:
        fcntl.flock(lock, fcntl.LOCK_EX if block else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _build(
    folder: Path,
    key: dict[str, Any],
    source: str,
    spec: TokenizeSpec,
    tokenizer: Tokenizer,
    column_map: Optional[dict[str, str]],
    split: str,
    split_key: str,
    subset: Optional[str],
    packed: bool,
    num_proc: int,
) -> None:
    """Build the entry in a temporary folder and rename it into place (the lock is held)."""
    for leftover in folder.parent.glob(f".{folder.name}.*"):  # of a build that was killed
        shutil.rmtree(leftover, ignore_errors=True)
    if folder.exists():  # no marker: not ours to trust
        shutil.rmtree(folder)
    building = folder.parent / f".{folder.name}.{uuid.uuid4().hex[:8]}"
    building.mkdir()
    try:
        built = write_samples(
            building,
            source,
            spec=spec,
            tokenizer=tokenizer,
            column_map=column_map,
            split=split,
            split_key=split_key,
            subset=subset,
            num_proc=num_proc,
            show_progress=is_rank_zero(),
        )
        messages = [summary(built.source, spec, built.stats, built.num_samples, built.num_tokens)]
        if packed:
            lengths = _sample_lengths(building / "offsets.bin")
            rows = np.frombuffer(greedy_rows(lengths, spec.max_seq_len), dtype=np.int64)
            rows.tofile(building / "rows.bin")
            efficiency = built.num_tokens / ((len(rows) - 1) * spec.max_seq_len)
            messages.append(packing_message(built.num_samples, len(rows) - 1, spec.max_seq_len, efficiency))
        meta = {
            "key": key,
            "samples": built.num_samples,
            "tokens": built.num_tokens,
            "stats": built.stats.as_dict(),
            "messages": messages,
        }
        (building / "meta.json").write_text(json.dumps(meta, indent=1))
        for file in building.iterdir():
            _fsync(file)
        (building / COMPLETE).write_text("")
        _fsync(building / COMPLETE)
        os.rename(building, folder)
        _fsync(folder.parent)
    except OSError as e:
        shutil.rmtree(building, ignore_errors=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS):
            raise UserError(
                f"cannot write the data cache in {folder.parent} ({e.strerror}); free some space there, "
                "point data_cache_dir at another folder, or set data_cache_dir=none"
            ) from None
        raise
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise


def _sample_lengths(offsets_file: Path, block: int = 1 << 20) -> Iterator[int]:
    offsets = np.memmap(offsets_file, dtype=np.int64, mode="r")
    for start in range(0, len(offsets) - 1, block):
        yield from np.diff(offsets[start : start + block + 1]).tolist()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
