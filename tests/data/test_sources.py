"""Loading records: every local format, dataset folders, splits and column_map."""

import csv
import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from finetune.data import load_records
from finetune.errors import UserError
from tests.data.helpers import ALPACA_RECORDS, write_jsonl


def write_json(path: Path, records: list[dict]) -> Path:
    path.write_text(json.dumps(records, indent=2), encoding="utf-8")
    return path


def write_csv(path: Path, records: list[dict]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    return path


def write_parquet(path: Path, records: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(records), path)
    return path


WRITERS = {"json": write_json, "jsonl": write_jsonl, "csv": write_csv, "parquet": write_parquet}


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_every_file_format_loads_the_same_records(tmp_path: Path, fmt: str) -> None:
    path = WRITERS[fmt](tmp_path / f"data.{fmt}", ALPACA_RECORDS)
    assert load_records(str(path)) == ALPACA_RECORDS


def test_hf_saved_dataset_folder_loads_the_same_records(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(ALPACA_RECORDS).save_to_disk(str(tmp_path / "saved"))
    assert load_records(str(tmp_path / "saved")) == ALPACA_RECORDS


def test_hf_saved_dataset_dict_selects_the_split(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    splits = {"train": ALPACA_RECORDS[:2], "test": ALPACA_RECORDS[2:]}
    datasets.DatasetDict(
        {name: datasets.Dataset.from_list(rows) for name, rows in splits.items()}
    ).save_to_disk(str(tmp_path / "saved"))
    assert load_records(str(tmp_path / "saved"), split="test") == ALPACA_RECORDS[2:]
    with pytest.raises(UserError, match=r"has no split 'valid'; splits found: train, test"):
        load_records(str(tmp_path / "saved"), split="valid")


def test_folder_of_data_files_is_split_by_file_name(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", ALPACA_RECORDS[:2])
    write_csv(tmp_path / "test.csv", ALPACA_RECORDS[2:])
    assert load_records(str(tmp_path)) == ALPACA_RECORDS[:2]
    assert load_records(str(tmp_path), split="test") == ALPACA_RECORDS[2:]


def test_folder_without_split_names_is_all_train(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", ALPACA_RECORDS[:1])
    write_parquet(tmp_path / "b.parquet", ALPACA_RECORDS[1:])
    assert load_records(str(tmp_path)) == ALPACA_RECORDS


def test_txt_file_is_one_text_record(tmp_path: Path) -> None:
    path = tmp_path / "book.txt"
    path.write_text("first line\n\nsecond paragraph\n", encoding="utf-8")
    assert load_records(str(path)) == [{"text": "first line\n\nsecond paragraph\n"}]


def test_records_know_their_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": "1"}\n\n{"a": "2"}\n', encoding="utf-8")
    records = load_records(str(path))
    assert [records.where(0), records.where(1)] == [f"{path} line 1", f"{path} line 3"]
    csv_records = load_records(str(write_csv(tmp_path / "d.csv", ALPACA_RECORDS)))
    assert csv_records.where(2) == f"{tmp_path / 'd.csv'} line 4"
    json_records = load_records(str(write_json(tmp_path / "d.json", ALPACA_RECORDS)))
    assert json_records.where(1) == f"{tmp_path / 'd.json'} record 2"


def test_json_file_of_json_lines_loads_as_datasets_to_json_writes_it(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.json", ALPACA_RECORDS)
    records = load_records(str(path))
    assert records == ALPACA_RECORDS and records.where(1) == f"{path} line 2"
    path.write_text(path.read_text() + "{oops\n", encoding="utf-8")
    with pytest.raises(UserError, match=rf"d.json line {len(ALPACA_RECORDS) + 1} column 2 is not valid JSON"):
        load_records(str(path))


def test_utf8_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(ALPACA_RECORDS[0]).encode() + b"\n")
    assert load_records(str(path)) == ALPACA_RECORDS[:1]


@pytest.mark.parametrize(
    ("split", "expected"),
    [
        ("train", list(range(10))),
        ("train[:70%]", list(range(7))),
        ("train[70%:]", [7, 8, 9]),
        ("train[:3]", [0, 1, 2]),
        ("train[-2:]", [8, 9]),
        ("train[25%:75%]", [3, 4, 5, 6, 7]),  # 2.5 and 7.5 round half up
    ],
)
def test_split_slices(tmp_path: Path, split: str, expected: list[int]) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"i": i} for i in range(10)])
    records = load_records(str(path), split=split)
    assert [r["i"] for r in records] == expected
    assert records.where(0) == f"{path} line {expected[0] + 1}"


def test_column_map_renames_user_columns(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "answer": "a", "extra": 1}])
    records = load_records(str(path), column_map={"instruction": "prompt", "output": "answer"})
    assert records == [{"extra": 1, "instruction": "p", "output": "a"}]


def test_column_map_can_swap_columns(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"input": "x", "output": "y"}])
    records = load_records(str(path), column_map={"input": "output", "output": "input"})
    assert records == [{"input": "y", "output": "x"}]


def test_hf_hub_name_that_cannot_load_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")

    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Couldn't reach 'someone/nothing' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError) as info:
        load_records("someone/nothing", split="train[:10%]")
    assert str(info.value) == (
        "cannot load dataset 'someone/nothing' split 'train[:10%]' from the Hugging Face Hub "
        "(Couldn't reach 'someone/nothing' on the Hub (LocalEntryNotFoundError)); check the "
        "name, subset (dataset_subset) and split, or point to a local file"
    )


def test_hf_hub_name_is_passed_to_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load(name: str, *subset: str, split: str) -> object:
        calls.append((name, *subset, split))
        return datasets.Dataset.from_list(ALPACA_RECORDS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert load_records("tatsu-lab/alpaca", split="train[:5%]") == ALPACA_RECORDS
    assert load_records("openai/gsm8k", split="test", subset="main") == ALPACA_RECORDS
    assert calls == [("tatsu-lab/alpaca", "train[:5%]"), ("openai/gsm8k", "main", "test")]


def test_hf_source_without_datasets_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    (tmp_path / "state.json").write_text("{}")
    expected = (
        "reading Hugging Face datasets needs the 'datasets' package; "
        'run pip install "finetune[hf]"'
    )
    for source in ("tatsu-lab/alpaca", str(tmp_path)):
        with pytest.raises(UserError) as info:
            load_records(source)
        assert str(info.value) == expected
