"""`tune report <output_dir>`: what a run did, read from the files it wrote.

The summary (state, steps, time, tokens/s, training loss first and last, best eval loss, the
checkpoints and their sizes) comes from `status.json`, `metrics.jsonl` and `events.jsonl`;
the plot of training and eval loss and the learning rate is written as `report.png` beside
them when matplotlib is installed (`pip install 'finetune[report]'`). Nothing here imports
torch, so a report of a finished or running job takes a fraction of a second.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from finetune.errors import UserError

PLOT_NAME = "report.png"
_CHECKPOINT = re.compile(r"step_(\d+)")


@dataclass
class RunRecord:
    """The parts of a run's files the report shows."""

    output_dir: Path
    status: dict[str, Any]
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_losses: list[float] = field(default_factory=list)
    tokens_per_second: list[float] = field(default_factory=list)
    seconds: Optional[float] = None
    checkpoints: list[tuple[str, int]] = field(default_factory=list)  # (name, bytes), by step


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file; a line cut short by a crash or a live writer is skipped."""
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def run_seconds(events: list[dict[str, Any]]) -> Optional[float]:
    """Time spent running, over every start of the job (a resumed run starts again at elapsed 0)."""
    total, segment = 0.0, None
    for record in events:
        if record.get("kind") == "job_start" and segment is not None:
            total += segment
        elapsed = record.get("elapsed_s")
        if isinstance(elapsed, (int, float)):
            segment = float(elapsed)
    return None if segment is None else total + segment


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def read_run(output_dir: Path) -> RunRecord:
    if not output_dir.is_dir():
        raise UserError(f"{output_dir} is not a folder; give tune report the output_dir of a run")
    metrics_file = output_dir / "metrics.jsonl"
    if not metrics_file.is_file():
        raise UserError(
            f"{output_dir} has no metrics.jsonl, so no training run wrote there; give tune report a run's output_dir"
        )
    status_file = output_dir / "status.json"
    try:
        status = json.loads(status_file.read_text(encoding="utf-8")) if status_file.is_file() else {}
    except json.JSONDecodeError:
        status = {}  # replaced atomically by the run, so only a file edited by hand is broken
    record = RunRecord(output_dir, status)
    for metric in read_jsonl(metrics_file):
        step = metric.get("step")
        if not isinstance(step, int):
            continue
        if "loss" in metric:
            record.steps.append(step)
            record.losses.append(float(metric["loss"]))
            record.lrs.append(float(metric.get("lr", float("nan"))))
            if "tokens_per_second" in metric:
                record.tokens_per_second.append(float(metric["tokens_per_second"]))
        if "eval_loss" in metric:
            record.eval_steps.append(step)
            record.eval_losses.append(float(metric["eval_loss"]))
    events_file = output_dir / "events.jsonl"
    if events_file.is_file():
        record.seconds = run_seconds(read_jsonl(events_file))
    found = [(int(m[1]), p) for p in output_dir.iterdir() if p.is_dir() and (m := _CHECKPOINT.fullmatch(p.name))]
    record.checkpoints = [(p.name, folder_bytes(p)) for _, p in sorted(found)]
    return record


def _size(num_bytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1000 or unit == "GB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1000  # type: ignore[assignment]
    raise AssertionError("unreachable")


def _duration(seconds: float) -> str:
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)} min {rest:.0f} s" if minutes else f"{rest:.1f} s"


def summary_lines(run: RunRecord) -> list[str]:
    status = run.status
    state = status.get("state", "unknown (no status.json)")
    if status.get("error"):
        state += f": {status['error']}"
    lines = [f"run       {run.output_dir}", f"state     {state}"]
    last_step = status.get("step", run.steps[-1] if run.steps else 0)
    epoch = status.get("epoch")
    # status.json counts epochs from 0; people count them from 1.
    lines.append(f"steps     {last_step}" + (f" (epoch {epoch + 1})" if isinstance(epoch, int) else ""))
    if run.seconds is not None:
        lines.append(f"time      {_duration(run.seconds)}")
    if run.tokens_per_second:
        # The first step also builds the optimizer state and warms the kernels: not the pace.
        pace = statistics.median(run.tokens_per_second[1:] or run.tokens_per_second)
        lines.append(f"tokens/s  {pace:,.0f} (median over steps)")
    if run.losses:
        tail = run.losses[-10:]
        lines.append(
            f"loss      {run.losses[0]:.4f} at step {run.steps[0]} -> {run.losses[-1]:.4f} at step {run.steps[-1]} "
            f"(mean of the last {len(tail)}: {statistics.fmean(tail):.4f})"
        )
    if run.eval_losses:
        best = min(range(len(run.eval_losses)), key=run.eval_losses.__getitem__)
        lines.append(
            f"eval loss best {run.eval_losses[best]:.4f} at step {run.eval_steps[best]} "
            f"(first {run.eval_losses[0]:.4f}, last {run.eval_losses[-1]:.4f})"
        )
    if run.checkpoints:
        lines.append("checkpoints")
        lines += [f"  {name:<12}{_size(size):>10}" for name, size in run.checkpoints]
    else:
        lines.append("checkpoints none yet")
    return lines


def plot(run: RunRecord, path: Path) -> None:
    """Training and eval loss, and the learning rate, side by side, as a PNG at `path`."""
    # matplotlib is the optional `report` extra; the Agg canvas draws without a display.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    loss_axes, lr_axes = figure.subplots(1, 2)
    if run.losses:
        loss_axes.plot(run.steps, run.losses, color="tab:blue", linewidth=1, label="training loss")
    if run.eval_losses:
        loss_axes.plot(run.eval_steps, run.eval_losses, "o-", color="tab:orange", label="eval loss")
    loss_axes.set(xlabel="step", ylabel="loss", title="loss")
    if run.losses and min(run.losses + run.eval_losses) > 0:
        loss_axes.set_yscale("log")
    loss_axes.grid(True, alpha=0.3)
    loss_axes.legend()
    lr_axes.plot(run.steps, run.lrs, color="tab:green", linewidth=1)
    lr_axes.set(xlabel="step", ylabel="learning rate", title="learning rate")
    lr_axes.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    lr_axes.grid(True, alpha=0.3)
    figure.suptitle(str(run.output_dir))
    figure.savefig(path)


def cmd_report(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="tune report", description="Summarise a run and plot its loss curves and learning rate."
    )
    parser.add_argument("output_dir", type=Path, help="the output_dir of a run (finished or still running)")
    parser.add_argument("--plot", type=Path, default=None, help=f"where the PNG goes (default: output_dir/{PLOT_NAME})")
    parser.add_argument("--no-plot", action="store_true", help="print the summary only")
    args = parser.parse_args(argv)
    run = read_run(args.output_dir)
    print("\n".join(summary_lines(run)))
    if args.no_plot:
        return 0
    if not run.losses and not run.eval_losses:
        print("plot      none: no loss logged yet")
        return 0
    try:
        import matplotlib  # noqa: F401  (optional: the `report` extra)
    except ImportError:
        print("plot      none: matplotlib is not installed (pip install 'finetune[report]')")
        return 0
    path = args.plot or args.output_dir / PLOT_NAME
    try:
        plot(run, path)
    except OSError as error:
        raise UserError(f"cannot write the plot to {path}: {error.strerror or error}; choose another --plot") from None
    print(f"plot      {path}")
    return 0
