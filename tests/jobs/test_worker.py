"""`tune submit` and `tune worker`: jobs queued on a real redis-server and run by a real worker
process. The end-to-end tests run a tiny full fine-tune, a tiny LoRA and the dummy through one
worker with uploads to a local S3 server (moto), and SIGTERM a worker mid-job: the job ends
preempted with a checkpoint, goes back on the queue, and the next worker's resume ends with the
weights of an uninterrupted run of the same job, bit for bit; a SIGKILLed worker's job is not lost."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from finetune.jobs.worker import JobFailed, JobRunner, celery_app, record_unrecorded_end
from tests.cli_helpers import error_line, run
from tests.jobs.helpers import assert_uploaded, read_events, tree_bytes

REPO = Path(__file__).resolve().parents[2]
DEMO = "pkg:data/demo/train.jsonl"
NOWHERE = "redis://127.0.0.1:1/0"  # nothing listens there
TINY = ["--dataset_id", DEMO, "--batch_size", "4", "--num_epochs", "1"]
FAST = ["eval_dataset=none", "eval_every_n_steps=none", "max_seq_len=32", "device=cpu"]


def tune(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "finetune.cli", *argv], capture_output=True, text=True, env=env, timeout=120
    )


def queued(redis_url: str, queue: str = "finetune") -> list[dict]:
    """The messages waiting on `queue`, oldest first: Celery's headers and the job's flags (argv)."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        raw = client.lrange(queue, 0, -1)
    finally:
        client.close()
    messages = []
    for item in reversed(raw):  # kombu pushes on the left and pops on the right
        message = json.loads(item)
        args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        messages.append({**message["headers"], "argv": args[0]})
    return messages


# The launcher and the submit side ------------------------------------------------------------------


def test_tune_ls_and_submit_help_import_neither_torch_nor_celery():
    probe = (
        "import sys\n"
        "from finetune.cli import main\n"
        "main(['ls']); main(['submit', '--help']); main(['worker', '--help'])\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'celery', 'kombu'}))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["submit", "--job_config_name", "tiny_full"], "tune submit needs --broker redis://"),
        (["submit", "--broker", "http://x", "--job_config_name", "tiny_full"], "expected redis://HOST:PORT/N"),
        (["submit", "--broker", NOWHERE, "--job_config_name", "tiny_ful"], "did you mean 'tiny_full'"),
        (["job", f"--broker={NOWHERE}", "--job_config_name", "dummy", "--batch_sise", "2"], "--batch_size?"),
        (["submit", "--broker", NOWHERE, "--job_config_name", "dummy", "--override", "bogus=1"], "bogus"),
        (["worker", "--gpus", "0,,1", "--broker", NOWHERE], "expected device numbers"),
        (["worker"], "required: --broker"),
    ],
)
def test_bad_flags_are_refused_before_anything_is_queued(capsys, argv, expected):
    code, out, err = run(capsys, *argv)  # port 1: nothing listens; the flags are refused first
    assert code == 2 and not out
    assert expected in error_line(err) and len(err.strip().splitlines()) == 1


def test_an_unreachable_broker_is_one_line(capsys):
    code, out, err = run(capsys, "submit", "--broker", NOWHERE, "--job_config_name", "dummy")
    assert code == 2 and not out
    assert "cannot queue job" in error_line(err) and "start Redis there or fix --broker" in error_line(err)


def test_submit_queues_the_job_under_its_id_with_its_ids_spelt_out(capsys, redis_url, monkeypatch):
    monkeypatch.setenv("USER", "carol")
    code, out, err = run(capsys, "submit", "--broker", redis_url, "--queue", "q1", "--job_config_name", "dummy")
    assert code == 0, err
    job_id = out.strip()
    code, out, err = run(capsys, "job", "--job_config_name", "dummy", "--job_id", "mine", f"--broker={redis_url}")
    assert code == 0 and out.strip() == "mine", err
    first, second = queued(redis_url, "q1") + queued(redis_url)
    assert first["task"] == "finetune.run_job" and first["id"] == job_id
    assert first["argv"] == ["--job_config_name", "dummy", "--job_id", job_id, "--user_id", "carol"]
    assert second["id"] == "mine" and second["argv"][-2:] == ["--user_id", "carol"]


# The worker's side, in process -----------------------------------------------------------------------


def test_the_worker_gives_its_jobs_its_gpus(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")
    assert JobRunner(["0", "1"]).child_env()["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert JobRunner().child_env()["CUDA_VISIBLE_DEVICES"] == "7"


def test_a_job_asking_for_more_gpus_than_the_worker_has_fails_with_its_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_JOBS_DIR", str(tmp_path))
    argv = ["--job_config_name", "dummy", "--job_id", "big", "--user_id", "u", "--num_gpus", "2"]
    with pytest.raises(JobFailed, match=r"job big: failed \(exit status 2\): --num_gpus 2 is more than .* 1 GPU"):
        JobRunner(["3"]).run(task=None, argv=argv)
    status = json.loads((tmp_path / "u" / "big" / "status.json").read_text())
    assert status["state"] == "failed" and "queue the job for a worker started with more --gpus" in status["error"]
    assert [r["kind"] for r in read_events(tmp_path / "u" / "big")] == ["error", "job_end"]


def test_a_job_that_died_without_recording_its_end_gets_one(tmp_path):
    killed = tmp_path / "killed"
    killed.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (killed / "status.json").write_text(json.dumps({"state": "running", "step": 3, "pid": int(dead.stdout)}))
    (killed / "events.jsonl").write_text(json.dumps({"kind": "job_start", "time": "2026-01-01T00:00:00+00:00"}) + "\n")
    record_unrecorded_end(killed, "killed by SIGKILL", 137)
    status = json.loads((killed / "status.json").read_text())
    assert status == {"state": "failed", "step": 3, "pid": int(dead.stdout), "error": "killed by SIGKILL"}
    records = read_events(killed)
    assert [r["kind"] for r in records] == ["job_start", "error", "job_end"]
    assert records[-1] == {**records[-1], "state": "failed", "exit_status": 137}

    refused = tmp_path / "never-started"  # refused before its run: no folder yet
    record_unrecorded_end(refused, "dataset file /x does not exist", 2)
    assert json.loads((refused / "status.json").read_text())["state"] == "failed"

    busy = tmp_path / "busy"  # a live run holds it (a second delivery of a running job): untouched
    busy.mkdir()
    (busy / "status.json").write_text(json.dumps({"state": "running", "pid": os.getpid()}))
    record_unrecorded_end(busy, "output_dir is in use", 2)
    assert json.loads((busy / "status.json").read_text())["state"] == "running"
    assert not (busy / "events.jsonl").exists()


# A real worker ----------------------------------------------------------------------------------------


@pytest.fixture
def worker_env(tmp_path, aws_env, s3_endpoint) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "AWS_ENDPOINT_URL": s3_endpoint}
    env["FINETUNE_CACHE_DIR"] = str(tmp_path / "cache")
    for name in ("FINETUNE_JOB_ID", "FINETUNE_JOB_END_AFTER_UPLOAD", "CUDA_VISIBLE_DEVICES"):
        env.pop(name, None)
    return env


@contextlib.contextmanager
def tune_worker(broker: str, jobs_dir: Path, env: dict, log: Path, *flags: str) -> Iterator[subprocess.Popen]:
    """A `tune worker` process; stopped (SIGTERM, then SIGKILL) if the test has not stopped it."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "finetune.cli", "worker", "--broker", broker, "--jobs_dir", str(jobs_dir), *flags],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def submit(broker: str, env: dict, *argv: str) -> str:
    done = tune("submit", "--broker", broker, *argv, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def outcome(broker: str, job_id: str, log: Path, timeout_s: float = 300) -> object:
    app = celery_app(broker)
    try:
        result = app.AsyncResult(job_id)
        try:
            result.get(timeout=timeout_s, propagate=False)
        except Exception:
            pytest.fail(f"job {job_id} did not end within {timeout_s} s; the worker's log:\n{log.read_text()[-4000:]}")
        return result.state, result.result
    finally:
        app.close()


def in_order(kinds: list[str]) -> list[str]:
    """The kinds with repeats in a row folded into one: step, step, step -> step."""
    return [k for i, k in enumerate(kinds) if i == 0 or kinds[i - 1] != k]


@pytest.mark.slow
def test_a_worker_runs_queued_jobs_one_after_another_and_uploads_each(
    tmp_path, redis_url, worker_env, s3_options, bucket
):
    results = f"s3://{bucket}/results"
    common = ["--user_id", "ops", "--results_url", results]
    bad = submit(redis_url, worker_env, "--job_config_name", "tiny_full", "--dataset_id", "/no/such.jsonl", *common)
    full = submit(redis_url, worker_env, "--job_config_name", "tiny_full", *TINY, *common, "--override", *FAST,
                  "max_steps_per_epoch=3")  # fmt: skip
    lora = submit(redis_url, worker_env, "--job_config_name", "tiny_lora", *TINY, *common, "--override", *FAST,
                  "max_steps_per_epoch=3")  # fmt: skip
    dummy = submit(redis_url, worker_env, "--job_config_name", "dummy", *common)
    log = tmp_path / "worker.log"
    with tune_worker(redis_url, tmp_path / "jobs", worker_env, log):
        ends = {job: outcome(redis_url, job, log) for job in (bad, full, lora, dummy)}

    state, error = ends[bad]
    assert state == "FAILURE" and "failed (exit status 2): dataset file /no/such.jsonl does not exist" in str(error)
    status = json.loads((tmp_path / "jobs" / "ops" / bad / "status.json").read_text())
    assert status["state"] == "failed" and "/no/such.jsonl" in status["error"]
    assert read_events(tmp_path / "jobs" / "ops" / bad)[-1]["state"] == "failed"

    for job in (full, lora, dummy):
        output_dir = tmp_path / "jobs" / "ops" / job
        state, result = ends[job]
        assert state == "SUCCESS" and result == {
            "job_id": job,
            "user_id": "ops",
            "output_dir": str(output_dir),
            "state": "done",
            "exit_status": 0,
            "results_url": f"{results}/ops/{job}",
            "error": None,
        }
        assert_uploaded(s3_options, output_dir, f"{results}/ops/{job}")
        kinds = in_order([r["kind"] for r in read_events(output_dir)])
        expected = ["job_start", "system", "config", "step", "epoch", "checkpoint", "upload", "job_end"]
        assert kinds == expected, (job, kinds)
    assert json.loads((tmp_path / "jobs" / "ops" / full / "status.json").read_text())["step"] == 3
    assert (tmp_path / "jobs" / "ops" / lora / "step_3" / "adapter_model.safetensors").is_file()


def wait_for_step(output_dir: Path, step: int, log: Path, timeout_s: float = 300) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            status = json.loads((output_dir / "status.json").read_text())
        except (OSError, ValueError):
            status = {}
        if status.get("step", 0) >= step and status.get("state") == "running":
            return status
        time.sleep(0.02)
    pytest.fail(f"{output_dir.name} did not reach step {step}; the worker's log:\n{log.read_text()[-4000:]}")


def weights(step_dir: Path) -> dict[str, bytes]:
    return {rel: data for rel, data in tree_bytes(step_dir).items() if rel.endswith(".safetensors")}


@pytest.mark.slow
def test_sigterm_to_a_worker_preempts_its_job_and_the_next_worker_resumes_it_exactly(tmp_path, redis_url, worker_env):
    steps = 40
    job = ["--job_config_name", "tiny_full", *TINY, "--user_id", "ops", "--override", *FAST]
    job += [f"max_steps_per_epoch={steps}"]
    jobs = tmp_path / "jobs" / "ops"
    log = tmp_path / "worker.log"
    reference = submit(redis_url, worker_env, *job, "--job_id", "reference")
    preempted = submit(redis_url, worker_env, *job, "--job_id", "preempted")
    with tune_worker(redis_url, tmp_path / "jobs", worker_env, log) as worker:
        assert outcome(redis_url, reference, log)[0] == "SUCCESS"
        wait_for_step(jobs / preempted, 3, log)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(120) == 0  # a warm shutdown: the worker waited for its job to stop

    status = json.loads((jobs / preempted / "status.json").read_text())
    assert status["state"] == "preempted", status
    stopped_at = int(Path(status["last_checkpoint"]).name.removeprefix("step_"))
    assert 3 <= stopped_at < steps
    assert (jobs / preempted / f"step_{stopped_at}" / "recipe_state.pt").is_file()
    last = read_events(jobs / preempted)[-1]
    assert last == {**last, "kind": "job_end", "state": "preempted"}
    app = celery_app(redis_url)
    assert app.AsyncResult(preempted).state == "PREEMPTED"
    app.close()
    assert [m["id"] for m in queued(redis_url)] == [preempted]  # back on the queue, as it was submitted
    assert queued(redis_url)[0]["argv"] == [*job, "--job_id", preempted]

    with tune_worker(redis_url, tmp_path / "jobs", worker_env, log):  # the documented resume: a worker takes it again
        state, result = outcome(redis_url, preempted, log)
    assert state == "SUCCESS", result
    records = read_events(jobs / preempted)
    assert [r["kind"] for r in records].count("job_start") == 2 and records[-1]["state"] == "done"
    resumed = [r for r in records if r["kind"] == "step"][-(steps - stopped_at) :]
    assert [r["step"] for r in resumed] == list(range(stopped_at + 1, steps + 1))
    final = weights(jobs / preempted / f"step_{steps}")
    assert final and final == weights(jobs / reference / f"step_{steps}")
    assert final != weights(jobs / preempted / f"step_{stopped_at}")  # the resumed attempt trained on


@pytest.mark.slow
def test_a_killed_workers_job_checkpoints_and_comes_back_after_the_visibility_timeout(tmp_path, redis_url, worker_env):
    steps = 40
    job_id = submit(redis_url, worker_env, "--job_config_name", "tiny_full", *TINY, "--user_id", "ops",
                    "--override", *FAST, f"max_steps_per_epoch={steps}")  # fmt: skip
    output_dir = tmp_path / "jobs" / "ops" / job_id
    log = tmp_path / "worker.log"
    soon = ("--visibility_timeout", "2")
    with tune_worker(redis_url, tmp_path / "jobs", worker_env, log, *soon) as worker:
        wait_for_step(output_dir, 3, log)
        worker.kill()  # no warm shutdown: the message stays unacknowledged
        worker.wait()
    deadline = time.monotonic() + 120  # the job's process, told by SIGTERM that its worker died, checkpoints
    while json.loads((output_dir / "status.json").read_text())["state"] != "preempted":
        assert time.monotonic() < deadline, (output_dir / "status.json").read_text()
        time.sleep(0.1)
    saved = json.loads((output_dir / "status.json").read_text())["last_checkpoint"]
    assert saved and int(Path(saved).name.removeprefix("step_")) < steps
    assert queued(redis_url) == []  # taken, not acknowledged: only the visibility timeout brings it back
    time.sleep(3)
    with tune_worker(redis_url, tmp_path / "jobs", worker_env, log, *soon):
        state, result = outcome(redis_url, job_id, log)
    assert state == "SUCCESS", result
    records = read_events(output_dir)
    assert [r["state"] for r in records if r["kind"] == "job_end"] == ["preempted", "done"]
    resumed_from = int(Path(saved).name.removeprefix("step_"))
    assert [r["step"] for r in records if r["kind"] == "step"][-(steps - resumed_from) :][0] == resumed_from + 1
    assert "Traceback" not in (output_dir.parent / f"{job_id}.log").read_text()
    assert (output_dir / f"step_{steps}" / "model.safetensors").is_file()
