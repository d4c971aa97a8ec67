"""Streaming: a rank's stream is its share of the unshuffled dataset in the same order, epochs
continue where the last stopped and wrap at the end of the file, a resumed epoch skips exactly
what was trained on, and bad records name their file and line."""

import pytest

from finetune.data import ResumableDistributedSampler, build_dataset
from finetune.data.stream import streamed_samples
from finetune.data.templates import get_template
from finetune.data.tokenize import TokenizeSpec
from finetune.params import FullFinetuneParams
from tests.data.helpers import ALPACA_RECORDS, user_error, write_jsonl

SPEC = TokenizeSpec("instruct", 64, get_template("alpaca"), False)


def records(n: int) -> list[dict]:
    return [{**ALPACA_RECORDS[i % 3], "input": f"{i}"} for i in range(n)]


def stream(path, tokenizer, *, rank=0, world_size=1, num_samples=10, **kwargs):  # type: ignore[no-untyped-def]
    return streamed_samples(
        str(path),
        spec=SPEC,
        tokenizer=tokenizer,
        column_map=kwargs.pop("column_map", None),
        split=kwargs.pop("split", "train"),
        split_key="split",
        rank=rank,
        world_size=world_size,
        num_samples=num_samples,
    )


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_a_rank_streams_its_share_of_the_unshuffled_dataset(tmp_path, sp_tokenizer, world_size):
    path = write_jsonl(tmp_path / "train.jsonl", records(30))
    dataset = build_dataset(str(path), dataset_type="instruct", tokenizer=sp_tokenizer, max_seq_len=64)
    for rank in range(world_size):
        sampler = ResumableDistributedSampler(len(dataset), rank=rank, world_size=world_size, seed=0, shuffle=False)
        expected = [dataset[i] for i in sampler]
        got = list(stream(path, sp_tokenizer, rank=rank, world_size=world_size, num_samples=len(expected)))
        assert got == expected


def test_epochs_continue_and_wrap_and_a_resumed_epoch_skips_what_was_trained(tmp_path, sp_tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", records(7))
    dataset = build_dataset(str(path), dataset_type="instruct", tokenizer=sp_tokenizer, max_seq_len=64)
    everything = [dataset[i % 7] for i in range(40)]
    samples = stream(path, sp_tokenizer, rank=1, world_size=2, num_samples=5)
    mine = everything[1::2]
    samples.set_epoch(0)
    assert list(samples) == mine[:5]
    samples.set_epoch(1)
    assert list(samples) == mine[5:10]  # past the end of the file: it starts again
    samples.set_epoch(1, start_index=3)
    assert list(samples) == mine[8:10] and len(samples) == 2


def test_bad_records_name_their_file_and_line(tmp_path, sp_tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", records(5))
    path.write_text(path.read_text() + "\n" + '{"instruction": "x"}\n')
    assert f"is missing from {path} line 7" in user_error(list, stream(path, sp_tokenizer, num_samples=9))
    path.write_bytes(path.read_bytes()[: -len(b'{"instruction": "x"}\n')] + b'{"instruction": "\xff"}\n')
    message = user_error(list, stream(path, sp_tokenizer, num_samples=9))
    reading = user_error(build_dataset, str(path), dataset_type="instruct", tokenizer=sp_tokenizer, max_seq_len=64)
    assert message == reading and "line 7" in message


def test_folders_parquet_and_saved_datasets_stream_in_the_order_they_load(tmp_path, sp_tokenizer):
    datasets = pytest.importorskip("datasets")
    everything = records(40)
    folder = tmp_path / "folder"
    (folder / "data").mkdir(parents=True)
    write_jsonl(folder / "data" / "train-00000-of-00002.jsonl", everything[:25])
    datasets.Dataset.from_list(everything[25:]).to_parquet(str(folder / "data" / "train-00001-of-00002.parquet"))
    write_jsonl(folder / "data" / "test-00000-of-00001.jsonl", records(3))
    parquet = tmp_path / "train.parquet"
    datasets.Dataset.from_list(everything).to_parquet(str(parquet))
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(everything).save_to_disk(str(saved))
    for source in (folder, parquet, saved):
        loaded = build_dataset(str(source), dataset_type="instruct", tokenizer=sp_tokenizer, max_seq_len=64)
        expected = [loaded[i] for i in range(len(loaded))]
        assert len(expected) == 40
        assert list(stream(source, sp_tokenizer, num_samples=40)) == expected, source
        samples = stream(source, sp_tokenizer, rank=1, world_size=2, num_samples=15)
        samples.set_epoch(1)  # past the end: samples 30-39 and again from the start
        assert list(samples) == (expected + expected)[31:61:2], source


def test_a_parquet_record_is_named_by_its_number(tmp_path, sp_tokenizer):
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "train.parquet"
    datasets.Dataset.from_list(
        [{"instruction": "x", "output": "y"}] * 1500 + [{"instruction": "x", "output": None}]
    ).to_parquet(str(path))
    message = user_error(list, stream(path, sp_tokenizer, num_samples=1600))
    reading = user_error(build_dataset, str(path), dataset_type="instruct", tokenizer=sp_tokenizer, max_seq_len=64)
    assert message == reading and f"{path} record 1501" in message


def test_a_stream_reads_whole_splits_of_supported_sources(tmp_path, sp_tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", records(5))
    assert "cannot slice it (split=train[:50%])" in user_error(stream, path, sp_tokenizer, split="train[:50%]")
    other = tmp_path / "train.xml"
    other.write_text("<x/>")
    assert "unsupported type '.xml'" in user_error(stream, other, sp_tokenizer)
    assert "does not exist" in user_error(stream, tmp_path / "missing.jsonl", sp_tokenizer)


def test_streaming_needs_max_steps_per_epoch_and_unpacked_data():
    base = {"tokenizer_path": "pkg:data/demo/tokenizer.model", "data_streaming": True}
    for settings in ({}, {"max_steps_per_epoch": 4, "packed": True}):
        message = user_error(FullFinetuneParams, **base, **settings)
        assert "data_streaming=true needs max_steps_per_epoch" in message and "packed=false" in message
    assert FullFinetuneParams(**base, max_steps_per_epoch=4).data_streaming
