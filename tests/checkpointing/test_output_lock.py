"""The output_dir lock: a second run is refused with the holder's pid and host, a killed holder
blocks nobody, and a refused run touches nothing."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.checkpointing.output_lock import LOCK_FILE, lock_output_dir
from finetune.checkpointing.recipe_state import claim_output_dir
from finetune.errors import UserError

REPO = Path(__file__).resolve().parents[2]
HOLD = (
    "import sys; from finetune.checkpointing.output_lock import lock_output_dir; "
    "lock = lock_output_dir(sys.argv[1]); print('locked', flush=True); sys.stdin.read()"
)


def hold_in_another_process(folder: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_run_is_refused_naming_the_holder_and_a_killed_holder_blocks_nobody(tmp_path):
    holder = hold_in_another_process(tmp_path)
    try:
        with pytest.raises(UserError) as refused:
            lock_output_dir(tmp_path)
        assert str(refused.value) == (
            f"output_dir {tmp_path} is in use by another run (pid {holder.pid} on host {socket.gethostname()}); "
            "wait for it to finish or choose another output_dir"
        )
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == holder.pid  # the refusal wrote nothing
    finally:
        holder.kill()
        holder.wait()
    lock = lock_output_dir(tmp_path)  # the kernel dropped the killed holder's lock with the process
    assert lock.held and json.loads((tmp_path / LOCK_FILE).read_text()) == {
        "pid": os.getpid(),
        "host": socket.gethostname(),
    }
    lock.release()


def test_a_run_in_this_process_that_was_not_cleaned_up_is_named_as_such(tmp_path):
    lock = lock_output_dir(tmp_path)
    with pytest.raises(UserError, match=r"in use by an earlier run in this process .* call cleanup\(\) on its recipe"):
        lock_output_dir(tmp_path)
    lock.release()
    again = lock_output_dir(tmp_path)
    again.release()
    del again
    lock_output_dir(tmp_path).release()


def test_claim_refuses_a_busy_folder_before_looking_at_its_checkpoints(tmp_path):
    (tmp_path / "step_3").mkdir()
    holder = hold_in_another_process(tmp_path)
    try:
        with pytest.raises(UserError, match="is in use by another run"):
            claim_output_dir(tmp_path, resume=False)
    finally:
        holder.kill()
        holder.wait()
    with pytest.raises(UserError, match="already holds checkpoints"):
        claim_output_dir(tmp_path, resume=False)
    claim_output_dir(tmp_path, resume=True).release()  # the refusal above let go of the lock
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE, "step_3"]
