"""Checkpoint directories that appear whole or not at all, and pruning of old ones.

A checkpoint is written into a hidden sibling (`.step_<N>.tmp-<pid>`), its files and the
directory are fsynced, and only then is it renamed to `step_<N>`. A run killed at any moment
leaves earlier checkpoints untouched and no `step_<N>` directory that is partial; the hidden
leftovers are ignored by `list_checkpoints` and removed by `remove_leftovers` (at a run's start,
and by `prune_checkpoints`).
"""

import contextlib
import errno
import os
import re
import shutil
from pathlib import Path
from typing import Iterator, Optional

from finetune.errors import UserError

_STEP_DIR = re.compile(r"^step_(\d+)$")
_TEMP_DIR = re.compile(r"^\.(.+)\.(tmp|old|del)-(\d+)$")


def _fsync_path(path: Path) -> None:
    flags = (os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)) if path.is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:
        return  # directories cannot be opened for fsync on some platforms (Windows)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


def atomic_write_text(path: Path | str, text: str) -> None:
    """Replace the file at `path` so readers see the old content or the new, never a mix."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


# A full disk, a quota, a read-only or forbidden place: the user can fix these, the code cannot.
_FIXABLE_WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


@contextlib.contextmanager
def atomic_directory(final_dir: Path | str) -> Iterator[Path]:
    """Yield a temporary directory that becomes `final_dir` when the block ends without error.

    An existing `final_dir` is replaced: it is moved aside, the new one renamed in, then the
    old one deleted. If the process dies between those two renames, the moved-aside directory
    is put back by the next `atomic_directory` or `list_checkpoints` in the same parent.
    """
    final_dir = Path(final_dir)
    parent = final_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    pid = os.getpid()
    _restore_moved_aside(parent)
    tmp = parent / f".{final_dir.name}.tmp-{pid}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno == errno.EFBIG:
            raise UserError(
                f"cannot write {final_dir} ({exc.strerror}): the file system or the shell's file-size limit "
                "(ulimit -f) caps one file's size; raise the limit or choose an output_dir on another file "
                "system, then run again: nothing saved before was changed"
            ) from None
        if isinstance(exc, OSError) and exc.errno in _FIXABLE_WRITE_ERRORS:
            raise UserError(
                f"cannot write {final_dir} ({exc.strerror}); free space or fix permissions there, or choose "
                "another output_dir, then run again: nothing saved before was changed"
            ) from None
        raise
    old = parent / f".{final_dir.name}.old-{pid}"
    if final_dir.exists():
        os.replace(final_dir, old)
    os.replace(tmp, final_dir)
    _fsync_path(parent)
    shutil.rmtree(old, ignore_errors=True)


def _restore_moved_aside(parent: Path) -> None:
    # This process's own moved-aside dirs are mid-replacement (maybe in another thread): skip them.
    pid = os.getpid()
    for child in parent.iterdir():
        match = _TEMP_DIR.match(child.name)
        if not match or match.group(2) != "old" or int(match.group(3)) == pid:
            continue
        if not (parent / match.group(1)).exists():
            # Another process may be restoring the same directory: losing that race is fine.
            with contextlib.suppress(OSError):
                os.replace(child, parent / match.group(1))


def list_checkpoints(output_dir: Path | str) -> list[Path]:
    """Complete `step_<N>` directories under `output_dir`, oldest (smallest N) first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    _restore_moved_aside(root)
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def latest_checkpoint(output_dir: Path | str) -> Optional[Path]:
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def prune_checkpoints(output_dir: Path | str, keep_last_n: int) -> list[Path]:
    """Delete all but the newest `keep_last_n` checkpoints, and temp leftovers of dead runs.

    Returns the deleted checkpoint paths. A checkpoint is renamed to a hidden name before it
    is deleted, so a crash mid-delete never leaves a partial `step_<N>` behind.
    """
    if keep_last_n < 1:
        raise UserError(f"keep_last_n must be at least 1, got {keep_last_n}; set keep_last_n=1 or more")
    root = Path(output_dir)
    if not root.is_dir():
        return []
    pid = os.getpid()
    checkpoints = list_checkpoints(root)
    doomed = checkpoints[:-keep_last_n]
    for path in doomed:
        hidden = root / f".{path.name}.del-{pid}"
        os.replace(path, hidden)
        shutil.rmtree(hidden, ignore_errors=True)
    remove_leftovers(root)
    return doomed


def remove_leftovers(root: Path | str) -> list[str]:
    """Delete the hidden temp folders and files (`.step_<N>.tmp-<pid>`, `.status.json.tmp-<pid>`, ...)
    that killed processes left in `root`; return their names.

    Only for a folder this process holds the run lock on: no other process writes there then.
    A moved-aside `.old-` folder whose checkpoint is missing is put back, not deleted.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    _restore_moved_aside(root)
    pid = os.getpid()
    removed = []
    for child in root.iterdir():
        match = _TEMP_DIR.match(child.name)
        if not match or int(match.group(3)) == pid:
            continue
        name, kind = match.group(1), match.group(2)
        # A moved-aside `.old-` dir is the only copy of its checkpoint until the new one is in place.
        if kind == "old" and not (root / name).exists():
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                child.unlink()
        removed.append(child.name)
    return sorted(removed)
