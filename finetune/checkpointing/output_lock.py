"""One run per output folder: a run holds a lock on `output_dir/.lock` from its start to its end.

Two runs writing into one folder would overwrite each other's checkpoints, interleave their
metrics.jsonl and take turns writing status.json, and both would exit 0. The lock is an
advisory `flock` on the file, taken by the run's rank 0 only: the kernel drops it when the
process ends, however it ends (SIGKILL and the OOM killer included), so a killed run never
blocks the next one and there is no stale lock to clean up. The file is never deleted (a
run that locked a deleted file and one that locked its successor would both run); it holds
the holder's pid and host, for the one line a refused run prints.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Optional

from finetune.errors import UserError

try:
    import fcntl
except ImportError:  # not on Windows: runs there are not kept apart
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"

# A file system without locks (some network and FUSE mounts) should not stop training: the run
# goes on unguarded and says so.
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS}


class OutputDirLock:
    """The lock a run holds on its output_dir; `release` (or the process's end) gives it up."""

    def __init__(self, path: Path, fd: Optional[int]) -> None:
        self.path = path
        self._fd = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None

    def __del__(self) -> None:
        # A notebook that drops a recipe without cleanup() must not keep the folder locked.
        self.release()


def _holder(fd: int) -> Optional[dict]:
    """The pid and host the holder wrote; None while it has locked but not yet written."""
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "pid" in record else None


def _in_use_error(root: Path, fd: int) -> UserError:
    holder = None
    for _ in range(20):  # the holder writes its pid right after it locks
        holder = _holder(fd)
        if holder is not None:
            break
        time.sleep(0.05)
    if holder is None:
        return UserError(
            f"output_dir {root} is in use by another run; wait for it to finish or choose another output_dir"
        )
    who = f"pid {holder.get('pid')} on host {holder.get('host')}"
    if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        return UserError(
            f"output_dir {root} is in use by an earlier run in this process ({who}) that was not cleaned up; "
            "call cleanup() on its recipe first, or choose another output_dir"
        )
    return UserError(
        f"output_dir {root} is in use by another run ({who}); wait for it to finish or choose another output_dir"
    )


def lock_output_dir(root: Path | str) -> OutputDirLock:
    """Lock the existing folder `root` for this process's run, or raise a UserError naming the
    run that holds it. Nothing in the folder but the lock file is touched either way."""
    root = Path(root)
    path = root / LOCK_FILE
    if fcntl is None:
        return OutputDirLock(path, None)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # no O_TRUNC: the holder's pid must survive
    except OSError as e:
        raise UserError(f"cannot create {path} ({e.strerror}); choose a writable output_dir") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            error = _in_use_error(root, fd)
            os.close(fd)
            raise error from None
        os.close(fd)
        if e.errno in _NO_LOCKS:
            log.warning("cannot lock %s (%s); a second run into this output_dir would not be stopped", path, e.strerror)
            return OutputDirLock(path, None)
        raise
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname()}) + "\n"
    os.ftruncate(fd, 0)
    os.pwrite(fd, record.encode("utf-8"), 0)
    return OutputDirLock(path, fd)
