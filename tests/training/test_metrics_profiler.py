"""Metric loggers, peak memory and the profiler."""

import json
import sys
import time

import pytest
import torch

from finetune.errors import UserError
from finetune.training.metrics import JsonlLogger, TensorBoardLogger, WandbLogger, build_metric_loggers
from finetune.training.profiler import NoOpProfiler, build_profiler


def test_jsonl_logs_one_object_per_line_and_appends_on_resume(tmp_path):
    before = time.time()
    logger = JsonlLogger(tmp_path)
    logger.log(1, {"loss": 2.5, "lr": 1e-4})
    logger.log(2, {"loss": torch.tensor(2.0).item(), "tokens": 12})
    logger.close()
    resumed = JsonlLogger(tmp_path)
    resumed.log(3, {"loss": 1.5})
    resumed.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[0]["loss"] == 2.5 and records[0]["lr"] == 1e-4
    assert records[1]["tokens"] == 12.0 and records[2]["loss"] == 1.5
    assert all(before <= r["time"] <= time.time() for r in records)


def test_tensorboard_scalars_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path)
    logger.log(1, {"loss": 3.0})
    logger.log(2, {"loss": 2.0})
    logger.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 3.0), (2, 2.0)]


def test_build_metric_loggers(tmp_path):
    loggers = build_metric_loggers("tensorboard", tmp_path, rank=0)
    assert [type(x) for x in loggers] == [JsonlLogger, TensorBoardLogger]
    for logger in loggers:
        logger.close()
    assert [type(x) for x in build_metric_loggers("jsonl", tmp_path / "j", rank=0)] == [JsonlLogger]
    assert build_metric_loggers("tensorboard", tmp_path / "r1", rank=1) == []
    assert not (tmp_path / "r1").exists()
    with pytest.raises(UserError, match="unknown metric_logger 'csv'"):
        build_metric_loggers("csv", tmp_path, rank=0)


def test_wandb_missing_is_a_user_error(tmp_path):
    try:
        import wandb  # noqa: F401

        pytest.skip("wandb is installed")
    except ImportError:
        pass
    with pytest.raises(UserError, match="needs the wandb package"):
        WandbLogger(tmp_path)


_PEAK_SEES_ALLOCATION = """
import torch
from finetune.training.memory import peak_memory_gb as peak

def current_rss_gb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20

before = peak(torch.device("cpu"))
assert before >= current_rss_gb() - 1e-3, (before, current_rss_gb())
# Allocate and touch enough to go 0.1 GiB past the old peak.
big = torch.ones(int((before - current_rss_gb() + 0.1) * 2**30) // 4)
print(before, peak(torch.device("cpu")))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_memory_on_cpu_sees_a_large_allocation():
    import subprocess

    # A fresh process: this one's heap may hold freed memory a new tensor would reuse unseen.
    out = subprocess.run([sys.executable, "-c", _PEAK_SEES_ALLOCATION], check=True, capture_output=True, text=True)
    before, after = map(float, out.stdout.split())
    assert after >= before + 0.09


_PAGE_FAULTS_OF_REALLOCATION = """
import resource, sys
import torch
from finetune.training.memory import keep_freed_host_memory
kept = keep_freed_host_memory() if sys.argv[1] == "keep" else False
for _ in range(20):  # warm-up: the heap settles within a few rounds
    torch.ones(2**24)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.ones(2**24)  # 64 MiB allocated, touched and freed, as a training step's logits are
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_kept_host_memory_is_reused_without_page_faults():
    import subprocess

    def faults(mode: str) -> tuple[str, int]:
        out = subprocess.run(
            [sys.executable, "-c", _PAGE_FAULTS_OF_REALLOCATION, mode], check=True, capture_output=True, text=True
        ).stdout.split()
        return out[0], int(out[1])

    default_kept, default_faults = faults("default")
    kept, kept_faults = faults("keep")
    if kept != "True":
        pytest.skip("the C library is not glibc")
    # By default each 64 MiB tensor is a fresh mmap faulted in page by page (16k pages each).
    assert default_kept == "False" and default_faults > 10 * 10_000
    assert kept_faults < 1_000


def test_profiler_writes_a_chrome_trace(tmp_path):
    model = torch.nn.Linear(8, 8)
    with build_profiler(True, tmp_path, wait=1, warmup=1, active=2) as prof:
        for _ in range(5):
            model(torch.randn(4, 8)).sum().backward()
            prof.step()
    traces = list((tmp_path / "profile").glob("*.json"))
    assert [t.name for t in traces] == ["rank0_step4.json"]
    events = json.loads(traces[0].read_text())["traceEvents"]
    assert any("aten::addmm" in e.get("name", "") for e in events)
    assert any(e.get("name", "").startswith("ProfilerStep#") for e in events)


def test_disabled_profiler_is_a_no_op(tmp_path):
    prof = build_profiler(False, tmp_path)
    assert isinstance(prof, NoOpProfiler)
    with prof:
        prof.step()
    assert not (tmp_path / "profile").exists()
