"""Atomic checkpoint directories: crash safety (SIGKILL), replacement, listing, pruning."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from finetune.checkpointing.atomic import (
    atomic_directory,
    atomic_write_text,
    latest_checkpoint,
    list_checkpoints,
    prune_checkpoints,
)
from finetune.errors import UserError

REPO = Path(__file__).resolve().parents[2]


def _write_checkpoint(path: Path, payload: bytes) -> None:
    with atomic_directory(path) as tmp:
        (tmp / "model.bin").write_bytes(payload)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "state.txt").write_text("ok")


def _contents(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_success_renames_into_place_and_leaves_no_temp(tmp_path):
    _write_checkpoint(tmp_path / "step_5", b"abc")
    assert _contents(tmp_path / "step_5") == {"model.bin": b"abc", "sub/state.txt": b"ok"}
    assert [p.name for p in tmp_path.iterdir()] == ["step_5"]


def test_exception_keeps_previous_and_removes_temp(tmp_path):
    _write_checkpoint(tmp_path / "step_5", b"old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_directory(tmp_path / "step_5") as tmp:
            (tmp / "model.bin").write_bytes(b"new, half")
            raise RuntimeError("disk full")
    assert _contents(tmp_path / "step_5") == {"model.bin": b"old", "sub/state.txt": b"ok"}
    assert [p.name for p in tmp_path.iterdir()] == ["step_5"]


def test_existing_final_dir_is_replaced_whole(tmp_path):
    _write_checkpoint(tmp_path / "step_5", b"old")
    (tmp_path / "step_5" / "stale.txt").write_text("from the old one")
    _write_checkpoint(tmp_path / "step_5", b"new")
    assert _contents(tmp_path / "step_5") == {"model.bin": b"new", "sub/state.txt": b"ok"}
    assert [p.name for p in tmp_path.iterdir()] == ["step_5"]


def test_sigkill_mid_write_leaves_previous_checkpoint_whole(tmp_path):
    _write_checkpoint(tmp_path / "step_1", b"first")
    child = textwrap.dedent(
        f"""
        import importlib.util, sys, time
        from pathlib import Path
        sys.path.insert(0, {str(REPO)!r})
        # Load the module alone: the checkpointing package imports torch, slow to start.
        spec = importlib.util.spec_from_file_location("atomic", {str(REPO / "finetune/checkpointing/atomic.py")!r})
        atomic = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(atomic)
        atomic_directory = atomic.atomic_directory
        out = Path({str(tmp_path)!r})
        with atomic_directory(out / sys.argv[1]) as tmp:
            with open(tmp / "model.bin", "wb") as f:
                f.write(b"partial" * 1000)
                f.flush()
                print("writing", flush=True)
                time.sleep(60)
        """
    )
    for target in ("step_2", "step_1"):  # a new checkpoint, then a replacement of the old one
        proc = subprocess.Popen([sys.executable, "-c", child, target], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "writing"
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(timeout=30) == -signal.SIGKILL
        finally:
            proc.kill()
            proc.stdout.close()
        assert list_checkpoints(tmp_path) == [tmp_path / "step_1"]
        assert _contents(tmp_path / "step_1") == {"model.bin": b"first", "sub/state.txt": b"ok"}
        leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
        assert leftovers == [f".{target}.tmp-{proc.pid}"]
        # The dead run's temp dir is cleaned up by the next prune.
        prune_checkpoints(tmp_path, keep_last_n=5)
        assert [p.name for p in tmp_path.iterdir()] == ["step_1"]


def test_crash_between_renames_is_recovered(tmp_path):
    _write_checkpoint(tmp_path / "step_4", b"four")
    # What a process killed after moving step_4 aside (and before renaming the new one in) leaves.
    os.rename(tmp_path / "step_4", tmp_path / ".step_4.old-999999999")
    (tmp_path / ".step_4.tmp-999999999").mkdir()
    assert list_checkpoints(tmp_path) == [tmp_path / "step_4"]
    assert _contents(tmp_path / "step_4")["model.bin"] == b"four"
    # A moved-aside dir whose replacement did land is garbage.
    (tmp_path / ".step_4.old-999999998").mkdir()
    prune_checkpoints(tmp_path, keep_last_n=1)
    assert [p.name for p in tmp_path.iterdir()] == ["step_4"]


def test_list_latest_and_prune(tmp_path):
    assert list_checkpoints(tmp_path / "missing") == []
    assert latest_checkpoint(tmp_path) is None
    for step in (10, 2, 30, 4):
        _write_checkpoint(tmp_path / f"step_{step}", str(step).encode())
    (tmp_path / "step_x").mkdir()  # not a checkpoint name
    (tmp_path / "step_7").write_text("a file, not a directory")
    (tmp_path / ".step_50.tmp-1").mkdir()  # in progress elsewhere or dead
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_2", "step_4", "step_10", "step_30"]
    assert latest_checkpoint(tmp_path) == tmp_path / "step_30"

    deleted = prune_checkpoints(tmp_path, keep_last_n=2)
    assert [p.name for p in deleted] == ["step_2", "step_4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_10", "step_30", "step_7", "step_x"]
    assert _contents(tmp_path / "step_30")["model.bin"] == b"30"
    assert prune_checkpoints(tmp_path, keep_last_n=2) == []
    with pytest.raises(UserError, match="keep_last_n must be at least 1"):
        prune_checkpoints(tmp_path, keep_last_n=0)


def test_atomic_write_text_replaces_file(tmp_path):
    path = tmp_path / "a.json"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
