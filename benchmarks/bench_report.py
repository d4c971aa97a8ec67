"""Medians over runs, the printed table and the markdown section bench_finetune.py appends to
docs/benchmarks.md."""

from __future__ import annotations

import datetime
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from bench_cells import RunConfig
from bench_runs import RunResult, flops_per_token, lora_params, matmul_params, total_params

LIBRARIES = ("ours", "baseline", "torchtune")  # baseline: ours from an earlier revision


# ----------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------


@dataclass
class Summary:
    library: str
    tokens_per_second: float
    step_time_s: float
    best_step_tokens_per_second: float  # the fastest timed step of all runs: least disturbed by other jobs
    peak_memory_gb: float
    process_peak_rss_gb: float
    outside_steps_s: float
    mfu: float
    first_loss: float
    runs: list[RunResult] = field(default_factory=list)


def summarise(results: list[RunResult], cfg: RunConfig, peak_flops: float) -> dict[str, Summary]:
    out = {}
    for library in LIBRARIES:
        runs = [r for r in results if r.library == library]
        if not runs:
            continue
        tps = statistics.median(r.tokens_per_second for r in runs)
        out[library] = Summary(
            library=library,
            tokens_per_second=tps,
            step_time_s=statistics.median(t for r in runs for t in r.step_times_s),
            best_step_tokens_per_second=max(n / t for r in runs for n, t in zip(r.step_tokens, r.step_times_s)),
            peak_memory_gb=statistics.median(r.peak_memory_gb for r in runs),
            process_peak_rss_gb=statistics.median(r.process_peak_rss_gb for r in runs),
            outside_steps_s=statistics.median(r.outside_steps_s for r in runs),
            mfu=tps * flops_per_token(cfg) / peak_flops,
            first_loss=runs[0].first_loss,
            runs=runs,
        )
    return out


def markdown_report(
    cfg: RunConfig,
    summaries: dict[str, Summary],
    command: str,
    machine: str,
    peak_flops: float,
    load: tuple[float, float],
    ours_set: Sequence[str] = (),
) -> str:
    a = cfg.spec.args
    memory_label = "peak GPU memory allocated" if cfg.device == "cuda" else "peak RSS to end of timed steps"
    lines = [
        f"### {cfg.spec.name}, {cfg.method}, batch {cfg.batch_size} x seq {cfg.seq_len}, {cfg.data} data, "
        f"{cfg.dtype} on {cfg.device}"
        + (", activation checkpointing" if cfg.activation_checkpointing else "")
        + (", compile on in both" if cfg.compile else "")
        + (f", what-if: ours with {', '.join(ours_set)}" if ours_set else "")
        + f" ({datetime.date.today().isoformat()})",
        "",
        f"- Command: `{command}`",
        f"- Machine: {machine}; measured peak {cfg.dtype} matmul {peak_flops / 1e9:.1f} GFLOP/s; "
        f"1-minute load average {load[0]:.1f} before and {load[1]:.1f} after the runs (other users' jobs)",
        f"- Model: dim {a.dim}, {a.n_layers} layers, {a.n_heads} heads ({a.n_kv_heads} kv), SwiGLU {a.hidden_dim}, "
        f"vocab {a.vocab_size}: {total_params(a) / 1e6:.1f}M parameters, {matmul_params(a) / 1e6:.1f}M in matmuls; "
        f"{flops_per_token(cfg) / 1e6:.1f} MFLOP per token"
        + (
            f"; LoRA rank {cfg.lora.rank} on {', '.join(cfg.lora.modules)}, "
            f"{lora_params(cfg) / 1e6:.2f}M adapter parameters"
            if cfg.is_lora
            else ""
        ),
        "- Data: "
        + (
            "uniform: every sample truncated to exactly seq_len tokens, all of them trained"
            if cfg.data == "uniform"
            else "instruct: alpaca records of varied length, prompt masked (train_on_input false), batches "
            "padded to their longest sample"
        )
        + "; non-pad tokens in one run's timed steps: "
        + ", ".join(f"{s.library} {sum(s.runs[0].step_tokens):,}" for s in summaries.values()),
        f"- {cfg.warmup_steps} warm-up step(s) excluded, {cfg.timed_steps} timed steps per run, "
        f"{len(next(iter(summaries.values())).runs)} run(s) per library, alternating; medians shown",
        "",
        f"| library | tokens/s (median of runs) | median s/step | tokens/s of best step | {memory_label} (GiB) "
        "| whole-process peak RSS (GiB) | MFU (median run) | s outside steps | step-1 loss |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summaries.values():
        lines.append(
            f"| {s.library} | {s.tokens_per_second:,.0f} | {s.step_time_s:.3f} | {s.best_step_tokens_per_second:,.0f} "
            "| "
            f"{s.peak_memory_gb:.3f} | "
            f"{s.process_peak_rss_gb:.3f} | {100 * s.mfu:.1f}% | {s.outside_steps_s:.1f} | {s.first_loss:.4f} |"
        )
    lines += [
        "",
        "Per run (tokens/s, in run order): "
        + "; ".join(
            f"{s.library} " + " / ".join(f"{r.tokens_per_second:,.0f}" for r in s.runs) for s in summaries.values()
        ),
    ]
    for other, o, t in _ratio_pairs(summaries):
        lines += [
            "",
            f"**ours / {other}: {o.tokens_per_second / t.tokens_per_second:.2f}x tokens/s "
            f"({o.best_step_tokens_per_second / t.best_step_tokens_per_second:.2f}x on the best steps), "
            f"{o.peak_memory_gb / t.peak_memory_gb:.2f}x peak memory** "
            f"(whole-process peak RSS {o.process_peak_rss_gb / t.process_peak_rss_gb:.2f}x).",
        ]
    lines.append("")
    return "\n".join(lines)


def print_table(summaries: dict[str, Summary]) -> None:
    print(
        f"\n{'library':<10} {'tokens/s':>10} {'s/step':>8} {'best t/s':>9} {'peak GiB':>9} {'proc GiB':>9} "
        f"{'MFU':>7} {'loss@1':>8}"
    )
    for s in summaries.values():
        print(
            f"{s.library:<10} {s.tokens_per_second:>10,.0f} {s.step_time_s:>8.3f} "
            f"{s.best_step_tokens_per_second:>9,.0f} "
            f"{s.peak_memory_gb:>9.3f} "
            f"{s.process_peak_rss_gb:>9.3f} {100 * s.mfu:>6.1f}% {s.first_loss:>8.4f}"
        )
    for other, o, t in _ratio_pairs(summaries):
        print(
            f"ours/{other}: tokens/s {o.tokens_per_second / t.tokens_per_second:.2f}x "
            f"(best steps {o.best_step_tokens_per_second / t.best_step_tokens_per_second:.2f}x), "
            f"peak memory {o.peak_memory_gb / t.peak_memory_gb:.2f}x"
        )


def _ratio_pairs(summaries: dict[str, Summary]) -> list[tuple[str, Summary, Summary]]:
    """(name, ours, that library) for every library measured beside ours."""
    if "ours" not in summaries:
        return []
    return [(name, summaries["ours"], s) for name, s in summaries.items() if name != "ours"]


def append_docs(path: Path, section: str) -> None:
    if not path.exists():
        path.write_text("# Benchmarks\n\nSections below are appended by `benchmarks/bench_finetune.py`.\n\n")
    with path.open("a") as f:
        f.write("\n" + section)
