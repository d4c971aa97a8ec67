"""A job status file that tools outside the run can poll: `output_dir/status.json`.

It holds the run's state (starting, running, checkpointing, then one of the ends: done, failed,
stopped by Ctrl-C, or preempted by SIGTERM), progress (step, epoch, loss), the newest complete
checkpoint, the error on failure, the pid, and two clocks:
`heartbeat_at`, refreshed by a daemon thread every few seconds, goes stale only when the
process is dead (killed, or the machine gone); `progress_at`, set whenever the training loop
reports, also goes stale when the process lives but the loop is stuck (say, a hung collective).

The file is replaced atomically (write a temp file, then os.replace), so readers never see a
half-written file. A failed write is logged and skipped: monitoring never stops training.
Only rank 0 writes; on other ranks every method does nothing.
"""

import json
import logging
import os
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from finetune.checkpointing.atomic import atomic_write_text
from finetune.errors import UserError

log = logging.getLogger(__name__)

# A run stopped by Ctrl-C (`stopped`) or by a scheduler's SIGTERM (`preempted`) saved a checkpoint
# at a step boundary and resumes exactly: not a failure, and a scheduler may simply requeue it.
END_STATES = ("done", "failed", "stopped", "preempted")
STATES = ("starting", "running", "checkpointing", *END_STATES)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


class JobMonitor:
    def __init__(self, output_dir: Path | str, *, rank: int, heartbeat_interval_s: float = 5.0) -> None:
        if heartbeat_interval_s <= 0:
            raise UserError(
                f"heartbeat_interval_s must be positive, got {heartbeat_interval_s}; set it to a few seconds"
            )
        self.enabled = rank == 0
        self.path = Path(output_dir) / "status.json"
        self.interval = heartbeat_interval_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._warned = False
        self._thread: Optional[threading.Thread] = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        now = _now()
        self._status: dict[str, Any] = {
            "state": "starting",
            "step": 0,
            "epoch": 0,
            "loss": None,
            "started_at": now,
            "heartbeat_at": now,
            "progress_at": now,
            "last_checkpoint": self._previous_checkpoint(),
            "error": None,
            "pid": os.getpid(),
        }
        self._write()
        self._thread = threading.Thread(target=self._beat, name="job-monitor-heartbeat", daemon=True)
        self._thread.start()

    def _previous_checkpoint(self) -> Optional[str]:
        # A resumed run keeps pointing at the checkpoint the last run finished, if it is still there.
        try:
            previous = json.loads(self.path.read_text(encoding="utf-8")).get("last_checkpoint")
        except (OSError, ValueError, AttributeError):
            return None
        return previous if isinstance(previous, str) and Path(previous).is_dir() else None

    def _write(self) -> None:
        with self._lock:
            try:
                atomic_write_text(self.path, json.dumps(self._status, indent=2) + "\n")
            except OSError as e:
                if not self._warned:
                    log.warning("could not write %s (%s); training continues", self.path, e)
                    self._warned = True

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                self._status["heartbeat_at"] = _now()
            self._write()

    def _set(self, **fields: Any) -> None:
        if not self.enabled:
            return
        now = _now()
        with self._lock:
            self._status.update(fields, heartbeat_at=now, progress_at=now)
        self._write()

    def _stop_heartbeat(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    @property
    def status(self) -> dict[str, Any]:
        """A copy of what the file holds (empty off rank 0)."""
        if not self.enabled:
            return {}
        with self._lock:
            return dict(self._status)

    def set_state(self, state: str) -> None:
        if state not in STATES:
            raise ValueError(f"unknown job state {state!r}; expected one of {STATES}")
        self._set(state=state)

    def update(self, *, step: Optional[int] = None, epoch: Optional[int] = None, loss: Optional[float] = None) -> None:
        fields: dict[str, Any] = {}
        if step is not None:
            fields["step"] = int(step)
        if epoch is not None:
            fields["epoch"] = int(epoch)
        if loss is not None:
            fields["loss"] = float(loss)
        self._set(**fields)

    def checkpoint_saved(self, path: Path | str) -> None:
        """Record a complete checkpoint; a run that was checkpointing goes back to running."""
        if not self.enabled:
            return
        fields: dict[str, Any] = {"last_checkpoint": str(path)}
        if self._status["state"] == "checkpointing":
            fields["state"] = "running"
        self._set(**fields)

    def fail(self, message: str) -> None:
        self._stop_heartbeat()
        self._set(state="failed", error=message)

    def finish(self) -> None:
        self._stop_heartbeat()
        self._set(state="done")

    def stopped(self, state: str) -> None:
        """Record a run that ended on request before finishing: `stopped` or `preempted`."""
        if state not in ("stopped", "preempted"):
            raise ValueError(f"a run ends on request as stopped or preempted, not {state!r}")
        self._stop_heartbeat()
        self._set(state=state)

    def close(self) -> None:
        """End monitoring; a run closed before it finished (a notebook's failed setup) is failed."""
        if self._stop.is_set():
            return
        self._stop_heartbeat()
        if self.enabled and self._status["state"] not in END_STATES:
            self._set(state="failed", error="closed before training finished")
