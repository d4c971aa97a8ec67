"""Throughput, peak memory and MFU of our fine-tuning recipes, side by side with torchtune.

    python benchmarks/bench_finetune.py --model 100m --method full --batch-size 2 --seq-len 256 \
        --steps 4 --warmup-steps 1 --repeats 3 --torchtune-python .venv-torchtune/bin/python \
        --docs docs/benchmarks.md

What is compared
    Both libraries train the same model from the same random weights (written once as a Hugging
    Face safetensors checkpoint and read by each library's own HF loader), on the same synthetic
    alpaca-format file, with the same batch size, sequence length, dtype, optimizer (torch AdamW,
    weight decay 0.01; each library's own choice of fused or foreach kernels), gradient clipping
    at 1.0, a cosine schedule without warm-up, no compile, no shuffling, activation checkpointing
    only with --activation-checkpointing (both). The cross-entropy is each library's default:
    torchtune's CEWithChunkedOutputLoss in 8 chunks (every torchtune config), ours `loss_chunks`
    auto (`--ours-set loss_chunks=8` gives ours the same 8 chunks).
    Each run is a fresh process running the library's stock recipe (ours: `full_finetune` /
    `lora_finetune`; torchtune: `full_finetune_single_device` / `lora_finetune_single_device`),
    and the libraries alternate (ours, torchtune, ours, torchtune, ...) so that slow phases of a
    shared machine hit both alike. Results are medians over the repeats.

Data (--data)
    uniform: every record's response is longer than the sequence length, so every sample of
    both libraries is truncated to exactly `seq_len` tokens, all of them trained.
    instruct: records of varied length (instruction, optional input, response) with the prompt
    masked (`train_on_input` false in both) and batches padded to their longest sample, as in
    instruction tuning.

How tokens are counted (the same for both)
    Throughput is non-pad tokens per second: the tokens of the timed steps' samples, counted
    per step by tokenizing the file with each library's own dataset code before timing (ours in
    this process, torchtune's in its venv; no shuffling, so step k holds samples k*b .. k*b+b-1),
    over the sum of the timed steps' times.

How steps are timed
    From each library's own per-step log, not from process wall time, so that start-up (imports,
    tokenizing, loading weights) and the final checkpoint write are excluded. Both libraries time
    a step the same way: a perf_counter from before the batch is fetched from the DataLoader to
    after the optimizer step, logging excluded. Both log tokens/s rather than seconds, each with
    its own token count, so the benchmark turns it back into seconds with that library's count:
    ours divides the step's non-pad tokens, torchtune its trained labels (shifted labels: the
    last position of a sample has none), both counted per step by the dataset check. The first
    `--warmup-steps` steps are excluded (allocator warm-up, first-touch page faults, lazy init);
    one untimed step follows the timed ones so the memory reading below cannot overlap the
    checkpoint write.

How memory is measured
    CPU: the training process's peak resident set (VmHWM in /proc/<pid>/status), read by the
    benchmark the moment the last timed step appears in the log, so it covers loading and the
    timed steps but not the final checkpoint save; the whole-process peak (ru_maxrss from wait4,
    save included) is recorded too. GPU: each library's own logged `torch.cuda.max_memory_allocated`,
    the largest over the timed steps (torchtune resets it every step, ours keeps a running max).

MFU
    model FLOPs per token / measured peak matmul rate, with
        full:  6 x N + 12 x n_layers x dim x seq_len
        LoRA:  4 x N + 6 x N_adapter + 12 x n_layers x dim x seq_len
    where N is the parameter count of every matmul weight (attention, MLP and output head; the
    embedding table is a lookup, norms are negligible), 6 = 2 forward + 2 input-gradient + 2
    weight-gradient FLOPs per weight (frozen LoRA base weights skip the weight gradient), and the
    last term is attention's QK^T and AV matmuls, forward and backward, counted without the causal
    saving (PaLM's convention). The peak is the best of several square matmuls of the training
    dtype run by this process with the same thread count the recipes get, measured before and
    after the runs; the better of the two counts (other jobs on a shared machine depress one).

Model sizes: `tiny` (our registry's 3.4M-parameter test model with the 512-piece demo tokenizer),
`100m` (dim 768, 12 layers, 12 heads, SwiGLU 2048, vocab 32000 with a 32000-piece SentencePiece
BPE tokenizer trained here on the synthetic text: 134M parameters, 85M outside the embedding and
output head), and on GPU the shapes of `llama3_2_1b` and `llama3_1_8b` with a byte-level tiktoken
file (random weights; tokenization quality does not matter for speed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import yaml
from bench_cells import (
    REPO_ROOT,
    SEED,
    LoraSpec,
    RunConfig,
    check_our_dataset,
    check_torchtune_dataset,
    model_spec,
    our_config,
    prepare_tokenizer,
    torchtune_config,
    write_checkpoint,
    write_dataset,
    write_yaml,
)
from bench_report import append_docs, markdown_report, print_table, summarise
from bench_runs import (
    RunResult,
    StepCounts,
    StepLog,
    flops_per_token,
    machine_description,
    peak_matmul_flops,
    per_step,
    read_our_steps,
    read_torchtune_steps,
    run_recipe,
)

# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="tiny", choices=("tiny", "100m", "llama3_2_1b", "llama3_1_8b"))
    p.add_argument("--method", default="full", choices=("full", "lora", "qlora"))
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="timed steps per run")
    p.add_argument("--warmup-steps", type=int, default=2, help="untimed steps at the start of each run")
    p.add_argument("--repeats", type=int, default=3, help="runs per library (alternating)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"))
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--activation-checkpointing", action="store_true", help="both libraries recompute each layer")
    p.add_argument(
        "--data",
        default="uniform",
        choices=("uniform", "instruct"),
        help="uniform: every sample seq_len tokens, all trained; "
        "instruct: varied lengths, prompt masked, padded batches",
    )
    p.add_argument("--threads", type=int, help="OMP/MKL threads for every training process (default: torch's)")
    p.add_argument("--torchtune-python", help="python of a venv with torchtune (benchmarks/setup_torchtune.sh)")
    p.add_argument("--skip-ours", action="store_true", help="only run torchtune")
    p.add_argument(
        "--baseline-tree",
        type=Path,
        help="also run our recipe from this source tree (an earlier revision's checkout), as 'baseline'",
    )
    p.add_argument(
        "--ours-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a what-if: override one of our recipe's keys (e.g. loss_chunks=1); repeatable",
    )
    p.add_argument(
        "--compile",
        default="off",
        choices=("off", "on", "both"),
        help="torch.compile in both libraries; both: every run again with it on, sharing the prepared inputs",
    )
    p.add_argument(
        "--stop-compiled-runs",
        action="store_true",
        help="end each compiled run at its last timed step (no final save; its time outside the steps is not measured)",
    )
    p.add_argument("--prepare-only", action="store_true", help="write the tokenizer and weights, then exit")
    p.add_argument("--work-dir", type=Path, default=REPO_ROOT / "runs" / "bench")
    p.add_argument("--docs", type=Path, help="append a markdown section with the results to this file")
    p.add_argument("--json", type=Path, help="also write every run's numbers to this file")
    return p.parse_args(argv)


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """KEY=VALUE strings to a dict, values read as YAML (so 1 is an int, true a bool)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"error: --ours-set {pair!r} is not KEY=VALUE")
        out[key] = yaml.safe_load(value)
    return out


def child_env(work: Path, threads: Optional[int]) -> dict[str, str]:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["TORCHAO_FORCE_SKIP_LOADING_SO_FILES"] = "1"  # silences torchao's CUDA-extension warnings
    env["HF_HOME"] = str(work / "hf_home")  # datasets' cache for torchtune's json loading
    env["TQDM_MININTERVAL"] = "1"
    return env


def remove_saved_weights(out: Path) -> None:
    """A run's final checkpoint is written only to time the save; keeping it fills the disk over many repeats."""
    for saved in [*out.glob("step_*"), out / "checkpoints"]:
        if saved.is_dir():
            shutil.rmtree(saved)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype = ("bf16" if device == "cuda" else "fp32") if args.dtype == "auto" else args.dtype
    spec = model_spec(args.model)
    cfg = RunConfig(
        spec,
        args.method,
        args.batch_size,
        args.seq_len,
        args.warmup_steps,
        args.steps,
        device,
        dtype,
        LoraSpec(rank=args.lora_rank),
        args.activation_checkpointing,
        args.data,
    )
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32

    work = args.work_dir / spec.name
    work.mkdir(parents=True, exist_ok=True)
    cell = work / (
        f"{cfg.method}_b{cfg.batch_size}_s{cfg.seq_len}_{cfg.data}"
        + ("_ac" if cfg.activation_checkpointing else "")
        + "".join(f"_{o}" for o in args.ours_set)
    )
    cell.mkdir(exist_ok=True)
    env = child_env(work, args.threads)
    if args.threads:
        torch.set_num_threads(args.threads)  # the peak-rate measurement uses what the recipes get
    print(f"preparing tokenizer, data and weights in {work}", flush=True)
    tokenizer = prepare_tokenizer(spec, work)
    data = cell / "train.jsonl"
    write_dataset(
        data,
        num_records=cfg.batch_size * cfg.total_steps + cfg.batch_size,
        seq_len=cfg.seq_len,
        seed=SEED,
        kind=cfg.data,
    )
    ckpt = work / f"checkpoint_{dtype}"
    files = write_checkpoint(spec, tokenizer, ckpt, torch_dtype, device)
    if args.prepare_only:
        print(f"prepared {ckpt}", flush=True)
        return 0

    commands: dict[str, list[str]] = {}
    readers: dict[str, Callable[[Path], list[StepLog]]] = {}
    counts: dict[str, StepCounts] = {}
    envs: dict[str, dict[str, str]] = {}
    if not args.skip_ours:
        lengths = per_step(check_our_dataset(cfg, data, tokenizer), cfg.batch_size, cfg.total_steps)
        recipe = "lora_finetune" if cfg.is_lora else "full_finetune"
        commands["ours"] = [sys.executable, "-m", "finetune.cli", recipe, "--config"]
        readers["ours"] = lambda out: read_our_steps(out / "metrics.jsonl")
        counts["ours"] = StepCounts(non_pad=lengths, logged=lengths)
    if args.baseline_tree and "ours" in commands:  # the same recipe and data, the other revision's code
        commands["baseline"], readers["baseline"], counts["baseline"] = (
            commands["ours"],
            readers["ours"],
            counts["ours"],
        )
        envs["baseline"] = {**env, "PYTHONPATH": str(args.baseline_tree.resolve()) + os.pathsep + env["PYTHONPATH"]}
    if args.torchtune_python:
        tt_probe = write_yaml(
            cell / "torchtune_probe.yaml", torchtune_config(cfg, ckpt, files, tokenizer, data, cell / "probe")
        )
        tt_lengths, tt_trained = check_torchtune_dataset(cfg, args.torchtune_python, tt_probe, env)
        recipe = "lora_finetune_single_device" if cfg.is_lora else "full_finetune_single_device"
        commands["torchtune"] = [args.torchtune_python, "-m", "torchtune._cli.tune", "run", recipe, "--config"]
        readers["torchtune"] = lambda out: read_torchtune_steps(out / "logs" / "log.txt")
        counts["torchtune"] = StepCounts(
            non_pad=per_step(tt_lengths, cfg.batch_size, cfg.total_steps),
            logged=per_step(tt_trained, cfg.batch_size, cfg.total_steps),
        )
    if not commands:
        raise SystemExit("error: nothing to run: pass --torchtune-python or drop --skip-ours")

    machine = machine_description(device)
    peak_before = peak_matmul_flops(device, torch_dtype)
    print(f"{machine}; peak {dtype} matmul {peak_before / 1e9:.1f} GFLOP/s", flush=True)

    settings = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    record: dict[str, Any] = {
        "config": {
            "model": spec.name,
            "method": cfg.method,
            "batch_size": cfg.batch_size,
            "seq_len": cfg.seq_len,
            "warmup_steps": cfg.warmup_steps,
            "timed_steps": cfg.timed_steps,
            "device": device,
            "dtype": dtype,
            "activation_checkpointing": cfg.activation_checkpointing,
        },
        "machine": machine,
        "peak_flops": peak_before,
        "flops_per_token": flops_per_token(cfg),
        "cells": {},
    }
    for compiled in settings:
        cell_cfg = dataclasses.replace(cfg, compile=compiled)
        label = "compile_on" if compiled else "compile_off"
        stop = compiled and args.stop_compiled_runs
        load_before = os.getloadavg()[0]
        results: list[RunResult] = []
        for repeat in range(args.repeats):
            for library, cmd in commands.items():
                out = cell / f"{library}_{label}_run{repeat}"
                if out.exists():
                    subprocess.run(["rm", "-rf", str(out)], check=True)
                out.mkdir()
                ours = library in ("ours", "baseline")
                make = our_config if ours else (lambda c, k, t, d, o: torchtune_config(c, k, files, t, d, o))
                config = make(cell_cfg, ckpt, tokenizer, data, out)
                if ours:
                    config.update(parse_overrides(args.ours_set))
                config_path = write_yaml(out / "config.yaml", config)
                reader = readers[library]
                result = run_recipe(
                    library,
                    repeat,
                    [*cmd, str(config_path)],
                    envs.get(library, env),
                    out / "stdout.log",
                    lambda reader=reader, out=out: reader(out),
                    cell_cfg,
                    counts[library],
                    stop_after_timed=stop,
                )
                results.append(result)
                remove_saved_weights(out)
                print(
                    f"  {library} {label} run {repeat}: {result.tokens_per_second:,.0f} tokens/s, "
                    f"step times {', '.join(f'{t:.3f}' for t in result.step_times_s)} s, "
                    f"peak {result.peak_memory_gb:.3f} GiB, process peak RSS {result.process_peak_rss_gb:.2f} GiB, "
                    f"outside steps {result.outside_steps_s:.1f} s, wall {result.wall_s:.1f} s",
                    flush=True,
                )
                # Written after every run, so a session stopped part-way keeps what it measured.
                record["cells"][label] = [dataclasses.asdict(r) for r in results]
                if args.json:
                    args.json.write_text(json.dumps(record, indent=1))

        # Other jobs can depress one measurement: the better of two, before and after, is the peak.
        peak_flops = max(peak_before, peak_matmul_flops(device, torch_dtype))
        record["peak_flops"] = max(record["peak_flops"], peak_flops)
        summaries = summarise(results, cell_cfg, peak_flops)
        print(f"--- {label}")
        print_table(summaries)
        command = "python " + " ".join(
            shlex.quote(a)
            for a in [
                str(Path(sys.argv[0]).relative_to(REPO_ROOT) if Path(sys.argv[0]).is_absolute() else sys.argv[0]),
                *(sys.argv[1:] if argv is None else argv),
            ]
        )
        report = markdown_report(
            cell_cfg, summaries, command, machine, peak_flops, (load_before, os.getloadavg()[0]), args.ours_set
        )
        if args.docs:
            append_docs(args.docs, report)
            print(f"appended results to {args.docs}")
    if args.json:
        args.json.write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
