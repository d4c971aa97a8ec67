"""Reading records from local files, local dataset folders and the Hugging Face Hub.

Every loader returns `Records`: a list of dicts that remembers where each record came
from, so a bad value can be reported as "train.jsonl line 7" rather than "record 6".

Local formats: `.json` (a list of objects, or one object per line), `.jsonl`, `.csv`, `.tsv`, `.parquet` and
`.txt`. A `.txt` file is one record `{"text": <whole file>}`: text datasets are usually
documents, and splitting them on newlines would cut paragraphs apart. A folder is either a
dataset saved with `datasets.save_to_disk` (needs the optional `datasets` package) or a
folder of data files, read like a Hub dataset repository (finetune/data/folders.py picks its
files); any other name is looked up on the Hugging Face Hub.
"""

import codecs
import csv
import io
import json
import math
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Optional

from finetune.data.folders import canonical_split, split_files
from finetune.errors import UserError

FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".parquet", ".txt")
_HF_EXTRA = 'pip install "finetune[hf]"'
_SPLIT_RE = re.compile(r"^(\w[\w.-]*)(?:\[\s*(-?\d+%?)?\s*:\s*(-?\d+%?)?\s*\])?$")


class Records(list):
    """Records of one source, plus what is needed to name any one of them in a message."""

    def __init__(
        self, items: Iterable[dict], *, source: str, lines: Optional[list[int]] = None, first: int = 0
    ) -> None:
        super().__init__(items)
        self.source = source
        self.lines = lines  # line of each record in its file, when the format has lines
        self.first = first  # index in the source of the first record, when read in parts

    def where(self, index: int) -> str:
        """'<file> line N' or '<source> record N' (1-based) for the record at `index`."""
        if self.lines is not None:
            return f"{self.source} line {self.lines[index]}"
        return f"{self.source} record {self.first + index + 1}"

    def select(self, start: int, stop: int) -> "Records":
        lines = None if self.lines is None else self.lines[start:stop]
        return Records(self[start:stop], source=self.source, lines=lines, first=self.first + start)


def load_records(
    source: str,
    *,
    split: str = "train",
    column_map: Optional[dict[str, str]] = None,
    subset: Optional[str] = None,
    split_key: str = "split",
) -> Records:
    """Load every record of `source`'s `split`, renaming columns with `column_map`.

    `split` is a split name, optionally sliced like `train[:90%]`, `train[90%:]` or
    `train[:1000]`. A local file is its own "train" split. `column_map` maps the column
    name finetune expects to the user's name for it, e.g. `{"output": "answer"}`. `subset`
    is a Hub dataset's configuration (`main` for openai/gsm8k), or a subset of a local
    dataset folder (a README.md config or a subfolder). `split_key` is the parameter the
    split came from (`split`, `eval_split`), named in messages.
    """
    name, bounds = parse_split(split, split_key)
    subset = subset or None
    path = Path(source).expanduser()
    if path.is_file():
        check_file_split(source, split, subset, split_key)
        records = slice_records(read_file(path), bounds, f"{split_key} '{split}'")
    elif path.is_dir():
        records = slice_records(_read_folder(path, name, subset, split_key), bounds, f"{split_key} '{split}'")
    elif path.suffix.lower() in FILE_SUFFIXES or source.startswith((".", "/", "~")):
        raise UserError(f"dataset file {source} does not exist; check the path")
    else:
        records = _read_hub(source, split, subset, split_key)
    if not records:
        raise no_records(source, split, split_key)
    if column_map:
        records = rename_columns(records, column_map)
    return records


def check_file_split(source: str, split: str, subset: Optional[str], split_key: str) -> None:
    """A single file is one 'train' split without subsets."""
    refuse_subset(subset or None, f"{source}, a single file")
    if canonical_split(parse_split(split, split_key)[0]) != "train":
        raise UserError(
            f"{split_key} '{split}' asked of the file {source}, which is a single 'train' "
            f"split; use {split_key}='train' (optionally sliced, e.g. 'train[:90%]')"
        )


def no_records(source: str, split: str, split_key: str) -> UserError:
    return UserError(f"dataset {source} ({split_key} '{split}') has no records; point it at a file with data")


def parse_split(split: str, split_key: str = "split") -> tuple[str, tuple[Optional[str], Optional[str]]]:
    """'train[:90%]' -> ('train', (None, '90%'))."""
    match = _SPLIT_RE.match(split.strip())
    if match is None:
        raise UserError(
            f"{split_key} '{split}' is not understood; use a name like 'train' "
            "or a slice like 'train[:90%]', 'train[90%:]', 'train[:1000]'"
        )
    for bound in (match.group(2), match.group(3)):
        if bound is not None and bound.endswith("%") and abs(int(bound[:-1])) > 100:
            raise UserError(
                f"{split_key} '{split}' asks for {bound} of the records; a slice's percentages run from "
                "0% to 100% (e.g. 'train[:90%]')"
            )
    return match.group(1), (match.group(2), match.group(3))


def slice_records(records: Records, bounds: tuple[Optional[str], Optional[str]], asked: str = "the slice") -> Records:
    return records.select(*slice_range(bounds, len(records), asked, records.source))


def slice_range(
    bounds: tuple[Optional[str], Optional[str]], n: int, asked: str = "the slice", source: str = "the data"
) -> tuple[int, int]:
    """The [start, stop) record indices that a split's slice selects of `n` records; a count beyond
    the records there are is refused, not cut short."""
    for bound in bounds:
        if bound is not None and not bound.endswith("%") and abs(int(bound)) > n:
            raise UserError(
                f"{asked} reaches record {bound} of {source}, which has {n} records; "
                f"use a count up to {n}, or a percentage (e.g. '[:90%]')"
            )
    start, stop = slice(_bound(bounds[0], n), _bound(bounds[1], n)).indices(n)[:2]
    return start, max(start, stop)


def _bound(bound: Optional[str], n: int) -> Optional[int]:
    if bound is None:
        return None
    if bound.endswith("%"):
        # Round to the nearest record so that '[:90%]' and '[90%:]' always meet exactly.
        return math.floor(n * int(bound[:-1]) / 100 + 0.5)
    return int(bound)


def rename_columns(records: Records, column_map: dict[str, str]) -> Records:
    """Rename user columns to the names finetune expects (`{expected: user_name}`)."""
    if not isinstance(column_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in column_map.items()
    ):
        raise UserError(
            f"column_map must map column names to column names, got {column_map!r}; write it like {{output: answer}}"
        )
    renamed = set(column_map.values())
    out = []
    for i, record in enumerate(records):
        new = {k: v for k, v in record.items() if k not in renamed}
        for expected, actual in column_map.items():
            if actual not in record:
                raise UserError(
                    f"column '{actual}' (column_map {expected}: {actual}) is missing from "
                    f"{records.where(i)}; columns found: {', '.join(map(str, record))}; "
                    "fix column_map"
                )
            new[expected] = record[actual]
        out.append(new)
    return Records(out, source=records.source, lines=records.lines, first=records.first)


def read_file(path: Path) -> Records:
    """Read one local data file by its suffix."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(path)
    text = decode_utf8(path.read_bytes(), str(path))
    if suffix == ".json":
        return _read_json(text, str(path))
    if suffix == ".jsonl":
        return _read_jsonl(text, str(path))
    if suffix in (".csv", ".tsv"):
        return _read_csv(text, str(path), delimiter="\t" if suffix == ".tsv" else ",")
    if suffix == ".txt":
        return Records([{"text": text}] if text.strip() else [], source=str(path))
    raise UserError(f"dataset file {path} has an unsupported type '{suffix}'; use one of {', '.join(FILE_SUFFIXES)}")


def decode_utf8(data: bytes, name: str) -> str:
    """Decode UTF-8 (a leading byte-order mark is allowed), naming the first bad byte."""
    skip = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = skip + e.start
        line = data.count(b"\n", 0, offset) + 1
        raise UserError(
            f"{name} is not valid UTF-8 at byte offset {offset} (line {line}); re-save the file with UTF-8 encoding"
        ) from None


def _read_json(text: str, name: str) -> Records:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):
            # One object per line under a .json name, as datasets' to_json and pandas' lines=True write.
            return _read_jsonl(text, name)
        raise UserError(f"{name} line {e.lineno} column {e.colno} is not valid JSON ({e.msg}); fix the file") from None
    if not isinstance(data, list):
        raise UserError(
            f"{name} holds a JSON {_json_type(data)}, expected a list of records; "
            "write [{...}, {...}] or use .jsonl with one record per line"
        )
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise UserError(
                f"{name} record {i + 1} is a JSON {_json_type(item)}, expected an object; "
                'make each record an object like {"instruction": ...}'
            )
    return Records(data, source=name)


def _read_jsonl(text: str, name: str) -> Records:
    records, lines = [], []
    for lineno, item in jsonl_items(text, name):
        records.append(item)
        lines.append(lineno)
    return Records(records, source=name, lines=lines)


def jsonl_items(text: str, name: str, first_line: int = 1) -> Iterable[tuple[int, dict]]:
    """(line number, object) of each non-blank line of JSON Lines `text`, whose first line is
    line `first_line` of the file `name`."""
    # Only "\n" ends a line: str.splitlines() also splits on U+2028, U+2029 and U+0085, which
    # json.dumps(ensure_ascii=False) leaves raw inside strings.
    for lineno, line in enumerate(text.split("\n"), start=first_line):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(
                f"{name} line {lineno} column {e.colno} is not valid JSON ({e.msg}); "
                "each line must hold one JSON object"
            ) from None
        if not isinstance(item, dict):
            raise UserError(
                f"{name} line {lineno} is a JSON {_json_type(item)}, expected an object; "
                "each line must hold one JSON object"
            )
        yield lineno, item


def _read_csv(text: str, name: str, delimiter: str) -> Records:
    _allow_csv_fields_of(len(text))
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader, None)
        if header is None:
            return Records([], source=name, lines=[])
        records, lines = [], []
        first_line = reader.line_num + 1
        for row in reader:
            if row:
                if len(row) != len(header):
                    raise UserError(
                        f"{name} line {first_line} has {len(row)} fields but the header has "
                        f"{len(header)}; quote fields that contain '{delimiter}'"
                    )
                records.append(dict(zip(header, row)))
                lines.append(first_line)
            first_line = reader.line_num + 1
    except csv.Error as e:
        raise UserError(f"{name} line {reader.line_num} is not valid CSV ({e}); fix the file") from None
    return Records(records, source=name, lines=lines)


def _allow_csv_fields_of(size: int) -> None:
    """Raise the csv module's field limit (131,072 characters by default) to `size`: no
    field of a file is longer than the file, and valid data must not be refused."""
    if csv.field_size_limit() >= size:
        return
    try:
        csv.field_size_limit(size)
    except OverflowError:  # the limit is a C long, 32 bits on some platforms
        csv.field_size_limit(min(size, 2**31 - 1, sys.maxsize))


def _read_parquet(path: Path) -> Records:
    # pyarrow comes with the optional `datasets` extra and is slow to import: only parquet files need it.
    import pyarrow
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pyarrow.ArrowException, OSError) as e:
        raise UserError(f"cannot read {path} as Parquet ({_first_line(e)}); check the file") from None
    return Records(table.to_pylist(), source=str(path))


def _read_folder(path: Path, split: str, subset: Optional[str], split_key: str) -> Records:
    """A `save_to_disk` folder, or a folder of data files read like a Hub dataset repository."""
    if is_saved_dataset(path):
        refuse_subset(subset, f"{path}, a dataset saved with save_to_disk")
        return Records(saved_dataset(path, split, split_key).to_list(), source=str(path))
    files = split_files(path, split, subset=subset, split_key=split_key, suffixes=FILE_SUFFIXES)
    records, lines = [], []
    all_lines = True
    for file in files:
        part = read_file(file)
        records.extend(part)
        all_lines = all_lines and part.lines is not None
        lines.extend(part.lines or [])
    if len(files) == 1:
        return Records(records, source=str(files[0]), lines=lines if all_lines else None)
    return Records(records, source=f"{path} ({subset + ', ' if subset else ''}{split})")


def refuse_subset(subset: Optional[str], what: str) -> None:
    if subset is not None:
        raise UserError(
            f"dataset_subset={subset} was given for {what}; dataset_subset only applies to Hub "
            "datasets and dataset folders with subsets; unset it"
        )


def _import_datasets() -> Any:
    try:
        import datasets  # optional extra, slow to import: only Hub datasets and dataset folders need it
    except ImportError:
        raise UserError(f"reading Hugging Face datasets needs the 'datasets' package; run {_HF_EXTRA}") from None
    return datasets


def is_saved_dataset(path: Path) -> bool:
    """A folder written by `save_to_disk` (rather than a folder of data files)."""
    return (path / "dataset_dict.json").exists() or (path / "state.json").exists()


def saved_dataset(path: Path, split: str, split_key: str) -> Any:
    """The `datasets.Dataset` of a `save_to_disk` folder's split (memory-mapped, not read)."""
    datasets = _import_datasets()
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises many types for a damaged folder
        raise UserError(
            f"cannot load the saved dataset in {path} ({_first_line(e)}); save it again with Dataset.save_to_disk"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise UserError(
                f"saved dataset {path} has no split '{split}'; splits found: "
                f"{', '.join(loaded)}; pick one with {split_key}"
            )
        loaded = loaded[split]
    elif canonical_split(split) != "train":
        raise UserError(f"saved dataset {path} is a single split, asked for '{split}'; use {split_key}='train'")
    return loaded


def _read_hub(name: str, split: str, subset: Optional[str], split_key: str) -> Records:
    return Records(hub_dataset(name, split, subset, split_key).to_list(), source=name)


def hub_dataset(name: str, split: str, subset: Optional[str], split_key: str, *, streaming: bool = False) -> Any:
    """The `datasets.Dataset` of a Hub dataset's split (downloaded once, then read from
    datasets' own cache), or with `streaming` its `IterableDataset` (read over the network in
    order, nothing downloaded ahead)."""
    datasets = _import_datasets()
    try:
        return datasets.load_dataset(name, *([subset] if subset else []), split=split, streaming=streaming)
    except Exception as e:  # network, missing name, bad split or subset: all fixable by the user
        raise hub_error(e, name, split, subset, split_key) from None


def hub_error(error: BaseException, name: str, split: str, subset: Optional[str], split_key: str) -> UserError:
    which = f" subset '{subset}'" if subset else ""
    return UserError(
        f"cannot load dataset '{name}'{which} {split_key} '{split}' from the Hugging Face Hub "
        f"({_first_line(error)}); check the name, subset (dataset_subset) and {split_key}, "
        "or point to a local file"
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")
