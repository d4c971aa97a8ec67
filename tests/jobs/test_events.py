"""events.jsonl and its sinks, against real runs: a tiny fine-tune and the dummy recipe in process,
a local HTTP server as the webhook, and a real redis-server (skipped with a reason if not on PATH;
.ci/run installs it)."""

from __future__ import annotations

import contextlib
import json
import math
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from finetune.cli import main
from finetune.jobs.events import EventLog, WebhookSink
from finetune.recipes.dummy import DummyRecipe
from finetune.training import run
from finetune.training.loop import TrainingLoop
from tests.jobs.helpers import free_port
from tests.recipes.helpers import as_argv, metrics

BEGINNING = ["job_start", "system", "config"]


def read_events(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "events.jsonl").read_text().splitlines()]


def kinds(records: list[dict]) -> list[str]:
    return [r["kind"] for r in records]


def assert_a_whole_run(records: list[dict], recipe: str) -> None:
    """job_start, system, config first; steps, checkpoints and epochs; job_end done last."""
    names = kinds(records)
    assert names[:3] == BEGINNING and names[-1] == "job_end" and records[-1]["state"] == "done"
    assert {"step", "checkpoint", "epoch"} <= set(names[3:-1]) <= {"step", "checkpoint", "epoch"}
    assert names.index("step") < names.index("checkpoint") < names.index("epoch")
    start, system, config = records[:3]
    assert start["recipe"] == recipe and start["pid"] > 0 and start["host"]
    assert system["cpu"]["cores"] >= 1 and system["memory_total_bytes"] > 0
    assert {"python", "torch", "finetune"} <= system["versions"].keys()
    assert config["params"] == yaml.safe_load((Path(config["params"]["output_dir"]) / "params.yaml").read_text())
    for record in records:
        assert record["time"].endswith("+00:00") and record["elapsed_s"] >= 0
    elapsed = [r["elapsed_s"] for r in records]
    assert elapsed == sorted(elapsed)
    for checkpoint in (r for r in records if r["kind"] == "checkpoint"):
        assert checkpoint["path"].endswith(f"step_{checkpoint['step']}")
        assert checkpoint["files"] and all(size > 0 for size in checkpoint["files"].values())


def logged_steps(records: list[dict]) -> list[dict]:
    return [r for r in records if r["kind"] == "step"]


def test_a_tiny_fine_tune_writes_every_kind_with_the_metrics_values(tmp_path):
    out = tmp_path / "out"
    assert main(["full_finetune", *as_argv(output_dir=out, max_steps_per_epoch=3, save_every_n_steps=2)]) == 0
    records = read_events(out)
    assert_a_whole_run(records, "full_finetune")
    assert records[2]["params"]["max_steps_per_epoch"] == 3 and records[2]["params"]["model"] == "tiny"
    steps = logged_steps(records)
    expected = [m for m in metrics(out) if "loss" in m]
    assert [s["step"] for s in steps] == [m["step"] for m in expected] == [1, 2, 3]
    for step, metric in zip(steps, expected):
        assert step["rank"] == 0 and step["epoch"] == 0
        for key in ("loss", "lr", "tokens_per_second", "grad_norm"):
            assert step[key] == metric[key], key
    assert [(r["step"]) for r in records if r["kind"] == "checkpoint"] == [2, 3]
    (epoch,) = [r for r in records if r["kind"] == "epoch"]
    assert epoch["epoch"] == 0 and epoch["steps"] == 3
    assert epoch["mean_loss"] == pytest.approx(sum(m["loss"] for m in expected) / 3)
    assert "model.safetensors" in [r for r in records if r["kind"] == "checkpoint"][-1]["files"]


def test_the_dummy_recipe_writes_the_same_kinds(tmp_path):
    out = tmp_path / "dummy"
    assert main(["dummy", f"output_dir={out}", "max_steps_per_epoch=3", "save_every_n_steps=2", "epochs=2"]) == 0
    records = read_events(out)
    assert_a_whole_run(records, "dummy")
    steps = logged_steps(records)
    assert [(s["step"], s["loss"], s["lr"]) for s in steps] == [(m["step"], m["loss"], m["lr"]) for m in metrics(out)]
    assert [(r["epoch"], r["steps"]) for r in records if r["kind"] == "epoch"] == [(0, 3), (1, 3)]
    assert [r["step"] for r in records if r["kind"] == "checkpoint"] == [2, 4, 6]


def test_a_failed_run_ends_with_its_error_and_job_end_failed(tmp_path, monkeypatch):
    original = TrainingLoop.accumulate_gradients

    def poisoned(self, micro_batches):
        loss = original(self, micro_batches)
        return math.nan if self.global_step == 1 else loss

    monkeypatch.setattr(TrainingLoop, "accumulate_gradients", poisoned)
    out = tmp_path / "out"
    assert main(["full_finetune", *as_argv(output_dir=out, max_steps_per_epoch=3)]) == 2
    records = read_events(out)
    assert kinds(records)[:3] == BEGINNING and kinds(records)[-2:] == ["error", "job_end"]
    error, end = records[-2:]
    assert "loss is nan at step 2" in error["message"] and error["type"] == "UserError"
    assert end["state"] == "failed"


def test_an_upload_record_and_every_line_whole(tmp_path):
    log = EventLog(tmp_path, rank=0)
    threads = [
        threading.Thread(target=lambda i=i: [log.upload(f"s3://b/run/{i}", ["a" * 500], 500) for _ in range(50)])
        for i in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    records = read_events(tmp_path)  # json.loads fails on a torn line
    assert len(records) == 200 and {r["kind"] for r in records} == {"upload"}
    assert records[0]["bytes"] == 500 and records[0]["files"] == ["a" * 500]
    EventLog(tmp_path / "other", rank=1).upload("s3://b/x", [], 0)
    assert not (tmp_path / "other" / "events.jsonl").exists()  # only rank 0 writes


# ------------------------------------------------------------------------------------------------
# Webhook
# ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def webhook_server() -> Iterator[tuple[str, list[dict]]]:
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers["Content-Length"]))
            assert self.headers["Content-Type"] == "application/json"
            received.append(json.loads(body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def sinks_made(monkeypatch) -> list:
    """Every sink a run builds, to read its counters afterwards."""
    made: list = []
    original = run.build_sinks

    def recording(params):
        sinks = original(params)
        made.extend(sinks)
        return sinks

    monkeypatch.setattr(run, "build_sinks", recording)
    return made


def test_the_webhook_receives_every_record_in_order(tmp_path, sinks_made):
    out = tmp_path / "dummy"
    with webhook_server() as (url, received):
        assert main(["dummy", f"output_dir={out}", "max_steps_per_epoch=3", f"events_webhook={url}"]) == 0
    assert received == read_events(out)
    (sink,) = sinks_made
    assert isinstance(sink, WebhookSink) and sink.sent == len(received) and sink.dropped == sink.failed == 0


def test_a_dead_webhook_never_stops_the_run(tmp_path, sinks_made):
    dead = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens there
    out = tmp_path / "dummy"
    assert main(["dummy", f"output_dir={out}", "max_steps_per_epoch=3", f"events_webhook={dead}"]) == 0
    assert kinds(read_events(out))[-1] == "job_end"
    (sink,) = sinks_made
    assert sink.sent == 0 and sink.failed + sink.dropped > 0


def test_a_full_sink_queue_drops_instead_of_blocking():
    sink = WebhookSink(f"http://127.0.0.1:{free_port()}/hook", retries=0)
    sink._queue.maxsize = 1  # the worker holds at most one record; the rest overflow
    for i in range(50):
        sink.submit({"kind": "step", "step": i})
    sink.close(timeout_s=0.5)
    assert sink.dropped > 0 and sink.sent == 0


# ------------------------------------------------------------------------------------------------
# Redis
# ------------------------------------------------------------------------------------------------


def test_the_redis_sink_publishes_every_record_in_order(tmp_path, redis_url):
    import redis

    client = redis.Redis.from_url(redis_url)
    subscription = client.pubsub(ignore_subscribe_messages=True)
    subscription.subscribe("runs.dummy")
    subscription.get_message(timeout=1.0)  # the subscribe confirmation
    out = tmp_path / "dummy"
    argv = ["dummy", f"output_dir={out}", "max_steps_per_epoch=3", "save_every_n_steps=2"]
    assert main([*argv, f"events_redis_url={redis_url}", "events_redis_channel=runs.dummy"]) == 0
    written = read_events(out)
    received: list[dict] = []
    deadline = time.time() + 10
    while len(received) < len(written) and time.time() < deadline:
        message = subscription.get_message(timeout=0.5)
        if message is not None:
            received.append(json.loads(message["data"]))
    subscription.close()
    client.close()
    assert received == written
    assert_a_whole_run(received, "dummy")


def test_a_missing_redis_client_is_one_error_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "redis", None)  # as if the extra were not installed
    code = main(["dummy", f"output_dir={tmp_path / 'd'}", "events_redis_url=redis://127.0.0.1:1/0"])
    assert code == 2
    assert "pip install 'finetune[events]'" in capsys.readouterr().err


def test_a_stopped_run_ends_with_job_end_stopped_and_no_error(tmp_path, monkeypatch):
    original = DummyRecipe._fake_step

    def interrupted(self, step):
        if step == 2:
            raise KeyboardInterrupt
        return original(self, step)

    monkeypatch.setattr(DummyRecipe, "_fake_step", interrupted)
    out = tmp_path / "dummy"
    assert main(["dummy", f"output_dir={out}", "max_steps_per_epoch=3"]) == 130
    records = read_events(out)
    assert "error" not in kinds(records)
    assert kinds(records)[-1] == "job_end" and records[-1]["state"] == "stopped"
