"""Helpers for the job tests: a local S3 server (moto), a local redis-server, checkpoint-shaped
folders, and the checks an uploaded job's folder must pass."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import fsspec
import pytest

MISSING = [name for name in ("moto", "flask", "s3fs") if importlib.util.find_spec(name) is None]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _server_command(port: int) -> list[str]:
    script = Path(sys.executable).with_name("moto_server")
    base = [str(script)] if script.exists() else [sys.executable, "-m", "moto.server"]
    return [*base, "-H", "127.0.0.1", "-p", str(port)]


@contextlib.contextmanager
def moto_server() -> Iterator[tuple[str, subprocess.Popen]]:
    """Start moto's S3 server on a free loopback port; yield (endpoint, process); stop it after."""
    if MISSING:
        pytest.skip(f"needs {', '.join(MISSING)} for a local S3 server: pip install -e '.[dev]'")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(_server_command(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {proc.returncode} before answering")
            try:
                urllib.request.urlopen(endpoint, timeout=1).close()
                break
            except urllib.error.HTTPError:
                break  # it answers
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not answer on {endpoint} within 60 s") from None
                time.sleep(0.1)
        yield endpoint, proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def s3_storage_options(endpoint: str) -> dict:
    """s3fs options for the local server: its endpoint, and one quick try per request (our code retries)."""
    return {
        "client_kwargs": {"endpoint_url": endpoint},
        "config_kwargs": {"connect_timeout": 2, "read_timeout": 10, "retries": {"max_attempts": 1}},
    }


def make_checkpoint_folder(root: Path) -> Path:
    """A results folder shaped like a run's output: nested step folders, weights of a few MB, metadata."""
    files = {
        "step_1/model.safetensors": os.urandom(2 << 20),
        "step_1/config.json": b'{"dim": 64}',
        "step_1/recipe_state.pt": os.urandom(300_000),
        "step_2/adapter/adapter_model.safetensors": os.urandom(1 << 20),
        "step_2/adapter/adapter_config.json": b'{"r": 8}',
        "metrics.jsonl": b'{"step": 1, "loss": 2.5}\n{"step": 2, "loss": 2.1}\n',
        "status.json": b'{"state": "done"}',
    }
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """Start redis-server on a free loopback port, without persistence; yield its URL; stop it after."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not on PATH (Debian: apt-get install redis-server; .ci/run installs it)")
    redis = pytest.importorskip("redis", reason="the Redis client is in the dev extra: pip install -e '.[dev]'")
    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    try:
        deadline = time.time() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.time() > deadline or server.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)
        yield url
    finally:
        client.close()
        server.terminate()
        server.wait(timeout=10)


def read_events(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "events.jsonl").read_text().splitlines()]


def remote_tree(s3_options: dict, url: str) -> dict[str, bytes]:
    fs = fsspec.filesystem("s3", **s3_options)
    root = url.removeprefix("s3://")
    return {p[len(root) + 1 :]: fs.cat_file(p) for p in fs.find(root)}


def assert_uploaded(s3_options: dict, output_dir: Path, url: str) -> None:
    """The folder at `url` equals the local one byte for byte, and events.jsonl ends with the
    job's upload and then its job_end (done, exit status 0)."""
    local = tree_bytes(output_dir)
    remote = remote_tree(s3_options, url)
    assert remote.keys() == local.keys()
    assert {k: v for k, v in remote.items() if k != "_manifest.json"} == {
        k: v for k, v in local.items() if k != "_manifest.json"
    }
    records = read_events(output_dir)
    assert records[0]["kind"] == "job_start" and records[0]["job_id"] == output_dir.name
    assert [r["kind"] for r in records[-2:]] == ["upload", "job_end"]
    assert records[-1] == {**records[-1], "state": "done", "exit_status": 0, "uploaded_to": url}
    assert records[-2]["url"] == url and records[-2]["bytes"] > 0 and "metrics.jsonl" in records[-2]["files"]
    assert records[-1]["elapsed_s"] >= records[-2]["elapsed_s"]
