"""What a LoRA / QLoRA run spends outside its training steps, phase by phase, side by side with
torchtune: loading the HF checkpoint, building the model (and quantizing the base to NF4), and
writing the adapter and the merged model at the end.

    python benchmarks/bench_startup.py --model llama3_2_1b --method qlora \
        --torchtune-python .venv-torchtune/bin/python [--baseline-tree ../before] [--json out.json]

Each library runs in a fresh process that drives its own stock LoRA recipe class (ours:
`LoraFinetuneRecipe`; torchtune: `LoRAFinetuneRecipeSingleDevice`): `setup()`, then the save its
recipe makes after the last step, with no training step between (the steps are what
bench_finetune.py times). The recipe methods that load the checkpoint and build the model are
wrapped, unchanged, to time them:

    load    ours: `RunContext.load_weights` (HF safetensors to a state dict);
            torchtune: `load_checkpoint` (its FullModelHFCheckpointer)
    build   ours: `RunContext.prepare_model` (adapters, assigning weights, NF4, moving to the device);
            torchtune: `_setup_model` (the same, in its order)
    setup   all of `setup()`: the two above plus tokenizer, data, optimizer
    save    ours: `save_checkpoint()` (PEFT adapter, merged HF model, adapter-sized recipe state);
            torchtune: `save_checkpoint(epoch=0)` of a one-epoch run (adapter and merged HF model)

Per phase: CPU seconds of the process (all threads; wall time is unreliable on a shared
machine), wall seconds, and the peak resident set inside the phase (VmHWM, reset through
/proc/self/clear_refs when a phase starts), plus the whole-process peak (the largest phase peak:
the reset moves the kernel's high-water mark that ru_maxrss reads as well). Weights are seeded
random in the model's published shape, written once as an HF bf16 safetensors checkpoint; both
libraries compute in bf16 on the CPU, as they do on a GPU (where the same phases take most of the
time outside the steps).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

_HERE = Path(__file__).resolve().parent
PHASES = ("import", "load", "build", "setup", "save")
_MARK = "PHASES "


# ----------------------------------------------------------------------------------------------
# Inside a child process: timing phases
# ----------------------------------------------------------------------------------------------


def _vm_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


class PhaseClock:
    """CPU time, wall time and peak RSS of possibly nested phases. At every phase boundary the
    peak since the last boundary is credited to each open phase, then the peak is reset."""

    def __init__(self) -> None:
        self.results: dict[str, dict[str, float]] = {}
        self._open: list[str] = []

    def _boundary(self) -> None:
        peak = _vm_kib("VmHWM") / 2**20
        for name in self._open:
            self.results[name]["peak_rss_gib"] = max(self.results[name]["peak_rss_gib"], peak)
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        except OSError:
            pass  # then each phase reports the process peak so far

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._boundary()
        self.results[name] = {"peak_rss_gib": 0.0}
        self._open.append(name)
        cpu, wall = time.process_time(), time.perf_counter()
        try:
            yield
        finally:
            self._boundary()
            self._open.remove(name)
            self.results[name].update(
                cpu_s=time.process_time() - cpu,
                wall_s=time.perf_counter() - wall,
                rss_after_gib=_vm_kib("VmRSS") / 2**20,
            )

    def wrap(self, owner: type, method: str, name: str) -> None:
        """Time every call of `owner.method` as phase `name` (the method itself is unchanged)."""
        original = getattr(owner, method)

        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.phase(name):
                return original(*args, **kwargs)

        setattr(owner, method, timed)

    def report(self) -> None:
        # clear_refs resets the kernel's high-water mark, which ru_maxrss reads too: the process
        # peak is the largest phase peak (the phases cover the run but for parsing the config).
        self._boundary()
        peaks = [phase["peak_rss_gib"] for phase in self.results.values()]
        peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
        self.results["process"] = {"peak_rss_gib": max(peaks)}
        print(_MARK + json.dumps(self.results), flush=True)


def run_ours(config: Path, clock: PhaseClock) -> None:
    with clock.phase("import"):
        from finetune.params import LoraFinetuneParams
        from finetune.recipes.lora_finetune import LoraFinetuneRecipe
        from finetune.training.run import RunContext
    clock.wrap(RunContext, "load_weights", "load")
    clock.wrap(RunContext, "prepare_model", "build")
    recipe = LoraFinetuneRecipe(LoraFinetuneParams.from_yaml(config))
    try:
        with clock.phase("setup"):
            recipe.setup()
        with clock.phase("save"):
            recipe.save_checkpoint()
    finally:
        recipe.cleanup()


def run_torchtune(config: Path, clock: PhaseClock) -> None:
    with clock.phase("import"):
        import importlib.util

        import torchtune
        from omegaconf import OmegaConf

        # torchtune's recipes are files beside the package (its `recipes` folder refuses imports).
        path = Path(torchtune.__file__).parent.parent / "recipes" / "lora_finetune_single_device.py"
        spec = importlib.util.spec_from_file_location("lora_finetune_single_device", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        LoRAFinetuneRecipeSingleDevice = module.LoRAFinetuneRecipeSingleDevice
    clock.wrap(LoRAFinetuneRecipeSingleDevice, "load_checkpoint", "load")
    clock.wrap(LoRAFinetuneRecipeSingleDevice, "_setup_model", "build")
    cfg = OmegaConf.load(config)
    recipe = LoRAFinetuneRecipeSingleDevice(cfg)
    with clock.phase("setup"):
        recipe.setup(cfg)
    with clock.phase("save"):
        recipe.save_checkpoint(epoch=0)
    recipe.cleanup()


def child_main(library: str, config: Path) -> int:
    clock = PhaseClock()
    (run_torchtune if library == "torchtune" else run_ours)(config, clock)
    clock.report()
    return 0


# ----------------------------------------------------------------------------------------------
# The parent: inputs, one process per library and repeat, the table
# ----------------------------------------------------------------------------------------------


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama3_2_1b", choices=("tiny", "100m", "llama3_2_1b", "llama3_1_8b"))
    p.add_argument("--method", default="qlora", choices=("lora", "qlora"))
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--repeats", type=int, default=1, help="processes per library, alternating")
    p.add_argument("--torchtune-python", help="python of a venv with torchtune (benchmarks/setup_torchtune.sh)")
    p.add_argument("--baseline-tree", type=Path, help="also run ours from this source tree, as 'baseline'")
    p.add_argument("--threads", type=int, default=2, help="torch threads in every child")
    p.add_argument("--work-dir", type=Path, default=_HERE.parent / "runs" / "startup")
    p.add_argument("--json", type=Path, help="write every process's phases to this file")
    p.add_argument("--child", nargs=2, metavar=("LIBRARY", "CONFIG"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def prepare(args: argparse.Namespace) -> dict[str, Path]:
    """Tokenizer, a small data file and the bf16 HF checkpoint; returns each library's config."""
    import torch
    from bench_cells import (
        SEED,
        LoraSpec,
        RunConfig,
        model_spec,
        our_config,
        prepare_tokenizer,
        torchtune_config,
        write_checkpoint,
        write_dataset,
        write_yaml,
    )

    spec = model_spec(args.model)
    cfg = RunConfig(spec, args.method, 1, 64, 0, 1, "cpu", args.dtype, LoraSpec())
    work = args.work_dir / spec.name
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = prepare_tokenizer(spec, work)
    data = work / "train.jsonl"
    write_dataset(data, num_records=8, seq_len=cfg.seq_len, seed=SEED, kind="uniform")
    torch_dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    started = time.process_time()
    ckpt = work / f"checkpoint_{args.dtype}"
    files = write_checkpoint(spec, tokenizer, ckpt, torch_dtype, "cpu")
    print(f"checkpoint {ckpt} ready ({time.process_time() - started:.0f} CPU s)", flush=True)
    configs = {}
    for library in ("ours", "baseline", "torchtune"):
        out = work / f"{args.method}_{library}"
        if library == "torchtune":
            config = torchtune_config(cfg, ckpt, files, tokenizer, data, out)
        else:
            config = our_config(cfg, ckpt, tokenizer, data, out)
        configs[library] = write_yaml(work / f"{args.method}_{library}.yaml", config)
    return configs


def run_child(library: str, python: str, config: Path, env: dict[str, str]) -> dict[str, dict[str, float]]:
    out_dir = Path(config).with_suffix("")
    subprocess.run(["rm", "-rf", str(out_dir)], check=True)
    cmd = [python, str(Path(__file__).resolve()), "--child", library, str(config)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    subprocess.run(["rm", "-rf", str(out_dir)], check=True)  # the written models are not kept
    lines = [line for line in proc.stdout.splitlines() if line.startswith(_MARK)]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"error: the {library} process failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len(_MARK) :])


def child_env(args: argparse.Namespace, tree: Optional[Path]) -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    env["TORCHAO_FORCE_SKIP_LOADING_SO_FILES"] = "1"
    env["HF_HOME"] = str(args.work_dir / "hf_home")
    roots = [str(tree.resolve())] if tree is not None else []
    env["PYTHONPATH"] = os.pathsep.join([*roots, str(_HERE.parent), str(_HERE), env.get("PYTHONPATH", "")])
    return env


def print_table(runs: list[dict[str, Any]]) -> str:
    libraries = list(dict.fromkeys(r["library"] for r in runs))
    head = f"{'library':<10} {'phase':<8} {'CPU s':>8} {'wall s':>8} {'peak RSS GiB':>13} {'RSS after GiB':>14}"
    lines = [head]
    for library in libraries:
        mine = [r["phases"] for r in runs if r["library"] == library]
        for phase in PHASES:
            got = [m[phase] for m in mine if phase in m]
            if not got:
                continue
            cpu = sorted(g["cpu_s"] for g in got)[len(got) // 2]
            wall = sorted(g["wall_s"] for g in got)[len(got) // 2]
            peak = sorted(g["peak_rss_gib"] for g in got)[len(got) // 2]
            after = sorted(g["rss_after_gib"] for g in got)[len(got) // 2]
            lines.append(f"{library:<10} {phase:<8} {cpu:>8.1f} {wall:>8.1f} {peak:>13.2f} {after:>14.2f}")
        process = sorted(m["process"]["peak_rss_gib"] for m in mine)[len(mine) // 2]
        lines.append(f"{library:<10} {'process':<8} {'':>8} {'':>8} {process:>13.2f}")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args.child[0], Path(args.child[1]))
    sys.path.insert(0, str(_HERE))
    configs = prepare(args)
    libraries: list[tuple[str, str, Optional[Path]]] = [("ours", sys.executable, None)]
    if args.baseline_tree:
        libraries.append(("baseline", sys.executable, args.baseline_tree))
    if args.torchtune_python:
        libraries.append(("torchtune", args.torchtune_python, None))
    runs = []
    for repeat in range(args.repeats):
        for library, python, tree in libraries:
            phases = run_child(library, python, configs[library], child_env(args, tree))
            runs.append({"library": library, "repeat": repeat, "phases": phases})
            summary = ", ".join(
                f"{name} {p['cpu_s']:.1f} CPU s / peak {p['peak_rss_gib']:.2f} GiB"
                for name, p in phases.items()
                if name in PHASES
            )
            print(f"  {library} run {repeat}: {summary}; process peak {phases['process']['peak_rss_gib']:.2f} GiB")
    table = print_table(runs)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "date": datetime.date.today().isoformat(),
                    "command": " ".join(sys.argv),
                    "model": args.model,
                    "method": args.method,
                    "dtype": args.dtype,
                    "runs": runs,
                    "table": table,
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
