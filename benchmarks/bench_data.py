"""The tokenized-data cache at several data sizes: time to the first step and peak RSS of a
training process on a cold and a warm cache, and build throughput per process count side by
side with Hugging Face `datasets.map` doing the same tokenization of the same file.

    python benchmarks/bench_data.py --sizes 0.1 1 --throughput-sizes 0.1 --procs 1 2

Data: generated Alpaca-style instruction JSON Lines (seeded), written under --workdir and
deleted afterwards (--keep keeps it). Tokenizer: the demo SentencePiece model. Each training
run is a fresh `tune full_finetune_single_device` process on the tiny model that stops after
one step; time to the first step is from process start to its first metrics line, and peak
RSS is the process's VmHWM (read from /proc while it runs); the build's worker processes are
reported apart, as their summed proportional set size (PSS: pages shared with the parent
counted once). The same cold and warm pair is also timed inside a live Python process that
has already trained once (as in a notebook): the recipe's setup to its first metrics line,
without the interpreter and library start-up that every process pays whatever its data.
`--baseline-sizes` also times `data_cache_dir=none` (tokenizing in memory every run, the
path without the cache). Wall-clock numbers depend on the machine's other load: compare
within one run of this script.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from finetune.data import build_dataset  # noqa: E402
from finetune.data.demo import demo_path  # noqa: E402

TOKENIZER = demo_path("tokenizer.model")
MAX_SEQ_LEN = 512
WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
    "they you were her she there been one all we their has would when if so no will my more out up into do "
    "model data train step loss value number answer question list word sentence write explain describe "
    "reason because first second third result example compute total count order reverse sort find"
).split()


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def generate(path: Path, gigabytes: float, seed: int = 0) -> int:
    """Instruction records of 100-2000 characters until the file holds `gigabytes`; returns records."""
    rng = random.Random(seed)

    def text(low: int, high: int) -> str:
        return " ".join(rng.choices(WORDS, k=rng.randint(low, high)))

    pool = [
        {"instruction": text(5, 40), "input": text(0, 60) if rng.random() < 0.4 else "", "output": text(10, 250)}
        for _ in range(20000)
    ]
    target, written, count = int(gigabytes * 1e9), 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            record = dict(pool[rng.randrange(len(pool))])
            record["instruction"] = f"{count}. {record['instruction']}"  # every record distinct
            line = json.dumps(record) + "\n"
            f.write(line)
            written += len(line)
            count += 1
    return count


# ----------------------------------------------------------------------------------------------
# Training runs: time to the first step, peak RSS
# ----------------------------------------------------------------------------------------------


def run_settings(data: Path, cache: Optional[Path], out: Path) -> list[str]:
    """The overrides of every timed run: the tiny model, one step of batch 2, fp32 on CPU."""
    return [
        "model=tiny",
        f"tokenizer_path={TOKENIZER}",
        f"dataset={data}",
        f"max_seq_len={MAX_SEQ_LEN}",
        "batch_size=2",
        "max_steps_per_epoch=1",
        "device=cpu",
        "dtype=fp32",
        f"output_dir={out}",
        f"data_cache_dir={cache if cache is not None else 'none'}",
    ]


def first_step(data: Path, cache: Optional[Path], out: Path) -> dict[str, float]:
    """A fresh `tune` process: time from its start to its first metrics line, its peak RSS."""
    argv = [sys.executable, "-m", "finetune.cli", "full_finetune_single_device", *run_settings(data, cache, out)]
    return _watch(argv, out / "metrics.jsonl", out)


def first_step_in_process(data: Path, cache: Path, out: Path, workdir: Path) -> dict[str, float]:
    """A Python process trains once on a small file (imports, first backward), then runs the
    recipe on `data`: the time from that recipe's setup to its first metrics line."""
    warmup = workdir / "warmup.jsonl"
    with open(data, encoding="utf-8") as source, open(warmup, "w", encoding="utf-8") as sink:
        sink.writelines(line for _, line in zip(range(64), source))
    timing = workdir / "in_process.json"
    argv = [sys.executable, __file__, "--drive", str(warmup), str(data), str(cache), str(out), str(timing)]
    result = _watch(argv, timing, out)
    result["first_step_s"] = json.loads(timing.read_text())["first_step_s"]
    return result


def _drive(warmup: Path, data: Path, cache: Path, out: Path, timing: Path) -> None:
    """The in-process run (`--drive`): a warm-up recipe, then the timed one."""
    import threading

    from finetune.config import TuneArgumentParser
    from finetune.params import FullFinetuneParams
    from finetune.recipes.full_finetune import FullFinetuneRecipe

    def train(dataset: Path, cache_dir: Path, output_dir: Path) -> Optional[float]:
        params = TuneArgumentParser(FullFinetuneParams).parse_args(run_settings(dataset, cache_dir, output_dir))
        metrics, seen = output_dir / "metrics.jsonl", {}
        began = time.perf_counter()

        def watch() -> None:
            while "at" not in seen:
                if metrics.exists() and metrics.stat().st_size > 0:
                    seen["at"] = time.perf_counter() - began
                time.sleep(0.005)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        recipe = FullFinetuneRecipe(params)
        recipe.setup()
        recipe.train()
        recipe.cleanup()
        watcher.join(timeout=1)
        return seen.get("at")

    for leftover in ("warmup_cache", "warmup_out"):
        shutil.rmtree(out.parent / leftover, ignore_errors=True)
    train(warmup, out.parent / "warmup_cache", out.parent / "warmup_out")
    first = train(data, cache, out)
    timing.write_text(json.dumps({"first_step_s": first}))


def _watch(argv: list[str], done_file: Path, out: Path) -> dict[str, float]:
    """Run `argv`; time until `done_file` has content; peak RSS of the process and peak summed
    PSS of its child processes (the build workers)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    shutil.rmtree(out, ignore_errors=True)
    done_file.unlink(missing_ok=True)
    began, cpu_before = time.perf_counter(), os.times()
    log = open(out.parent / f"{out.name}.log", "w")  # a file: a full pipe would stall the run
    process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    first, peak_kb, workers_kb = None, 0, 0
    while process.poll() is None:
        peak_kb = max(peak_kb, _vm_hwm_kb(process.pid))
        workers_kb = max(workers_kb, sum(_pss_kb(child) for child in _children(process.pid)))
        if first is None and done_file.exists() and done_file.stat().st_size > 0:
            first = time.perf_counter() - began
        time.sleep(0.02)
    log.close()
    if process.returncode != 0:
        raise RuntimeError(f"run failed: {Path(log.name).read_text()[-2000:]}")
    cpu = os.times()
    return {
        "first_step_s": first if first is not None else time.perf_counter() - began,
        "peak_rss_mb": peak_kb / 1024,
        "workers_pss_mb": workers_kb / 1024,
        "cpu_s": cpu.children_user + cpu.children_system - cpu_before.children_user - cpu_before.children_system,
    }


def _vm_hwm_kb(pid: int) -> int:
    return _proc_field(f"/proc/{pid}/status", "VmHWM:")


def _pss_kb(pid: int) -> int:
    return _proc_field(f"/proc/{pid}/smaps_rollup", "Pss:")


def _proc_field(path: str, name: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(name):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def _children(pid: int) -> list[int]:
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (FileNotFoundError, ProcessLookupError):
        return []


# ----------------------------------------------------------------------------------------------
# Build throughput: ours against datasets.map
# ----------------------------------------------------------------------------------------------


def our_build(data: Path, procs: int) -> dict[str, float]:
    from finetune.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(TOKENIZER)
    with tempfile.TemporaryDirectory(dir=data.parent) as cache:
        began, cpu = time.perf_counter(), _cpu()
        dataset = build_dataset(
            str(data),
            dataset_type="instruct",
            tokenizer=tokenizer,
            max_seq_len=MAX_SEQ_LEN,
            cache_dir=cache,
            num_proc=procs,
            log=lambda message: None,
        )
        seconds, cpu = time.perf_counter() - began, _cpu() - cpu
        tokens = dataset.num_tokens  # type: ignore[attr-defined]
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "cpu_s": cpu}


_HF_TOKENIZER: Any = None


def _hf_tokenize(record: dict) -> dict:
    """The same per-record work as the cache build: template, tokenize, truncate, shift labels."""
    global _HF_TOKENIZER
    from finetune.data.templates import get_template
    from finetune.data.tokenize import TokenizeSpec, TokenizeStats, tokenize_record
    from finetune.tokenizers import load_tokenizer

    if _HF_TOKENIZER is None:  # once per map process
        _HF_TOKENIZER = load_tokenizer(TOKENIZER)
    spec = TokenizeSpec("instruct", MAX_SEQ_LEN, get_template("alpaca"), False)
    samples = tokenize_record(record, "record", _HF_TOKENIZER, spec, TokenizeStats())
    tokens, labels = samples[0] if samples else ([], [])
    return {"tokens": tokens, "labels": labels}


def hf_build(data: Path, procs: int) -> dict[str, float]:
    import datasets  # the peer; optional

    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory(dir=data.parent) as cache:
        began, cpu = time.perf_counter(), _cpu()
        loaded = datasets.load_dataset("json", data_files=str(data), split="train", cache_dir=cache)
        load_s = time.perf_counter() - began
        mapped = loaded.map(_hf_tokenize, num_proc=procs if procs > 1 else None, remove_columns=loaded.column_names)
        seconds, cpu = time.perf_counter() - began, _cpu() - cpu
        tokens = sum(len(t) for t in mapped.with_format("numpy")["tokens"])
    return {
        "tokens": tokens,
        "seconds": seconds,
        "load_s": load_s,
        "tokens_per_s": tokens / seconds,
        "map_tokens_per_s": tokens / (seconds - load_s),
        "cpu_s": cpu,
    }


def _cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


# ----------------------------------------------------------------------------------------------


def main() -> None:
    if sys.argv[1:2] == ["--drive"]:
        _drive(*(Path(arg) for arg in sys.argv[2:7]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.1, 1.0], help="GB of JSONL")
    parser.add_argument("--throughput-sizes", type=float, nargs="*", default=[0.1])
    parser.add_argument("--baseline-sizes", type=float, nargs="*", default=[0.1])
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--no-hf", action="store_true", help="skip datasets.map")
    parser.add_argument("--no-in-process", action="store_true", help="skip the in-process pair")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_data"))
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    try:
        for size in args.sizes:
            data = args.workdir / f"instruct_{size:g}GB.jsonl"
            began = time.perf_counter()
            records = generate(data, size)
            row: dict[str, Any] = {"size_gb": size, "records": records, "bytes": data.stat().st_size}
            print(f"[{size:g} GB] generated {records} records in {time.perf_counter() - began:.0f}s", flush=True)
            cache = args.workdir / f"cache_{size:g}"
            shutil.rmtree(cache, ignore_errors=True)
            row["cold"] = first_step(data, cache, args.workdir / "out")
            print(f"[{size:g} GB] cold cache: {row['cold']}", flush=True)
            row["warm"] = first_step(data, cache, args.workdir / "out")
            print(f"[{size:g} GB] warm cache: {row['warm']}", flush=True)
            row["cache_mb"] = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) / 2**20
            shutil.rmtree(cache, ignore_errors=True)
            if not args.no_in_process:
                for state in ("cold", "warm"):
                    row[f"in_process_{state}"] = first_step_in_process(data, cache, args.workdir / "out", args.workdir)
                    print(f"[{size:g} GB] in process, {state} cache: {row[f'in_process_{state}']}", flush=True)
                shutil.rmtree(cache, ignore_errors=True)
            if size in args.baseline_sizes:
                row["no_cache"] = first_step(data, None, args.workdir / "out")
                print(f"[{size:g} GB] no cache: {row['no_cache']}", flush=True)
            if size in args.throughput_sizes:
                for procs in args.procs:
                    row[f"ours_{procs}"] = our_build(data, procs)
                    print(f"[{size:g} GB] ours, {procs} proc: {row[f'ours_{procs}']}", flush=True)
                    if not args.no_hf:
                        row[f"hf_{procs}"] = hf_build(data, procs)
                        print(f"[{size:g} GB] datasets.map, {procs} proc: {row[f'hf_{procs}']}", flush=True)
            results.append(row)
            if not args.keep:
                data.unlink()
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
