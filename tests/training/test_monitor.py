"""JobMonitor: states, heartbeat, atomic writes, resilience, rank gating."""

import json
import os
import threading
import time
from datetime import datetime

import pytest

from finetune.errors import UserError
from finetune.training.monitor import JobMonitor


def _read(path) -> dict:
    return json.loads(path.read_text())


def _wait_for(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def test_state_transitions_and_fields(tmp_path):
    monitor = JobMonitor(tmp_path, rank=0, heartbeat_interval_s=60)
    status = _read(tmp_path / "status.json")
    assert status["state"] == "starting"
    assert status["pid"] == os.getpid()
    assert status["last_checkpoint"] is None and status["error"] is None
    assert datetime.fromisoformat(status["started_at"]).utcoffset().total_seconds() == 0

    monitor.set_state("running")
    monitor.update(step=7, epoch=1, loss=2.5)
    status = _read(tmp_path / "status.json")
    assert (status["state"], status["step"], status["epoch"], status["loss"]) == ("running", 7, 1, 2.5)

    monitor.set_state("checkpointing")
    assert _read(tmp_path / "status.json")["state"] == "checkpointing"
    ckpt = tmp_path / "step_7"
    ckpt.mkdir()
    monitor.checkpoint_saved(ckpt)
    status = _read(tmp_path / "status.json")
    assert (status["state"], status["last_checkpoint"]) == ("running", str(ckpt))

    monitor.finish()
    status = _read(tmp_path / "status.json")
    assert status["state"] == "done" and status["step"] == 7
    assert not monitor._thread.is_alive()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status.json", "step_7"]  # no temp files left


def test_failure_records_error_and_resume_keeps_last_checkpoint(tmp_path):
    ckpt = tmp_path / "step_3"
    ckpt.mkdir()
    monitor = JobMonitor(tmp_path, rank=0, heartbeat_interval_s=60)
    monitor.checkpoint_saved(ckpt)
    monitor.fail("CUDA out of memory")
    status = _read(tmp_path / "status.json")
    assert (status["state"], status["error"]) == ("failed", "CUDA out of memory")

    resumed = JobMonitor(tmp_path, rank=0, heartbeat_interval_s=60)
    status = _read(tmp_path / "status.json")
    assert (status["state"], status["last_checkpoint"], status["error"]) == ("starting", str(ckpt), None)
    resumed.finish()


@pytest.mark.parametrize("state", ["stopped", "preempted"])
def test_a_run_stopped_on_request_is_not_failed(tmp_path, state):
    monitor = JobMonitor(tmp_path, rank=0, heartbeat_interval_s=0.01)
    monitor.stopped(state)
    assert not monitor._thread.is_alive()
    monitor.close()  # ends nothing more: the run did not fail
    status = _read(tmp_path / "status.json")
    assert (status["state"], status["error"]) == (state, None)
    with pytest.raises(ValueError, match="stopped or preempted"):
        monitor.stopped("failed")


def test_heartbeat_refreshes_and_stops_after_finish(tmp_path):
    path = tmp_path / "status.json"
    monitor = JobMonitor(tmp_path, rank=0, heartbeat_interval_s=0.05)
    first = _read(path)["heartbeat_at"]
    assert _wait_for(lambda: _read(path)["heartbeat_at"] > first)
    status = _read(path)
    # The loop reported nothing since start: progress stays put while the heartbeat moves on.
    assert (status["state"], status["progress_at"]) == ("starting", first)
    monitor.update(step=1)
    assert _read(path)["progress_at"] > first
    monitor.finish()
    last = _read(path)["heartbeat_at"]
    time.sleep(0.2)
    assert _read(path)["heartbeat_at"] == last


def test_nonpositive_interval_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="heartbeat_interval_s must be positive"):
        JobMonitor(tmp_path, rank=0, heartbeat_interval_s=0)


def test_other_ranks_write_nothing(tmp_path):
    monitor = JobMonitor(tmp_path, rank=1, heartbeat_interval_s=0.01)
    monitor.set_state("running")
    monitor.update(step=1, loss=1.0)
    monitor.checkpoint_saved(tmp_path)
    monitor.fail("x")
    monitor.finish()
    time.sleep(0.05)
    assert list(tmp_path.iterdir()) == []
    assert monitor.status == {}


def test_unwritable_status_does_not_stop_training(tmp_path):
    path = tmp_path / "status.json"
    monitor = JobMonitor(tmp_path, rank=0, heartbeat_interval_s=0.02)
    path.unlink()
    path.mkdir()  # os.replace onto a directory fails
    monitor.update(step=5)
    time.sleep(0.1)
    assert monitor._thread.is_alive()
    path.rmdir()
    monitor.update(step=6)
    assert _read(path)["step"] == 6
    monitor.finish()


def test_readers_never_see_a_partial_file(tmp_path):
    path = tmp_path / "status.json"
    monitor = JobMonitor(tmp_path, rank=0, heartbeat_interval_s=0.001)
    stop = threading.Event()
    reads, errors = [], []

    def reader():
        while not stop.is_set():
            try:
                reads.append(_read(path)["step"])
            except (ValueError, OSError) as e:  # a torn or missing file
                errors.append(e)

    thread = threading.Thread(target=reader)
    thread.start()
    for step in range(100):
        monitor.update(step=step, loss=float(step))
    stop.set()
    thread.join()
    monitor.finish()
    assert errors == []
    assert len(reads) > 10 and reads == sorted(reads)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status.json"]
