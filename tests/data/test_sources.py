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
from tests.data.helpers import ALPACA_RECORDS, user_error, write_jsonl


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
    datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in splits.items()}).save_to_disk(
        str(tmp_path / "saved")
    )
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


def test_hf_source_without_datasets_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    (tmp_path / "state.json").write_text("{}")
    expected = "reading Hugging Face datasets needs the 'datasets' package; run pip install \"finetune[hf]\""
    for source in ("tatsu-lab/alpaca", str(tmp_path)):
        assert user_error(load_records, source) == expected


# Local dataset folders laid out like Hub dataset repositories.

GSM8K_ROWS = {
    (subset, split): [{"question": f"{subset} {split} {i}", "answer": str(i)} for i in range(2)]
    for subset in ("main", "socratic")
    for split in ("train", "test")
}


def write_gsm8k_like(folder: Path) -> Path:
    """main/ and socratic/ subsets, each with train and test shards, as on the Hub."""
    for (subset, split), rows in GSM8K_ROWS.items():
        (folder / subset).mkdir(parents=True, exist_ok=True)
        write_parquet(folder / subset / f"{split}-00000-of-00001.parquet", rows)
    return folder


def write_readme(folder: Path, front_matter: str) -> None:
    (folder / "README.md").write_text(f"---\n{front_matter}---\n\n# A dataset\n", encoding="utf-8")


GSM8K_CONFIGS = """\
configs:
- config_name: main
  data_files:
  - split: train
    path: main/train-*
  - split: test
    path: main/test-*
- config_name: socratic
  data_files:
  - split: train
    path: socratic/train-*
  - split: test
    path: socratic/test-*
"""


def test_readme_configs_pick_the_subset(tmp_path: Path) -> None:
    folder = write_gsm8k_like(tmp_path / "gsm8k")
    write_readme(folder, "pretty_name: GSM8K\n" + GSM8K_CONFIGS)
    assert load_records(str(folder), subset="main") == GSM8K_ROWS["main", "train"]
    assert load_records(str(folder), split="test", subset="socratic") == GSM8K_ROWS["socratic", "test"]
    assert user_error(load_records, str(folder)) == (
        f"dataset folder {folder} has 2 subsets (configs in its README.md) and none is the "
        "default: main, socratic; pick one with dataset_subset"
    )
    assert user_error(load_records, str(folder), subset="mian") == (
        f"dataset folder {folder} has no subset 'mian'; subsets found (configs in its "
        "README.md): main, socratic; pick one with dataset_subset"
    )
    assert user_error(load_records, str(folder), split="validation", subset="main", split_key="eval_split") == (
        f"subset 'main' of dataset folder {folder} has no split 'validation'; splits found: "
        "train, test; pick one with eval_split"
    )


def test_readme_default_config_is_used_without_a_subset(tmp_path: Path) -> None:
    folder = write_gsm8k_like(tmp_path / "gsm8k")
    socratic = "- config_name: socratic\n"
    write_readme(folder, GSM8K_CONFIGS.replace(socratic, socratic + "  default: true\n"))
    assert load_records(str(folder), split="test") == GSM8K_ROWS["socratic", "test"]
    only_main = GSM8K_CONFIGS.split("- config_name: socratic")[0]
    write_readme(folder, only_main)
    assert load_records(str(folder)) == GSM8K_ROWS["main", "train"]


def test_readme_data_files_forms(tmp_path: Path) -> None:
    rows = [{"i": i} for i in range(6)]
    write_jsonl(tmp_path / "a.jsonl", rows[:2])
    (tmp_path / "deep" / "er").mkdir(parents=True)
    write_jsonl(tmp_path / "deep" / "er" / "b.jsonl", rows[2:4])
    write_jsonl(tmp_path / "deep" / "c.jsonl", rows[4:])
    write_readme(
        tmp_path,
        "configs:\n"
        "- config_name: one\n  data_files: a.jsonl\n"  # a pattern without split: 'train'
        "- config_name: many\n  data_files: [deep/c.jsonl, a.jsonl]\n"
        "- config_name: globbed\n  data_files:\n  - split: train\n    path: deep/**\n"
        "- config_name: lists\n  data_files:\n"
        "  - split: validation\n    path: [a.jsonl, deep/**/b.jsonl]\n",
    )
    assert load_records(str(tmp_path), subset="one") == rows[:2]
    assert load_records(str(tmp_path), subset="many") == rows[4:] + rows[:2]
    assert load_records(str(tmp_path), subset="globbed") == rows[4:] + rows[2:4]
    assert load_records(str(tmp_path), split="valid", subset="lists") == rows[:4]


def test_readme_pattern_that_matches_nothing_is_a_user_error(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", ALPACA_RECORDS)
    write_readme(tmp_path, "configs:\n- config_name: default\n  data_files: data/train-*\n")
    expected = r"pattern 'data/train-\*' \(subset 'default', split 'train'\) matches no data files"
    with pytest.raises(UserError, match=expected):
        load_records(str(tmp_path))


def test_readme_with_broken_configs_yaml_names_the_line(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", ALPACA_RECORDS)
    write_readme(tmp_path, "license: mit\nconfigs:\n- config_name: [main\n")
    with pytest.raises(UserError, match=r"README.md line \d+: the YAML front matter is not valid"):
        load_records(str(tmp_path))


def test_readme_without_configs_falls_back_to_file_names(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", ALPACA_RECORDS[:1])
    write_jsonl(tmp_path / "test.jsonl", ALPACA_RECORDS[1:])
    write_readme(tmp_path, "license: mit\ntags: [a, b\n")  # not valid YAML, but no configs either
    assert load_records(str(tmp_path), split="test") == ALPACA_RECORDS[1:]


def test_subfolder_subsets_are_never_mixed(tmp_path: Path) -> None:
    folder = write_gsm8k_like(tmp_path / "gsm8k")
    assert user_error(load_records, str(folder)) == (
        f"dataset folder {folder} has 'train' files in the subfolders main, socratic, which "
        "look like subsets of the dataset; pick one with dataset_subset (e.g. dataset_subset=main)"
    )
    assert load_records(str(folder), subset="main") == GSM8K_ROWS["main", "train"]
    assert load_records(str(folder), split="test", subset="socratic") == GSM8K_ROWS["socratic", "test"]
    assert user_error(load_records, str(folder), subset="mian") == (
        f"dataset folder {folder} has no subset 'mian'; subsets (subfolders) found: main, "
        "socratic; pick one with dataset_subset"
    )


def test_subset_subfolders_with_split_subfolders(tmp_path: Path) -> None:
    # The Hub's Parquet export writes <subset>/<split>/0000.parquet.
    for subset in ("main", "socratic"):
        for split in ("train", "test"):
            (tmp_path / subset / split).mkdir(parents=True)
            write_parquet(tmp_path / subset / split / "0000.parquet", GSM8K_ROWS[subset, split])
    assert load_records(str(tmp_path), split="test", subset="main") == GSM8K_ROWS["main", "test"]
    with pytest.raises(UserError, match="in the subfolders main, socratic"):
        load_records(str(tmp_path), split="test")


def test_shard_names_give_exact_split_names(tmp_path: Path) -> None:
    # ultrachat_200k: data/train_sft-*, data/train_gen-*, data/test_sft-*.
    names = ("train_sft", "train_gen", "test_sft")
    rows = {name: [{"prompt": f"{name} {i}"} for i in range(3)] for name in names}
    (tmp_path / "data").mkdir()
    write_parquet(tmp_path / "data" / "train_sft-00000-of-00002.parquet", rows["train_sft"][:2])
    write_parquet(tmp_path / "data" / "train_sft-00001-of-00002.parquet", rows["train_sft"][2:])
    write_parquet(tmp_path / "data" / "train_gen-00000-of-00001.parquet", rows["train_gen"])
    write_parquet(tmp_path / "data" / "test_sft-00000-of-00001.parquet", rows["test_sft"])
    # What huggingface-cli leaves beside the files is not data.
    (tmp_path / ".cache" / "huggingface").mkdir(parents=True)
    write_jsonl(tmp_path / ".cache" / "huggingface" / "train_sft.jsonl", [{"prompt": "cache"}])
    assert load_records(str(tmp_path), split="train_sft") == rows["train_sft"]
    assert load_records(str(tmp_path), split="test_sft[:1]") == rows["test_sft"][:1]
    assert user_error(load_records, str(tmp_path), split="train") == (
        f"dataset folder {tmp_path} has no 'train' files; splits found: test_sft, train_gen, "
        "train_sft; pick one with split"
    )


@pytest.mark.parametrize(
    ("names", "split"),
    [
        (["eval.jsonl", "train.jsonl"], "eval"),
        (["eval.jsonl", "train.jsonl"], "test"),
        (["validation.jsonl", "train.jsonl"], "valid"),
        (["dev-clean.jsonl", "train.jsonl"], "validation"),
        (["testing/part1.jsonl", "training/part1.jsonl"], "test"),
        (["test-00000-of-00001.jsonl", "train-00000-of-00001.jsonl"], "testing"),
    ],
)
def test_split_keywords_and_aliases(tmp_path: Path, names: list[str], split: str) -> None:
    for i, name in enumerate(names):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(tmp_path / name, ALPACA_RECORDS[i : i + 1])
    assert load_records(str(tmp_path), split=split) == ALPACA_RECORDS[:1]
    assert load_records(str(tmp_path)) == ALPACA_RECORDS[1:2]


def test_split_names_a_separator_must_follow(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", ALPACA_RECORDS[:1])
    write_jsonl(tmp_path / "testimonials.jsonl", ALPACA_RECORDS[1:])  # not a 'test' file
    with pytest.raises(UserError, match=r"has no 'test' files; splits found: train; pick one with eval_split"):
        load_records(str(tmp_path), split="test", split_key="eval_split")


def test_subset_on_a_folder_without_subsets(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", ALPACA_RECORDS)
    assert user_error(load_records, str(tmp_path), subset="main") == (
        f"dataset folder {tmp_path} has no subsets (no configs in a README.md and no subfolders "
        "of data files), asked for dataset_subset=main; unset dataset_subset"
    )


def test_subset_on_a_single_file_is_a_user_error(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", ALPACA_RECORDS)
    assert user_error(load_records, str(path), subset="main") == (
        f"dataset_subset=main was given for {path}, a single file; dataset_subset only applies "
        "to Hub datasets and dataset folders with subsets; unset it"
    )


def test_subset_on_a_saved_dataset_is_a_user_error(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(ALPACA_RECORDS).save_to_disk(str(tmp_path / "saved"))
    expected = r"a dataset saved with save_to_disk; dataset_subset only applies to Hub"
    with pytest.raises(UserError, match=expected):
        load_records(str(tmp_path / "saved"), subset="main")


def test_messages_name_the_split_key(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", ALPACA_RECORDS)
    assert user_error(load_records, str(path), split="test", split_key="eval_split") == (
        f"eval_split 'test' asked of the file {path}, which is a single 'train' split; "
        "use eval_split='train' (optionally sliced, e.g. 'train[:90%]')"
    )
    with pytest.raises(UserError, match=r"^eval_split 'train\[::2\]' is not understood"):
        load_records(str(path), split="train[::2]", split_key="eval_split")
    write_jsonl(tmp_path / "train.jsonl", ALPACA_RECORDS)
    with pytest.raises(UserError, match=r"has no 'test' files; splits found: train; pick one with eval_split$"):
        load_records(str(tmp_path), split="test", split_key="eval_split")


def test_saved_dataset_messages_name_the_split_key(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(ALPACA_RECORDS).save_to_disk(str(tmp_path / "one"))
    with pytest.raises(UserError, match=r"is a single split, asked for 'test'; use eval_split='train'$"):
        load_records(str(tmp_path / "one"), split="test", split_key="eval_split")
    saved = datasets.DatasetDict({"train": datasets.Dataset.from_list(ALPACA_RECORDS)})
    saved.save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(UserError, match=r"splits found: train; pick one with eval_split$"):
        load_records(str(tmp_path / "dict"), split="test", split_key="eval_split")


def test_jsonl_keeps_unicode_line_separators_inside_strings(tmp_path: Path) -> None:
    rows = [{"text": "a\u2028b"}, {"text": "c\u2029d\u0085e"}, {"text": "f"}]
    path = tmp_path / "d.jsonl"
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[:2])
    path.write_text(body + "\r\n" + json.dumps(rows[2]) + "\r\n", encoding="utf-8", newline="")
    records = load_records(str(path))
    assert records == rows
    assert [records.where(i) for i in range(3)] == [f"{path} line {n}" for n in (1, 2, 4)]


def test_csv_field_longer_than_the_csv_module_default_limit(tmp_path: Path) -> None:
    long_text = "x" * 300_000
    path = write_csv(tmp_path / "d.csv", [{"text": long_text, "n": "1"}, {"text": "short", "n": "2"}])
    records = load_records(str(path))
    assert records == [{"text": long_text, "n": "1"}, {"text": "short", "n": "2"}]
    assert records.where(1) == f"{path} line 3"


def test_csv_field_limit_falls_back_where_a_c_long_is_32_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    from finetune.data import sources

    limits = [131_072]

    def field_size_limit(*new: int) -> int:
        if new and new[0] > 2**31 - 1:
            raise OverflowError("Python int too large to convert to C long")
        limits.extend(new)
        return limits[-2] if new else limits[-1]

    monkeypatch.setattr(csv, "field_size_limit", field_size_limit)
    sources._allow_csv_fields_of(2**40)
    assert limits[-1] == 2**31 - 1
