"""Helpers for the storage tests: a local S3 server (moto) and checkpoint-shaped folders."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

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
