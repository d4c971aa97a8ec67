"""The job's event log: `output_dir/events.jsonl`, one JSON object per line, and optional sinks.

Each record has `kind`, `time` (ISO 8601, UTC), `elapsed_s` (seconds since the job started) and
the fields of its kind:

- `job_start`: job_id (FINETUNE_JOB_ID or SLURM_JOB_ID, if set), recipe, pid, host
- `system`: cpu (model, cores), memory_total_bytes, gpus (name, memory_bytes), versions
  (python, torch, finetune, torchao, transformers where installed)
- `config`: params, the resolved parameters of the run
- `step`: rank, step, epoch, loss, lr, tokens_per_second, grad_norm (the values of metrics.jsonl)
- `epoch`: epoch, steps, mean_loss (over the steps this process trained in that epoch)
- `checkpoint`: step, path, files ({relative path: bytes})
- `upload`: url, files, bytes (appended by `tune job` after the run, through `reopen`)
- `error`: message, type
- `job_end`: state (done, failed, stopped or preempted); written by `tune job` it also holds
  exit_status (0, or 3 when the upload failed or the weights could not be deleted), and by
  `tune worker` when the job's process ended without writing one (killed, or stopped on bad input)

Each line is written with one write call to a file opened for appending, so a reader never sees
a torn line. Only rank 0 writes; elsewhere every method does nothing.

Sinks get every record from a background thread through a bounded queue: a full queue drops the
record (and counts it), a failing sink is logged once and counted, so nothing here ever blocks or
stops training. `WebhookSink` POSTs each record as JSON; `RedisSink` publishes it on a Redis
pub/sub channel. This module imports nothing of the training code, so any layer may use it.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import queue
import socket
import sys
import threading
import time
import urllib.request
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from finetune.errors import UserError

log = logging.getLogger(__name__)

EVENTS_FILE = "events.jsonl"
JOB_ID_VARIABLES = ("FINETUNE_JOB_ID", "SLURM_JOB_ID")
VERSIONED_PACKAGES = ("torch", "finetune", "torchao", "transformers")
# Set by `tune job` for its run: a run that ends done writes no job_end; the job writes it after its upload.
JOB_END_AFTER_UPLOAD = "FINETUNE_JOB_END_AFTER_UPLOAD"


class Sink:
    """Sends records from a daemon thread; `submit` never blocks, `close` waits at most its timeout."""

    name = "sink"

    def __init__(self, max_queued: int = 1000) -> None:
        self.sent = 0
        self.dropped = 0  # the queue was full, or close gave up before they went
        self.failed = 0  # the sink refused them or could not be reached
        self._queue: queue.Queue = queue.Queue(maxsize=max_queued)
        self._warned = False
        self._thread = threading.Thread(target=self._work, name=f"events-{self.name}", daemon=True)
        self._thread.start()

    def send(self, record: dict[str, Any]) -> None:
        raise NotImplementedError

    def submit(self, record: dict[str, Any]) -> None:
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1

    def _work(self) -> None:
        while True:
            record = self._queue.get()
            if record is None:
                return
            try:
                self.send(record)
                self.sent += 1
            except Exception as exc:  # a sink never stops training: log once, count the rest
                self.failed += 1
                if not self._warned:
                    self._warned = True
                    log.warning("events: %s failed (%s); later failures are only counted", self.name, exc)

    def close(self, timeout_s: float = 2.0) -> None:
        """Send what is queued within `timeout_s`; what is left then is dropped."""
        deadline = time.monotonic() + timeout_s
        while self._thread.is_alive():
            try:
                self._queue.put(None, timeout=max(deadline - time.monotonic(), 0.001))
                break
            except queue.Full:
                if time.monotonic() >= deadline:
                    break
        self._thread.join(max(deadline - time.monotonic(), 0))
        if self._thread.is_alive():
            left = self._queue.qsize()
            self.dropped += left
            log.warning("events: %s still busy after %.1fs; dropped %d record(s)", self.name, timeout_s, left)


class WebhookSink(Sink):
    """POST each record as JSON to `url`; up to `retries` more tries with a doubling backoff."""

    name = "webhook"

    def __init__(self, url: str, retries: int = 3, timeout_s: float = 2.0, backoff_s: float = 0.1) -> None:
        self.url, self.retries, self.timeout_s, self.backoff_s = url, retries, timeout_s, backoff_s
        super().__init__()

    def send(self, record: dict[str, Any]) -> None:
        body = json.dumps(record).encode()
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(
                self.url, data=body, method="POST", headers={"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    response.read()
                return
            except Exception:
                if attempt == self.retries:
                    raise
                time.sleep(self.backoff_s * 2**attempt)


class RedisSink(Sink):
    """PUBLISH each record as JSON on the Redis pub/sub `channel` of the server at `url`."""

    name = "redis"

    def __init__(self, url: str, channel: str, timeout_s: float = 2.0) -> None:
        try:
            import redis  # here, not at the top: the Redis client is an optional extra (events)
        except ImportError as exc:
            raise UserError("events_redis_url needs the Redis client: pip install 'finetune[events]'") from exc

        self.channel = channel
        self.client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        super().__init__()

    def send(self, record: dict[str, Any]) -> None:
        self.client.publish(self.channel, json.dumps(record))

    def close(self, timeout_s: float = 2.0) -> None:
        super().close(timeout_s)
        self.client.close()


def sinks_for(
    webhook: Optional[str] = None, redis_url: Optional[str] = None, redis_channel: str = "finetune.events"
) -> list[Sink]:
    """The sinks a run's params ask for (events_webhook, events_redis_url, events_redis_channel)."""
    sinks: list[Sink] = []
    if webhook:
        sinks.append(WebhookSink(webhook))
    if redis_url:
        sinks.append(RedisSink(redis_url, redis_channel))
    return sinks


class EventLog:
    """Appends the job's records to `output_dir/events.jsonl` (rank 0) and hands them to `sinks`."""

    def __init__(self, output_dir: Path | str, rank: int = 0, sinks: Sequence[Sink] = ()) -> None:
        self.enabled = rank == 0
        self.rank = rank
        self.path = Path(output_dir) / EVENTS_FILE
        self.sinks = list(sinks)
        self._started = time.monotonic()
        self._lock = threading.Lock()
        self._epoch_losses: list[float] = []
        self._ended = False
        self._warned = False
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    @classmethod
    def disabled(cls) -> "EventLog":
        """A log that writes nothing (a run that has not started one)."""
        return cls(".", rank=-1)

    def emit(self, kind: str, **fields: Any) -> Optional[dict[str, Any]]:
        """Write one record of `kind` and hand it to the sinks; a failed write is logged, not raised."""
        if not self.enabled:
            return None
        record = {
            "kind": kind,
            "time": datetime.now(timezone.utc).isoformat(),
            "elapsed_s": round(time.monotonic() - self._started, 3),
            **fields,
        }
        line = (json.dumps(record, default=str) + "\n").encode()
        with self._lock:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    os.write(fd, line)  # one write of the whole line: never a torn line
                finally:
                    os.close(fd)
            except OSError as exc:
                if not self._warned:
                    self._warned = True
                    log.warning("events: could not write %s (%s); later failures are not logged", self.path, exc)
            for sink in self.sinks:
                sink.submit(record)
        return record

    # The kinds ----------------------------------------------------------------------------------

    def job_start(self, recipe: str) -> None:
        job_id = next((os.environ[v] for v in JOB_ID_VARIABLES if os.environ.get(v)), None)
        self.emit("job_start", job_id=job_id, recipe=recipe, pid=os.getpid(), host=socket.gethostname())

    def system(self) -> None:
        if self.enabled:
            self.emit("system", **system_specs())

    def config(self, params: dict[str, Any]) -> None:
        self.emit("config", params=params)

    def add_loss(self, loss: float) -> None:
        """Every step's loss, for the epoch's mean (step records are written every N steps only)."""
        self._epoch_losses.append(float(loss))

    def step(self, *, step: int, epoch: int, loss: float, lr: float, **metrics: Any) -> None:
        """A logged step: loss, lr and what else the step measured (tokens_per_second, grad_norm)."""
        measured = {name: float(value) for name, value in metrics.items()}  # as metrics.jsonl has them
        self.emit("step", rank=self.rank, step=step, epoch=epoch, loss=float(loss), lr=float(lr), **measured)

    def epoch(self, epoch: int, steps: int) -> None:
        losses, self._epoch_losses = self._epoch_losses, []
        mean = sum(losses) / len(losses) if losses else None
        self.emit("epoch", epoch=epoch, steps=steps, mean_loss=mean)

    def checkpoint(self, step: int, path: Path | str) -> None:
        if not self.enabled:
            return
        path = Path(path)
        files = {str(f.relative_to(path)): f.stat().st_size for f in sorted(path.rglob("*")) if f.is_file()}
        self.emit("checkpoint", step=step, path=str(path), files=files)

    def upload(self, url: str, files: Iterable[str], num_bytes: int) -> None:
        self.emit("upload", url=url, files=list(files), bytes=num_bytes)

    def error(self, error: BaseException | str) -> None:
        if isinstance(error, BaseException):
            self.emit("error", message=str(error) or type(error).__name__, type=type(error).__name__)
        else:
            self.emit("error", message=error, type=None)

    def job_end(self, state: str, **fields: Any) -> None:
        """The run's end (once): done, failed, stopped or preempted.

        Under `tune job` (JOB_END_AFTER_UPLOAD set) a run that is done leaves its job_end to the
        job, which writes it after the upload, so a watcher never takes the job for over early.
        """
        if self._ended:
            return
        self._ended = True
        if state == "done" and os.environ.get(JOB_END_AFTER_UPLOAD) == "1":
            return
        self.emit("job_end", state=state, **fields)

    def close(self, timeout_s: float = 2.0) -> None:
        """Let the sinks send what they hold, for at most `timeout_s` in all."""
        deadline = time.monotonic() + timeout_s
        for sink in self.sinks:
            sink.close(max(deadline - time.monotonic(), 0.05))


def reopen(output_dir: Path | str) -> EventLog:
    """The event log of a run that has ended, to append a record (the upload after training).

    Its records' elapsed_s count from the run's job_start, and go to the sinks the run's config
    record named (events_webhook, events_redis_url); close it after, as a run does.
    """
    path = Path(output_dir) / EVENTS_FILE
    first: dict[str, Any] = {}
    params: dict[str, Any] = {}
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                first = first or record
                if record.get("kind") == "config":
                    params = record.get("params") or {}
                    break
    except (OSError, ValueError):
        pass
    try:
        sinks = sinks_for(
            params.get("events_webhook"),
            params.get("events_redis_url"),
            params.get("events_redis_channel") or "finetune.events",
        )
    except UserError as exc:
        log.warning("events: %s", exc)
        sinks = []
    event_log = EventLog(output_dir, sinks=sinks)
    if first.get("time"):
        started = datetime.fromisoformat(first["time"])
        since = (datetime.now(timezone.utc) - started).total_seconds() - float(first.get("elapsed_s") or 0)
        event_log._started = time.monotonic() - max(since, 0.0)
    return event_log


def system_specs() -> dict[str, Any]:
    """CPU, memory, GPUs and the versions of the libraries a run depends on."""
    return {
        "cpu": {"model": _cpu_model(), "cores": os.cpu_count()},
        "memory_total_bytes": _memory_total(),
        "gpus": _gpus(),
        "versions": {"python": platform.python_version(), **_versions()},
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_total() -> Optional[int]:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _gpus() -> list[dict[str, Any]]:
    # A run has torch loaded already; this module does not import it, to stay light for job tools.
    torch = sys.modules.get("torch")
    if torch is None:
        return []
    try:
        if not torch.cuda.is_available():
            return []
        return [
            {"name": props.name, "memory_bytes": props.total_memory}
            for props in (torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count()))
        ]
    except Exception:  # specs are informative: never fail a run over them
        return []


def _versions() -> dict[str, str]:
    versions = {}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions
