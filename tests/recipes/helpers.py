"""Running recipes as a user would (a fresh `tune` process) and reading what they wrote."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
TINY = {
    "model": "tiny",
    "tokenizer_path": "pkg:data/demo/tokenizer.model",
    "dataset": "pkg:data/demo/train.jsonl",
    "max_seq_len": 64,
    "batch_size": 4,
    "lr": 1e-3,
    "device": "cpu",
    "dtype": "fp32",
    "heartbeat_interval_s": 0.2,
}


def as_argv(**values) -> list[str]:
    return [f"{k}={v}" for k, v in {**TINY, **values}.items()]


def tune(*argv: str, wait: bool = True, **popen):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "finetune.cli", *argv]
    if not wait:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(output_dir: Path) -> list[float]:
    return [m["loss"] for m in metrics(output_dir) if "loss" in m]


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        assert torch.equal(ta[name], tb[name]), name


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"run ended before {path} appeared: {process.stderr.read()[-2000:]}")
        if time.time() > deadline:
            raise AssertionError(f"{path} did not appear")
        time.sleep(0.02)
