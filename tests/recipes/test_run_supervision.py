"""A run and the processes around it: workers do not outlive a killed launcher, and one
output_dir holds one run at a time (a second run into it stops with one line and touches nothing)."""

import json
import os
import signal
import time
from pathlib import Path

import pytest

from finetune.cli import main
from tests.recipes.helpers import as_argv, metrics, train_losses, tune


def children(pid: int) -> list[int]:
    """The pids whose parent is `pid` (read from /proc: Linux only)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        if f"\nPPid:\t{pid}\n" in status:
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    """Whether `pid` still runs (a zombie waiting for a reaper has stopped running)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def wait_for_steps(out: Path, process, count: int) -> None:
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").exists() or len(train_losses(out)) < count:
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads processes from /proc")
def test_workers_exit_when_the_launcher_is_killed(tmp_path):
    out = tmp_path / "out"
    process = tune(
        "--nproc_per_node",
        "2",
        "finetune_llm",
        *as_argv(max_steps_per_epoch=4000, batch_size=2, save_every_n_steps=3),
        f"output_dir={out}",
        wait=False,
        start_new_session=True,
    )
    workers: list[int] = []
    try:
        wait_for_steps(out, process, 2)
        workers = children(process.pid)
        assert len(workers) == 2, workers
        process.kill()  # the launcher alone, as the OOM killer or a lost node would
        process.wait()
        deadline = time.time() + 10
        while any(alive(pid) for pid in workers) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(alive(pid) for pid in workers), "the workers outlived their launcher by 10 s"
        saved = sorted(p.name for p in out.glob("step_*"))
        losses = len(train_losses(out))
        time.sleep(3)
        assert sorted(p.name for p in out.glob("step_*")) == saved and len(train_losses(out)) == losses
        record = json.loads((out / "status.json").read_text())
        assert record["state"] == "failed" and "launcher" in record["error"], record
        events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
        assert [e["kind"] for e in events[-2:]] == ["error", "job_end"] and events[-1]["state"] == "failed"
        assert events[-2]["message"] == record["error"]
    finally:
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_a_second_run_into_a_busy_output_dir_is_refused_and_touches_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    first = tune("finetune_llm", *as_argv(max_steps_per_epoch=4000, batch_size=2), f"output_dir={out}", wait=False)
    try:
        wait_for_steps(out, first, 2)
        params_before = (out / "params.yaml").read_text()
        capsys.readouterr()
        refused = f"error: output_dir {out} is in use by another run (pid {first.pid} on host {os.uname().nodename}); "
        # A fresh run and a resume are both refused, in one process or several.
        assert main(["finetune_llm", *as_argv(max_steps_per_epoch=2, lr=0.5), f"output_dir={out}"]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [
            refused + "wait for it to finish or choose another output_dir"
        ]
        second = tune(
            "--nproc_per_node",
            "2",
            "finetune_llm",
            *as_argv(max_steps_per_epoch=2, lr=0.5),
            f"output_dir={out}",
            "resume_from_checkpoint=true",
        )
        assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-3000:]
        assert [line for line in second.stderr.splitlines() if line.startswith("error:")] == [
            refused + "wait for it to finish or choose another output_dir"
        ]
        assert (out / "params.yaml").read_text() == params_before
        record = json.loads((out / "status.json").read_text())
        assert record["pid"] == first.pid and record["state"] == "running"
        assert first.poll() is None
    finally:
        first.kill()
        first.communicate()
    steps = [record["step"] for record in metrics(out) if "loss" in record]
    assert steps == list(range(1, len(steps) + 1)), "the metrics of two runs interleave"
