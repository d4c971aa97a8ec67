"""Queued production jobs: `tune submit` puts a job on a Celery queue (Redis), `tune worker` runs them.

A worker runs one job at a time (Celery's solo pool, concurrency 1), each in a child process
`python -m finetune.cli job <flags>`: what `tune job` runs, so the job's status.json, events.jsonl,
upload and exit status are the same as when it is started by hand. The job's output goes to
`<jobs_dir>/<user_id>/<job_id>.log` and is copied to the worker's stderr. `--gpus 0,1` gives the worker's
jobs CUDA_VISIBLE_DEVICES=0,1; run one worker per GPU set.

What an operator can count on:
- Nothing is lost when a worker dies. A job's message is acknowledged only after the job ended
  (acks_late, a prefetch of one), so a killed worker's job goes back to the queue after the
  broker's visibility timeout (`--visibility_timeout`, 48 h by default: keep it longer than the
  longest job, or a job still running is handed out twice). The job's process gets SIGTERM when
  its worker dies, even by SIGKILL, so it saves a checkpoint on its way out.
- SIGTERM (or Ctrl-C) to a worker is a warm shutdown: the running job gets SIGTERM, saves a
  checkpoint after the step in progress and ends `preempted` (exit 143); the worker puts the job
  back on the queue and exits. The worker that takes it next resumes it, since a job's
  folder holds its record and checkpoints (finetune/jobs/job.py): resuming needs the same jobs
  folder, on the same machine or a shared file system.
- Each job's outcome is its Celery result, kept under the job id: SUCCESS with {job_id, user_id,
  state, exit_status, output_dir, results_url}; FAILURE with JobFailed("job <id>: <state> (exit
  status N): <error>"); PREEMPTED while a preempted job waits on the queue again. A job whose process
  ended without recording its end (killed, out of memory, refused on bad input before its run) has
  status.json `failed` and `error` and `job_end` records written for it by the worker.

Celery is the optional `worker` extra: it is imported inside functions, so `tune` starts without it.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from finetune.errors import UserError
from finetune.jobs import events, storage
from finetune.jobs.job import JobSpec, parse_job_args, positive_int, state_for

TASK_NAME = "finetune.run_job"
DEFAULT_QUEUE = "finetune"
VISIBILITY_TIMEOUT_S = 48 * 3600
# The job's exit statuses after SIGTERM and Ctrl-C (finetune.training.guards, which imports torch).
PREEMPTED, STOPPED = 143, 130
END_STATES = ("done", "failed", "stopped", "preempted")  # status.json's (finetune.training.monitor)
_PR_SET_PDEATHSIG = 1

SUBMIT_USAGE = """usage: tune submit --broker redis://HOST:PORT/N [--queue Q] <tune job's flags>
       (same as tune job ... --broker URL) queue a job for `tune worker`; prints its job id"""


class JobFailed(Exception):
    """A queued job ended other than done: its Celery result holds this, with the job's error."""


# Flags -----------------------------------------------------------------------------------------------


class _ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are UserErrors (one `error:` line, exit 2), with no abbreviations."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{self.prog}: {message}")


def _broker_url(text: str) -> str:
    if not text.startswith(("redis://", "rediss://")):
        raise argparse.ArgumentTypeError(f"expected redis://HOST:PORT/N, got '{text}'")
    return text


def _gpu_list(text: str) -> list[str]:
    gpus = [g.strip() for g in text.split(",")]
    if not all(gpus):
        raise argparse.ArgumentTypeError(f"expected device numbers like 0,1, got '{text}'")
    return gpus


def worker_parser() -> _ArgumentParser:
    p = _ArgumentParser(prog="tune worker", allow_abbrev=False)
    p.add_argument("--broker", type=_broker_url, required=True, help="the Redis the jobs are queued on")
    p.add_argument("--backend", type=_broker_url, help="where job results are kept; the broker when absent")
    p.add_argument("--queue", default=DEFAULT_QUEUE, help=f"the queue to take jobs from (default {DEFAULT_QUEUE})")
    p.add_argument("--gpus", type=_gpu_list, help="CUDA_VISIBLE_DEVICES for this worker's jobs, e.g. 0,1")
    p.add_argument("--jobs_dir", type=Path, help="the jobs' folders (FINETUNE_JOBS_DIR); ./jobs when absent")
    p.add_argument(
        "--visibility_timeout",
        type=positive_int,
        default=VISIBILITY_TIMEOUT_S,
        help="seconds before an unacknowledged job (its worker died) is handed out again; above the longest job",
    )
    p.add_argument("--hostname", help="the worker's Celery node name (default finetune-<gpus>@<host>)")
    p.add_argument("--loglevel", default="info", choices=("debug", "info", "warning", "error"))
    return p


def parse_worker_args(argv: Sequence[str]) -> argparse.Namespace:
    return worker_parser().parse_args(list(argv))


def split_queue_flags(argv: Sequence[str]) -> tuple[str, str, list[str]]:
    """(--broker, --queue, the job's own flags) from `tune submit`'s command line."""
    found: dict[str, Optional[str]] = {"--broker": None, "--queue": None}
    rest: list[str] = []
    tokens = list(argv)
    i = 0
    while i < len(tokens):
        name, eq, value = tokens[i].partition("=")
        if name in found:
            if not eq:
                if i + 1 >= len(tokens):
                    raise UserError(f"tune submit: {name} needs a value")
                value = tokens[i + 1]
                i += 1
            found[name] = value
        else:
            rest.append(tokens[i])
        i += 1
    broker = found["--broker"]
    if broker is None:
        raise UserError("tune submit needs --broker redis://HOST:PORT/N, the Redis a `tune worker` takes jobs from")
    try:
        _broker_url(broker)
    except argparse.ArgumentTypeError as exc:
        raise UserError(f"tune submit: --broker: {exc}") from None
    return broker, found["--queue"] or DEFAULT_QUEUE, rest


# Celery ----------------------------------------------------------------------------------------------


def celery_app(
    broker: str,
    backend: Optional[str] = None,
    visibility_timeout_s: int = VISIBILITY_TIMEOUT_S,
    results: bool = True,
) -> Any:
    """The Celery app workers and readers of results use: Redis broker and result backend (the
    broker's, unless `backend` says), late acks. A submitter needs no results (`results=False`):
    with a backend, Celery would first connect there to follow the job's result."""
    try:
        # Here, not at the top: Celery is the optional `worker` extra, and `tune` starts without it.
        from celery import Celery
    except ImportError as exc:
        raise UserError("queued jobs need Celery: pip install 'finetune[worker]'") from exc
    app = Celery("finetune", broker=broker, backend=(backend or broker) if results else None, set_as_current=False)
    app.conf.update(
        task_acks_late=True,  # acknowledged when the job ended, not when it started
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,  # a worker holds no job it is not running
        worker_concurrency=1,
        task_track_started=True,
        task_default_queue=DEFAULT_QUEUE,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_extended=True,
        broker_transport_options={"visibility_timeout": visibility_timeout_s},
        broker_connection_retry_on_startup=True,
        worker_cancel_long_running_tasks_on_connection_loss=False,  # a broker blip must not stop training
    )
    return app


def with_ids(job_argv: Sequence[str], spec: JobSpec) -> list[str]:
    """The job's flags with its (maybe generated) --job_id and --user_id spelt out: every attempt
    of a queued job runs under the same id."""
    argv = list(job_argv)
    for flag, value in (("--job_id", spec.job_id), ("--user_id", spec.user_id)):
        if not any(a == flag or a.startswith(flag + "=") for a in argv):
            argv += [flag, value]
    return argv


def submit_job(broker: str, queue: str, spec: JobSpec, job_argv: Sequence[str]) -> None:
    """Queue the job (its Celery task id is the job id); a broker that cannot be reached is a UserError."""
    # Here, not at the top: kombu comes with Celery, the optional `worker` extra.
    from kombu.exceptions import OperationalError

    app = celery_app(broker, results=False)
    try:
        app.send_task(
            TASK_NAME,
            args=[with_ids(job_argv, spec)],
            task_id=spec.job_id,
            queue=queue,
            retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1.0},
        )
    except (OperationalError, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        what = f"cannot queue job {spec.job_id} on {broker} ({reason})"
        raise UserError(f"{what}; start Redis there or fix --broker") from None
    finally:
        app.close()


def run_worker(options: argparse.Namespace) -> int:
    """Run queued jobs until the worker is stopped; returns Celery's exit status."""
    if options.jobs_dir is not None:
        os.environ["FINETUNE_JOBS_DIR"] = str(options.jobs_dir.resolve())
    app = celery_app(options.broker, options.backend, options.visibility_timeout)
    runner = JobRunner(options.gpus)

    def run_job(task: Any, argv: list[str]) -> dict[str, Any]:
        return runner.run(task, argv)

    app.task(name=TASK_NAME, bind=True, throws=(JobFailed,))(run_job)
    # Here, not at the top: Celery is the optional `worker` extra.
    from celery.signals import worker_shutting_down

    worker_shutting_down.connect(runner.stop, weak=False)
    gpus = "-".join(options.gpus) if options.gpus else "cpu"
    argv = [
        *["worker", "--pool", "solo", "--concurrency", "1", "--prefetch-multiplier", "1"],
        *["--queues", options.queue, "--loglevel", options.loglevel],
        *["--hostname", options.hostname or f"finetune-{gpus}@{socket.gethostname()}"],
        *["--without-gossip", "--without-mingle", "--without-heartbeat"],
    ]
    return app.start(argv) or 0


# Running one job -------------------------------------------------------------------------------------


def job_log(output_dir: Path) -> Path:
    """Where a queued job's output goes: `<job folder>.log` beside the folder, so the folder (and
    its upload) holds only what the job itself writes there; every attempt appends."""
    return output_dir.parent / f"{output_dir.name}.log"


def _prctl() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: a killed worker's job runs on to its end
        return None


class JobRunner:
    """Runs each job in a child process and turns its end into the task's result; `stop` (the
    worker's shutdown) passes SIGTERM on to the running job."""

    def __init__(self, gpus: Optional[list[str]] = None) -> None:
        self.gpus = gpus
        self.child: Optional[subprocess.Popen] = None
        self.stopping = False
        self._prctl = _prctl()  # looked up here: the child only calls it between fork and exec

    def stop(self, **_: Any) -> None:
        """The worker is shutting down (in its signal handler): SIGTERM to the running job."""
        self.stopping = True
        child = self.child
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)

    def run(self, task: Any, argv: list[str]) -> dict[str, Any]:
        # Here, not at the top: Celery is the optional `worker` extra.
        from celery.exceptions import Reject

        try:
            spec = parse_job_args(argv)
        except UserError as exc:
            raise JobFailed(f"the job's flags are refused: {exc}") from None
        output_dir = spec.output_dir()
        result = {"job_id": spec.job_id, "user_id": spec.user_id, "output_dir": str(output_dir)}
        if self.stopping:  # shutting down already: the job goes back to the queue untouched
            raise Reject("the worker is shutting down", requeue=True)
        if self.gpus is not None and spec.num_gpus > len(self.gpus):
            code, said, last = 2, self._too_many_gpus(spec.num_gpus), None
        else:
            code, said, last = self.run_child(argv, job_log(output_dir))
        state = state_for(code)
        if code == 3:  # trained; the job_end record says whether the upload or the deletion failed
            uploaded = (_last_record(output_dir) or {}).get("uploaded_to")
            state = "done, uploaded, weights kept" if uploaded else "done, not uploaded"
        error = None
        if code not in (0, PREEMPTED, STOPPED):
            status = storage.read_json(output_dir / "status.json") or {}
            # This attempt's `error:` line first: status.json may still hold an earlier attempt's.
            error = said or status.get("error") or last or f"exit status {code}"
        if code not in (0, 3, PREEMPTED, STOPPED):
            record_unrecorded_end(output_dir, error or f"exit status {code}", code)
        result.update(state=state, exit_status=code, results_url=spec.results_location(), error=error)
        if code == PREEMPTED:
            task.update_state(state="PREEMPTED", meta=result)
            raise Reject(f"job {spec.job_id} preempted; back on the queue", requeue=True)
        if code != 0:
            raise JobFailed(f"job {spec.job_id}: {state} (exit status {code})" + (f": {error}" if error else ""))
        return result

    def _too_many_gpus(self, num_gpus: int) -> str:
        gpus = self.gpus or []
        return (
            f"--num_gpus {num_gpus} is more than this worker's {len(gpus)} GPU(s) ({','.join(gpus)}); "
            "queue the job for a worker started with more --gpus"
        )

    def child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self.gpus)
        return env

    def run_child(self, argv: Sequence[str], log_path: Path) -> tuple[int, Optional[str], Optional[str]]:
        """Run `tune job <argv>`; its exit status (128 + N when signal N killed it), its `error:`
        line (or how it was killed) and its last line (a traceback's last), each None if absent.

        The child writes its output to `log_path`, which the worker follows and copies to its own
        stderr: a pipe to the worker would break when the worker dies and take the job with it.
        It has its own session, so a Ctrl-C at the worker's terminal reaches it only as the
        worker's SIGTERM.
        """
        command = [sys.executable, "-m", "finetune.cli", "job", *argv]
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            start = log.tell()
            proc = subprocess.Popen(
                command,
                env=self.child_env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=self._end_with_parent,
            )
        self.child = proc
        if self.stopping:  # the shutdown came between the check and the start
            proc.send_signal(signal.SIGTERM)
        follower = threading.Thread(target=_follow, args=(log_path, start, proc), daemon=True)
        follower.start()
        try:
            code = proc.wait()
        finally:
            self.child = None
            if proc.poll() is None:  # the worker is leaving in a hurry (cold shutdown)
                proc.send_signal(signal.SIGTERM)
        follower.join(timeout=10)
        if code < 0:
            name = signal.Signals(-code).name
            return 128 - code, f"the job's process was killed by {name} (out of memory, or stopped by hand)", None
        return (code, *_error_and_last_line(_tail(log_path, start)))

    def _end_with_parent(self) -> None:
        # In the child, before exec: SIGTERM when the worker dies, however it dies.
        if self._prctl is not None:
            self._prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _follow(path: Path, offset: int, proc: subprocess.Popen) -> None:
    """Copy what the job writes to `path` (from `offset`) to the worker's stderr until it ends."""
    out = sys.__stderr__
    with open(path, "rb") as f:
        f.seek(offset)
        while True:
            ended = proc.poll() is not None
            chunk = f.read()
            if chunk and out is not None:
                out.write(chunk.decode("utf-8", "replace"))
                out.flush()
            if ended:
                return
            if not chunk:
                time.sleep(0.2)


def _tail(path: Path, offset: int, size: int = 1 << 16) -> list[str]:
    """The last lines the job wrote to `path` after `offset`."""
    with open(path, "rb") as f:
        f.seek(max(offset, f.seek(0, os.SEEK_END) - size))
        return f.read().decode("utf-8", "replace").splitlines()[-20:]


def _error_and_last_line(tail: Sequence[str]) -> tuple[Optional[str], Optional[str]]:
    """The job's last `error:` line (without the prefix) and its last line; None where absent."""
    lines = [line.rsplit("\r", 1)[-1].strip() for line in tail]  # a progress bar's last state
    lines = [line for line in lines if line]
    errors = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
    return (errors[-1] if errors else None), (lines[-1] if lines else None)


def record_unrecorded_end(output_dir: Path, error: str, code: int) -> None:
    """The `error` and `job_end` records, and status.json `failed`, for a job whose process ended
    without writing them: killed, or refused before its run began. A job killed while uploading
    keeps status.json `done` (it trained; running it again finishes the upload). A folder that a
    live run holds (a second delivery of a job still running) is left alone."""
    status = storage.read_json(output_dir / "status.json") or {}
    last = _last_record(output_dir) or {}
    if _alive(status.get("pid")) or (status.get("state") in END_STATES and last.get("kind") == "job_end"):
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    if status.get("state") != "done":
        storage.write_json_atomic(output_dir / "status.json", {**status, "state": "failed", "error": error})
    event_log = events.reopen(output_dir)
    event_log.error(error)
    event_log.job_end("failed", exit_status=code)
    event_log.close()


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _last_record(output_dir: Path) -> Optional[dict[str, Any]]:
    """events.jsonl's last record, or None."""
    try:
        lines = (output_dir / events.EVENTS_FILE).read_text(encoding="utf-8").splitlines()
        return json.loads(lines[-1]) if lines else None
    except (OSError, ValueError):
        return None
