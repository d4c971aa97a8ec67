"""Training from the tokenized-data cache gives the losses of tokenizing in memory, step for
step, in one process and in two; two processes on a node build the cache once. A stream trains
like the cached data read in order, and resumes exactly after SIGKILL."""

import os
import re
import signal
from pathlib import Path

import pytest

from finetune.params import FullFinetuneParams
from finetune.recipes.full_finetune import FullFinetuneRecipe
from tests.recipes.helpers import TINY, as_argv, assert_same_tensors, train_losses, tune, wait_for


def run(out: Path, **overrides) -> list[float]:  # type: ignore[no-untyped-def]
    params = FullFinetuneParams(**{**TINY, "output_dir": str(out), "max_steps_per_epoch": 6, **overrides})
    recipe = FullFinetuneRecipe(params)
    recipe.setup()
    recipe.train()
    recipe.cleanup()
    return train_losses(out)


@pytest.mark.parametrize("packed", [False, True])
def test_losses_are_the_same_with_and_without_the_cache(tmp_path, packed):
    settings = {"packed": packed, "lr": 3e-3, "train_on_input": packed, "split": "train[:3000]"}
    reference = run(tmp_path / "memory", data_cache_dir=None, **settings)
    cache = str(tmp_path / "cache")
    built = run(tmp_path / "built", data_cache_dir=cache, **settings)
    reused = run(tmp_path / "reused", data_cache_dir=cache, **settings)
    assert len(reference) == 6
    assert built == reference and reused == reference  # exactly: same samples, same order, same batches
    assert len([p for p in Path(cache).iterdir() if p.is_dir()]) == 1


@pytest.mark.slow
def test_two_processes_build_once_and_train_like_tokenizing_in_memory(tmp_path):
    argv = as_argv(max_steps_per_epoch=4, batch_size=2, lr=3e-3)
    cache = tmp_path / "cache"
    cached = tune(
        "--nproc_per_node", "2", "finetune_llm", *argv, f"data_cache_dir={cache}", f"output_dir={tmp_path / 'a'}"
    )
    assert cached.returncode == 0, cached.stderr[-3000:]
    memory = tune("--nproc_per_node", "2", "finetune_llm", *argv, "data_cache_dir=none", f"output_dir={tmp_path / 'b'}")
    assert memory.returncode == 0, memory.stderr[-3000:]
    assert len(re.findall(r"data cache: tokenized into", cached.stderr)) == 1
    assert "data cache: reusing" not in cached.stderr
    assert [p.name for p in cache.iterdir() if p.is_dir()] and not list(cache.glob(".*"))
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 1
    assert train_losses(tmp_path / "a") == train_losses(tmp_path / "b")


def test_a_stream_trains_like_the_cached_data_in_file_order(tmp_path):
    settings = {"shuffle": False, "lr": 3e-3}
    cached = run(tmp_path / "cached", data_cache_dir=str(tmp_path / "cache"), **settings)
    streamed = run(tmp_path / "streamed", data_streaming=True, **settings)
    assert len(streamed) == 6 and streamed == cached


@pytest.mark.slow
def test_a_stream_resumes_exactly_after_sigkill(tmp_path):
    argv = as_argv(max_steps_per_epoch=4, epochs=2, save_every_n_steps=2, batch_size=2, lr=3e-3)
    argv += ["data_streaming=true", "shuffle=false"]
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    result = tune("finetune_llm", *argv, f"output_dir={reference}")
    assert result.returncode == 0, result.stderr[-3000:]
    process = tune("finetune_llm", *argv, f"output_dir={interrupted}", wait=False, start_new_session=True)
    wait_for(interrupted / "step_6", process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (interrupted / "step_8").exists(), "the run finished before it was killed"
    result = tune("finetune_llm", *argv, f"output_dir={interrupted}", "resume_from_checkpoint=true")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_tensors(reference / "step_8" / "model.safetensors", interrupted / "step_8" / "model.safetensors")
    assert train_losses(reference)[-2:] == train_losses(interrupted)[-2:]
