"""Running one recipe process and reading its per-step log; FLOPs per token, the measured peak
matmul rate and the machine's description. Used by bench_finetune.py."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from bench_cells import REPO_ROOT, RunConfig

from finetune.models import ModelArgs

POLL_S = 0.2  # the untimed tail step lasts far longer than this


# ----------------------------------------------------------------------------------------------
# Running one recipe and reading its log
# ----------------------------------------------------------------------------------------------


@dataclass
class StepLog:
    step: int
    tokens_per_second: float  # as the library logged it, with its own token count
    loss: float
    peak_memory_gb: Optional[float] = None  # the library's own reading, when it logs one


def read_our_steps(metrics: Path) -> list[StepLog]:
    if not metrics.exists():
        return []
    steps = []
    for line in metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written right now
        if "tokens_per_second" in record:
            steps.append(
                StepLog(record["step"], record["tokens_per_second"], record["loss"], record.get("peak_memory_gb"))
            )
    return steps


_TT_FIELD = re.compile(r"(\w+):(?:tensor\()?([-+0-9.eE]+|nan|inf)\)?")


def read_torchtune_steps(log: Path) -> list[StepLog]:
    if not log.exists():
        return []
    steps = []
    for line in log.read_text().splitlines():
        if not line.startswith("Step ") or not line.endswith(" "):
            continue  # DiskLogger ends a complete line with a space before the newline
        step = int(line.split()[1])
        fields = {k: float(v) for k, v in _TT_FIELD.findall(line.split("|", 1)[1])}
        if "tokens_per_second_per_gpu" in fields:
            steps.append(
                StepLog(
                    step,
                    fields["tokens_per_second_per_gpu"],
                    fields.get("loss", float("nan")),
                    fields.get("peak_memory_alloc"),
                )
            )
    return steps


def proc_status_kib(pid: int, key: str) -> Optional[int]:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


@dataclass
class RunResult:
    library: str
    repeat: int
    step_times_s: list[float]
    step_tokens: list[int]  # non-pad tokens of each timed step, by this library's own tokenization
    tokens_per_second: float
    peak_memory_gb: float  # CPU: VmHWM at the end of the timed steps; GPU: logged max allocated
    process_peak_rss_gb: float  # whole process, final checkpoint save included
    wall_s: float
    outside_steps_s: float  # wall time not spent in logged steps: start-up, tokenizing, loading, final save
    first_loss: float
    self_reported_peak_gb: Optional[float]


@dataclass(frozen=True)
class StepCounts:
    """Per optimizer step (index = step - 1) of one library: its non-pad tokens, and the count
    its log divides by to report tokens/s (ours: non-pad tokens; torchtune: trained labels)."""

    non_pad: list[int]
    logged: list[int]


def per_step(sample_counts: Sequence[int], batch_size: int, steps: int) -> list[int]:
    """Sum per-sample counts into per-step counts: no shuffling, so step k takes samples k*b .. k*b+b-1."""
    if len(sample_counts) < batch_size * steps:
        raise SystemExit(f"error: {len(sample_counts)} samples cannot fill {steps} steps of {batch_size}")
    return [sum(sample_counts[k * batch_size : (k + 1) * batch_size]) for k in range(steps)]


def run_recipe(
    library: str,
    repeat: int,
    cmd: list[str],
    env: dict[str, str],
    log_file: Path,
    read_steps: Callable[[], list[StepLog]],
    cfg: RunConfig,
    counts: "StepCounts",
    stop_after_timed: bool = False,
) -> RunResult:
    """Run one training process; watch its log to read its peak memory at the end of the timed steps.
    With `stop_after_timed` the process is killed there (no tail step, no final save: a run that
    measures only steps and memory), and its time outside the steps is not a measurement (NaN)."""
    last_timed = cfg.warmup_steps + cfg.timed_steps
    started = time.perf_counter()
    stopped = False
    with log_file.open("w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
        hwm_kib: Optional[int] = None
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if hwm_kib is None and len(read_steps()) >= last_timed:
                hwm_kib = proc_status_kib(proc.pid, "VmHWM")
                if stop_after_timed:
                    proc.kill()
                    stopped = True
            time.sleep(POLL_S)
    wall = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    proc.returncode = code
    if code != 0 and not stopped:
        tail = "\n".join(log_file.read_text().splitlines()[-40:])
        raise SystemExit(f"error: {library} run failed (exit {code}); see {log_file}:\n{tail}")
    steps = read_steps()
    timed = [s for s in steps if cfg.warmup_steps < s.step <= last_timed]
    if len(timed) != cfg.timed_steps:
        raise SystemExit(f"error: {library} logged {len(steps)} steps, expected {cfg.total_steps}; see {log_file}")
    if stopped:
        steps = [s for s in steps if s.step <= last_timed]
    if any(s.tokens_per_second <= 0 for s in steps):
        raise SystemExit(
            f"error: {library} logged a step with no tokens (every label masked?), so its time cannot be "
            "recovered; use a longer --seq-len or --data uniform"
        )
    step_times = [counts.logged[s.step - 1] / s.tokens_per_second for s in timed]
    step_tokens = [counts.non_pad[s.step - 1] for s in timed]
    # torchtune resets CUDA peak stats every step, ours keeps a running max: the max over the
    # timed steps is the training peak for both.
    logged = [s.peak_memory_gb for s in timed if s.peak_memory_gb is not None]
    logged_peak = max(logged) if logged else None
    if cfg.device == "cuda":
        peak = logged_peak if logged_peak is not None else float("nan")
    else:
        peak = (hwm_kib or 0) / 2**20
    return RunResult(
        library=library,
        repeat=repeat,
        step_times_s=step_times,
        step_tokens=step_tokens,
        tokens_per_second=sum(step_tokens) / sum(step_times),
        peak_memory_gb=peak,
        process_peak_rss_gb=usage.ru_maxrss / 2**20,
        wall_s=wall,
        outside_steps_s=float("nan")
        if stopped
        else wall - sum(counts.logged[s.step - 1] / s.tokens_per_second for s in steps),
        first_loss=steps[0].loss,
        self_reported_peak_gb=logged_peak,
    )


# ----------------------------------------------------------------------------------------------
# FLOPs, peak rate, machine
# ----------------------------------------------------------------------------------------------


def matmul_params(args: ModelArgs) -> int:
    """Weights that take part in a matmul: q/k/v/o, the three MLP projections, the output head."""
    attn = args.dim * args.head_dim * (2 * args.n_heads + 2 * args.n_kv_heads)
    mlp = 3 * args.dim * args.hidden_dim
    return args.n_layers * (attn + mlp) + args.dim * args.vocab_size


def total_params(args: ModelArgs) -> int:
    embeddings = args.vocab_size * args.dim
    norms = (2 * args.n_layers + 1) * args.dim
    head = 0 if args.tie_embeddings else args.dim * args.vocab_size
    return matmul_params(args) - args.dim * args.vocab_size + head + embeddings + norms


def lora_params(cfg: RunConfig) -> int:
    a, r = cfg.spec.args, cfg.lora.rank
    out_dims = {
        "q_proj": a.n_heads * a.head_dim,
        "k_proj": a.n_kv_heads * a.head_dim,
        "v_proj": a.n_kv_heads * a.head_dim,
        "output_proj": a.dim,
    }
    in_dims = {"q_proj": a.dim, "k_proj": a.dim, "v_proj": a.dim, "output_proj": a.n_heads * a.head_dim}
    per_layer = sum(r * (in_dims[m] + out_dims[m]) for m in cfg.lora.modules)
    if cfg.lora.mlp:
        per_layer += 3 * r * (a.dim + a.hidden_dim)
    head = r * (a.dim + a.vocab_size) if cfg.lora.output else 0
    return a.n_layers * per_layer + head


def flops_per_token(cfg: RunConfig) -> float:
    a = cfg.spec.args
    attention = 12 * a.n_layers * a.dim * cfg.seq_len
    if cfg.is_lora:
        return 4 * matmul_params(a) + 6 * lora_params(cfg) + attention
    return 6 * matmul_params(a) + attention


def peak_matmul_flops(device: str, dtype: torch.dtype) -> float:
    """Best FLOP/s of square matmuls in the training dtype: the MFU denominator."""
    n = 8192 if device == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    best = 0.0
    for trial in range(12):
        sync()
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        sync()
        if trial >= 2:  # the first trials warm up caches and clocks
            best = max(best, 4 * 2 * n**3 / (time.perf_counter() - start))
    return best


def machine_description(device: str) -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except FileNotFoundError:
        model = platform.processor() or model
    text = (
        f"{os.cpu_count()} CPU cores ({model}), torch {torch.__version__} "
        f"with {torch.get_num_threads()} threads, Python {platform.python_version()}"
    )
    if device == "cuda":
        text += f", GPU {torch.cuda.get_device_name()}"
    return text
