"""Hub datasets, read by the real `datasets` client from a local Hub over HTTP: a run tokenizes one
into the cache once and trains exactly as on the same file; a new revision builds a new entry;
streaming reads it over the network in order and resumes by position; a missing one is one line."""

from pathlib import Path
from typing import Iterator

import pytest

from finetune.data.demo import demo_path
from tests.data.hub_server import LocalHub
from tests.recipes.helpers import as_argv, train_losses, tune

REPO_ID = "someone/demo"
SUBSETS = """---
configs:
- config_name: main
  default: true
  data_files:
  - split: train
    path: data/train.jsonl
- config_name: short
  data_files:
  - split: train
    path: short/train.jsonl
---
"""


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[LocalHub, Path]]:
    """A Hub holding someone/demo, and the runs' settings to reach it: its address, and a Hugging
    Face cache of this test's own. The repository has two subsets (README.md `configs:`): `main`,
    the default, of 200 demo records in data/train.jsonl, and `short`, 40 others."""
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    (repo / "short").mkdir()
    lines = demo_path("train.jsonl").read_text(encoding="utf-8").splitlines()
    (repo / "data" / "train.jsonl").write_text("\n".join(lines[:200]) + "\n", encoding="utf-8")
    (repo / "short" / "train.jsonl").write_text("\n".join(lines[200:240]) + "\n", encoding="utf-8")
    (repo / "README.md").write_text(SUBSETS, encoding="utf-8")
    server = LocalHub({REPO_ID: repo})
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    yield server, repo / "data" / "train.jsonl"
    server.stop()


def train(out: Path, *overrides: str) -> str:
    """A 4-step run's log (stderr); fails the test when the run fails."""
    argv = as_argv(max_steps_per_epoch=4, lr=3e-3, shuffle=False)
    result = tune("finetune_llm", *argv, *overrides, f"output_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


def dataset_line(log: str) -> str:
    """The line a run logs about its training data (counts, truncation, skipped samples)."""
    lines = [line for line in log.splitlines() if line.startswith("dataset ")]
    assert len(lines) == 1, log[-3000:]
    return lines[0]


@pytest.mark.slow
def test_a_hub_dataset_is_cached_once_and_trains_like_its_file(tmp_path, hub):
    server, data_file = hub
    cache = tmp_path / "cache"
    split = "split=train[:75%]"
    from_file = train(tmp_path / "file", f"dataset={data_file}", split, "data_cache_dir=none")
    built = train(tmp_path / "built", f"dataset={REPO_ID}", split, f"data_cache_dir={cache}")
    reused = train(tmp_path / "reused", f"dataset={REPO_ID}", split, f"data_cache_dir={cache}")
    assert "data cache: tokenized into" in built and "data cache: reusing" in reused
    assert any(f"/datasets/{REPO_ID}/resolve/" in request for request in server.requests)
    reference = train_losses(tmp_path / "file")
    assert len(reference) == 4
    assert train_losses(tmp_path / "built") == reference and train_losses(tmp_path / "reused") == reference
    assert dataset_line(built) == dataset_line(from_file).replace(str(data_file), REPO_ID)  # the same counts
    assert "of 150 samples were longer" in dataset_line(built)  # 75% of 200 records
    short = train(tmp_path / "short", f"dataset={REPO_ID}", "dataset_subset=short", split, f"data_cache_dir={cache}")
    assert "data cache: tokenized into" in short and "of 30 samples were longer" in dataset_line(short)

    # A new revision on the Hub (a push that drops 40 records) is a new cache entry.
    lines = data_file.read_text(encoding="utf-8").splitlines()
    data_file.write_text("\n".join(lines[40:]) + "\n", encoding="utf-8")
    pushed = train(tmp_path / "pushed", f"dataset={REPO_ID}", split, f"data_cache_dir={cache}")
    assert "data cache: tokenized into" in pushed and "of 120 samples were longer" in dataset_line(pushed)
    assert len([entry for entry in cache.iterdir() if entry.is_dir()]) == 3


@pytest.mark.slow
def test_a_hub_dataset_streams_in_order_and_resumes_by_position(tmp_path, hub):
    server, data_file = hub
    # A constant rate: the schedule of a 1-epoch run would differ from a 2-epoch one's.
    streaming = ["data_streaming=true", "batch_size=2", "save_every_n_steps=2", "lr_scheduler=constant"]
    train(tmp_path / "file", f"dataset={data_file}", *streaming, "epochs=2")
    train(tmp_path / "hub", f"dataset={REPO_ID}", *streaming, "epochs=2")
    assert not list((tmp_path / "hf").rglob("*.arrow")), "a stream must not prepare the dataset on disk"
    reference = train_losses(tmp_path / "file")
    assert len(reference) == 8 and train_losses(tmp_path / "hub") == reference

    # One epoch, then the same run asked for two: the second epoch continues the stream where
    # the first stopped, as the uninterrupted run did.
    train(tmp_path / "resumed", f"dataset={REPO_ID}", *streaming, "epochs=1")
    log = train(tmp_path / "resumed", f"dataset={REPO_ID}", *streaming, "epochs=2", "resume_from_checkpoint=true")
    assert "resuming from" in log
    assert train_losses(tmp_path / "resumed") == reference


def test_a_missing_hub_dataset_is_one_line(tmp_path, hub):
    for streaming in ("false", "true"):
        result = tune(
            "finetune_llm",
            *as_argv(max_steps_per_epoch=2),
            "dataset=someone/missing",
            f"data_streaming={streaming}",
            f"output_dir={tmp_path / streaming}",
        )
        assert result.returncode == 2, result.stderr[-3000:]
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "cannot load dataset 'someone/missing'" in errors[0], result.stderr[-2000:]
        assert "Traceback" not in result.stderr
