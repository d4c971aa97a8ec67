"""Where a training step spends its time, for our recipe and torchtune's, profiled the same way.

    python benchmarks/profile_step.py ours CONFIG.yaml OUT.json [--wait 1 --active 2]
    .venv-torchtune/bin/python benchmarks/profile_step.py torchtune CONFIG.yaml OUT.json
    python benchmarks/profile_step.py compare OURS.json TORCHTUNE.json

The first two run a library's stock recipe in this process on a config written by
`bench_finetune.py`, with the library's profiler hook replaced by one built here, so both are
recorded with identical torch.profiler settings (CPU activity, no shapes, no memory, no stacks:
the cheapest recording) over the same steps: `wait` steps skipped, one warm-up step, `active`
steps recorded. Each op's self time is summed over the recorded steps and divided by their
number, and written as JSON. `compare` groups ops into categories (matmuls, attention, loss,
optimizer, ...) and prints both libraries side by side, plus the "untraced" time: step wall time
minus the ops' self time, i.e. Python, the DataLoader and anything else outside aten ops.
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch.profiler import ProfilerActivity, profile, schedule

REPO_ROOT = Path(__file__).resolve().parent.parent

# Ops are matched by substring, first rule wins; the order puts specific names before generic ones.
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    (
        "optimizer (AdamW, foreach)",
        (
            "_foreach_add",
            "_foreach_mul",
            "_foreach_lerp",
            "_foreach_addcmul",
            "_foreach_addcdiv",
            "_foreach_sqrt",
            "_foreach_div",
            "_foreach_sub",
            "_foreach_maximum",
            "_foreach_pow",
            "_foreach_neg",
            "_fused_adamw",
        ),
    ),
    ("grad-norm clipping", ("_foreach_norm", "linalg_vector_norm", "aten::clamp")),
    ("matmul forward+backward (mm/addmm/bmm)", ("aten::mm", "aten::addmm", "aten::bmm")),
    ("attention (SDPA fwd+bwd)", ("scaled_dot_product", "flash_attention")),
    ("cross-entropy (log_softmax, nll)", ("log_softmax", "nll_loss", "cross_entropy")),
    ("embedding fwd+bwd", ("embedding",)),
    ("SiLU / SwiGLU", ("silu",)),
    (
        "copies, casts, layout",
        (
            "aten::copy_",
            "aten::clone",
            "aten::contiguous",
            "aten::_to_copy",
            "aten::to",
            "aten::cat",
            "aten::stack",
            "aten::reshape",
            "aten::_unsafe_view",
        ),
    ),
    (
        "allocation / zeroing",
        (
            "aten::empty",
            "aten::zero_",
            "aten::fill_",
            "aten::zeros",
            "aten::ones",
            "aten::full",
            "aten::resize_",
            "aten::new_",
        ),
    ),
    ("autograd engine bookkeeping", ("autograd::engine", "Backward")),
    (
        "elementwise (norm, rope, residual, ...)",
        (
            "aten::mul",
            "aten::add",
            "aten::pow",
            "aten::mean",
            "aten::rsqrt",
            "aten::neg",
            "aten::sum",
            "aten::div",
            "aten::sub",
            "aten::cos",
            "aten::sin",
            "aten::where",
            "aten::ne",
            "aten::eq",
            "aten::masked",
            "aten::sqrt",
            "aten::exp",
        ),
    ),
]
STEP_PREFIX = "ProfilerStep"
# Labelled ranges torch records around optimizer and DataLoader calls. On CPU, foreach AdamW
# runs per-tensor kernels (aten::sqrt, aten::lerp_, ...) whose self time lands in the
# elementwise category; the range's total time is the optimizer's real cost.
RANGE_PREFIXES = ("Optimizer.step", "Optimizer.zero_grad", "enumerate(DataLoader)")


def categorise(name: str) -> str:
    for category, patterns in CATEGORIES:
        if any(p in name for p in patterns):
            return category
    return "other ops"


def make_profiler(out_json: Path, wait: int, active: int, meta: dict[str, Any]) -> profile:
    """One torch.profiler for both libraries; on completion it writes per-step op self times."""

    def write(prof: profile) -> None:
        ops: dict[str, float] = {}
        calls: dict[str, int] = {}
        ranges: dict[str, float] = {}
        step_us = 0.0
        for event in prof.key_averages():
            if event.key.startswith(STEP_PREFIX):
                step_us += event.cpu_time_total
            else:
                ops[event.key] = ops.get(event.key, 0.0) + event.self_cpu_time_total
                calls[event.key] = calls.get(event.key, 0) + event.count
                if event.key.startswith(RANGE_PREFIXES):
                    ranges[event.key] = ranges.get(event.key, 0.0) + event.cpu_time_total
        out_json.write_text(
            json.dumps(
                {
                    **meta,
                    "active_steps": active,
                    "step_ms": step_us / active / 1e3,
                    "ops_ms": {k: v / active / 1e3 for k, v in sorted(ops.items(), key=lambda kv: -kv[1])},
                    "calls_per_step": {k: calls[k] / active for k in sorted(ops, key=lambda k: -ops[k])},
                    "ranges_ms": {k: v / active / 1e3 for k, v in ranges.items()},
                },
                indent=1,
            )
        )
        print(f"wrote {out_json}", file=sys.stderr)

    return profile(
        activities=[ProfilerActivity.CPU],
        schedule=schedule(wait=wait, warmup=1, active=active, repeat=1),
        on_trace_ready=write,
        record_shapes=False,
        profile_memory=False,
        with_stack=False,
    )


def profile_ours(config: Path, out_json: Path, wait: int, active: int) -> None:
    import yaml

    sys.path.insert(0, str(REPO_ROOT))
    import finetune.recipes.full_finetune as full_recipe

    method = "lora" if "lora_rank" in yaml.safe_load(config.read_text()) else "full"
    module: Any = full_recipe
    if method == "lora":
        import finetune.recipes.lora_finetune as module  # noqa: F811 (only exists once LoRA lands)
    meta = {"library": "ours", "method": method}
    replacement: Callable[..., profile] = lambda *a, **k: make_profiler(out_json, wait, active, meta)  # noqa: E731
    module.build_profiler = replacement
    steps = wait + 1 + active
    code = module.main(["--config", str(config), f"max_steps_per_epoch={steps}"])
    if code:
        raise SystemExit(code)


def profile_torchtune(config: Path, out_json: Path, wait: int, active: int) -> None:
    import torchtune.training
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(config)
    method = "lora" if "lora" in cfg.model._component_ else "full"
    meta = {"library": "torchtune", "method": method}

    def replacement(**_: Any) -> tuple[profile, Any]:
        settings = {
            "enabled": True,
            "profile_memory": False,
            "wait_steps": wait,
            "warmup_steps": 1,
            "active_steps": active,
        }
        return make_profiler(out_json, wait, active, meta), OmegaConf.create(settings)

    torchtune.training.setup_torch_profiler = replacement
    cfg.profiler = {"_component_": "torchtune.training.setup_torch_profiler", "enabled": True}
    cfg.max_steps_per_epoch = wait + 1 + active
    patched = config.with_name(config.stem + "_profile.yaml")
    OmegaConf.save(cfg, patched)
    # torchtune's recipes are scripts, not an importable package: run the file as `tune run` does.
    recipe = Path(torchtune.__file__).parent.parent / "recipes" / f"{method}_finetune_single_device.py"
    sys.argv = [str(recipe), "--config", str(patched)]
    runpy.run_path(str(recipe), run_name="__main__")


def compare(paths: Sequence[Path], top: int = 25) -> str:
    """A markdown breakdown by category and by op, one column per profile."""
    runs = [json.loads(p.read_text()) for p in paths]
    names = [r["library"] for r in runs]
    by_category: list[dict[str, float]] = []
    for run in runs:
        totals: dict[str, float] = {}
        for op, ms in run["ops_ms"].items():
            totals[categorise(op)] = totals.get(categorise(op), 0.0) + ms
        totals["untraced (Python, DataLoader, gaps)"] = run["step_ms"] - sum(run["ops_ms"].values())
        by_category.append(totals)
    header = "| " + " | ".join(["ms per step", *names]) + " |"
    rule = "|---|" + "---:|" * len(names)
    lines = ["Step time by category (self time of aten ops, mean over the recorded steps):", "", header, rule]
    lines.append("| **step wall time** | " + " | ".join(f"**{r['step_ms']:.0f}**" for r in runs) + " |")
    categories = sorted({c for t in by_category for c in t}, key=lambda c: -max(t.get(c, 0.0) for t in by_category))
    for c in categories:
        lines.append(f"| {c} | " + " | ".join(f"{t.get(c, 0.0):.1f}" for t in by_category) + " |")
    labels = sorted({k for r in runs for k in r.get("ranges_ms", {})})
    if labels:
        lines += [
            "",
            "Labelled ranges, total time including the ops inside them (the elementwise row above "
            "includes the optimizer's per-tensor ops on CPU):",
            "",
            header.replace("ms per step", "range, ms per step"),
            rule,
        ]
        for k in labels:
            lines.append(f"| `{k}` | " + " | ".join(f"{r.get('ranges_ms', {}).get(k, 0.0):.1f}" for r in runs) + " |")
    ops = sorted({op for r in runs for op in r["ops_ms"]}, key=lambda op: -max(r["ops_ms"].get(op, 0.0) for r in runs))
    lines += ["", f"Top {top} ops by self time:", "", "| op | " + " | ".join(names) + " |", rule]
    for op in ops[:top]:
        lines.append(f"| `{op}` | " + " | ".join(f"{r['ops_ms'].get(op, 0.0):.1f}" for r in runs) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("ours", "torchtune", "compare"))
    p.add_argument("paths", nargs="+", type=Path)
    p.add_argument("--wait", type=int, default=1, help="steps before the profiler's warm-up step")
    p.add_argument("--active", type=int, default=2, help="steps recorded")
    args = p.parse_args(argv)
    if args.what == "compare":
        print(compare(args.paths))
        return 0
    if len(args.paths) != 2:
        p.error("give CONFIG.yaml OUT.json")
    config, out_json = args.paths
    torch.manual_seed(0)
    (profile_ours if args.what == "ours" else profile_torchtune)(
        config.resolve(), out_json.resolve(), args.wait, args.active
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
