"""`tune dummy`: the pipeline of a training run with no model, tokenizer or config, writing and
ending as a real run does (params.yaml, metrics.jsonl, status.json, step_<N>/, the output_dir lock)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.cli_helpers import error_line, run

REPO = Path(__file__).resolve().parents[2]


def _status(out_dir: Path) -> dict:
    return json.loads((out_dir / "status.json").read_text())


def _metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def _tune(*argv: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "finetune.cli", *argv],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_dummy_without_a_config_writes_what_a_run_writes(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "dummy")
    assert code == 0, err
    out_dir = tmp_path / "output" / "dummy"
    status = _status(out_dir)
    assert status["state"] == "done" and status["step"] == 5 and status["error"] is None
    assert status["last_checkpoint"] == str(Path("output/dummy/step_5"))
    assert [r["step"] for r in _metrics(out_dir)] == [1, 2, 3, 4, 5]
    assert (out_dir / "step_5" / "model.safetensors").is_file() and (out_dir / "step_5" / "params.yaml").is_file()
    assert yaml.safe_load((out_dir / "params.yaml").read_text())["output_dir"] == "output/dummy"
    # A second fresh run there is refused as a real run's would be; the first run's lock was released.
    code, _, err = run(capsys, "dummy")
    assert code == 2 and "already holds checkpoints of an earlier run (step_5)" in error_line(err)


def test_dummy_resumes_after_its_newest_checkpoint(capsys, tmp_path):
    out = f"output_dir={tmp_path}"
    assert run(capsys, "dummy", out, "max_steps_per_epoch=2", "save_every_n_steps=1")[0] == 0
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_1", "step_2"]
    code, _, err = run(capsys, "dummy", out, "max_steps_per_epoch=2", "epochs=2", "resume_from_checkpoint=true")
    assert code == 0, err
    assert [(r["step"], r["epoch"]) for r in _metrics(tmp_path)] == [(1, 0), (2, 0), (3, 1), (4, 1)]
    assert _status(tmp_path)["state"] == "done" and (tmp_path / "step_4").is_dir()


def test_resuming_a_finished_dummy_run_says_so_and_writes_nothing(capsys, tmp_path):
    out = f"output_dir={tmp_path}"
    assert run(capsys, "dummy", out, "max_steps_per_epoch=2")[0] == 0
    before = {p.name: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != ".lock"}
    code, _, err = run(capsys, "dummy", out, "max_steps_per_epoch=2", "resume_from_checkpoint=true")
    assert code == 2 and f"the run in {tmp_path} is finished at step 2" in error_line(err)
    assert {p.name: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != ".lock"} == before


def test_a_finetuning_config_runs_under_the_dummy_and_typos_still_fail(capsys, tmp_path):
    code, _, err = run(capsys, "dummy", "--config", "tiny_full", f"output_dir={tmp_path}", "max_steps_per_epoch=2")
    assert code == 0, err
    saved = yaml.safe_load((tmp_path / "params.yaml").read_text())
    assert saved["lr"] == 0.003 and "tokenizer_path" not in saved  # used keys kept, the model's dropped
    code, _, err = run(capsys, "dummy", "--config", "tiny_full", "lr_schedular=cosine")
    assert code == 2 and "did you mean 'lr_scheduler'?" in error_line(err)


@pytest.mark.parametrize(
    "override,expected",
    [("lr=-1", "lr=-1.0 must be positive"), ("step_time_s=-1", "must be 0 or more"), ("epochs=0", "at least 1")],
)
def test_bad_dummy_params_are_one_line(capsys, tmp_path, override, expected):
    code, _, err = run(capsys, "dummy", f"output_dir={tmp_path / 'out'}", override)
    assert code == 2 and expected in error_line(err)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_dummy_without_a_config_under_torchrun(tmp_path):
    proc = _tune("--nproc_per_node", "2", "dummy", cwd=tmp_path)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr
    assert "dummy: rank 0 of 2" in stdout and "dummy: rank 1 of 2" in stdout
    out_dir = tmp_path / "output" / "dummy"
    assert _status(out_dir)["state"] == "done" and (out_dir / "step_5" / "model.safetensors").is_file()
    assert [r["ranks"] for r in _metrics(out_dir)] == [2] * 5


@pytest.mark.slow
def test_sigterm_preempts_the_dummy_at_a_step_boundary_with_a_checkpoint(tmp_path):
    proc = _tune("dummy", f"output_dir={tmp_path}", "max_steps_per_epoch=200", "step_time_s=0.05", cwd=tmp_path)
    deadline = time.monotonic() + 120
    while not (tmp_path / "metrics.jsonl").is_file() and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    status = _status(tmp_path)
    assert status["state"] == "preempted" and 1 <= status["step"] < 200
    assert status["last_checkpoint"] == str(tmp_path / f"step_{status['step']}")
