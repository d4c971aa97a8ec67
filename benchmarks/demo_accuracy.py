"""The demo's figures, all from one command: training time, held-out loss, and exact-match
accuracy on the 200 held-out demo prompts per task family, trained against untrained.

    python benchmarks/demo_accuracy.py --train --threads 2   # run the README's first command, timed, then score it
    python benchmarks/demo_accuracy.py output/tiny_full      # score a finished run (its newest checkpoint)
    python benchmarks/demo_accuracy.py output/tiny_full/step_N

`--train` runs `tune finetune_llm --config tiny_full output_dir=RUN` in a child process (RUN must
not hold checkpoints yet) and measures its wall-clock and CPU time (user + system, the child's
own); `--threads N` sets OMP_NUM_THREADS for it, so the same figure can be measured on any
machine. Without `--train` the time is the run's own (events.jsonl, wall clock only).

Each held-out record's prompt is rendered with the template the demo trains with ("plain"),
answered greedily (KV-cached, batched), cut at the end-of-sequence token or a newline, and
scored 1 when the answer equals the reference exactly. The untrained column scores the model
the training run started from: the same architecture initialised with the run's seed, read from
the checkpoint's params.yaml, exactly as `tune finetune_llm` initialises it. Any checkpoint
directory works, a `tune quantize` output included. The same scoring runs inside lm-eval with
`tune eleuther_eval --config eleuther_evaluation` (task demo_exact_match); both give the same
number for the same model.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

from finetune.checkpointing import load_model
from finetune.checkpointing.quantized import is_quantized_checkpoint, load_quantized_model
from finetune.data import get_template
from finetune.data.demo.make_demo_data import family_of
from finetune.models import TransformerDecoder, model_args
from finetune.models.generation import TextStream, generate
from finetune.params import resolve_path
from finetune.tokenizers import Tokenizer, load_tokenizer
from finetune.training.model_setup import initial_state_dict


def load_checkpoint(directory: Path) -> TransformerDecoder:
    if is_quantized_checkpoint(directory):
        return load_quantized_model(directory)[0]
    return load_model(directory)[0].eval()


def untrained_model(directory: Path) -> tuple[TransformerDecoder, int]:
    """The weights the training run that wrote `directory` started from, and its seed."""
    params_file = directory / "params.yaml"
    if not params_file.is_file():
        sys.exit(
            f"error: {params_file} not found; "
            "--untrained needs the params.yaml a training run saves with each checkpoint"
        )
    params = yaml.safe_load(params_file.read_text())
    if params.get("checkpoint_dir"):
        sys.exit("error: that run started from a pretrained checkpoint, not a random init; --untrained does not apply")
    args = model_args(params["model"])
    state = initial_state_dict(
        args, weights_dir=None, checkpoint_format="auto", dtype=torch.float32, seed=params["seed"]
    )
    model = TransformerDecoder(args)
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    return model.eval(), params["seed"]


def answer_all(
    model: TransformerDecoder,
    tokenizer: Tokenizer,
    records: list[dict[str, str]],
    template: str,
    max_new_tokens: int,
    batch_size: int,
) -> list[str]:
    render = get_template(template)
    prompts = [
        tokenizer.encode(render.format(r["instruction"], r.get("input", "")), add_bos=True, add_eos=False)
        for r in records
    ]
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        streams = [TextStream(tokenizer.decode, ["\n"]) for _ in batch]

        def on_token(row: int, token: int, streams: list[TextStream] = streams) -> bool:
            streams[row].push(token)
            return streams[row].stopped

        generate(
            model,
            batch,
            max_new_tokens=max_new_tokens,
            stop_tokens=tokenizer.stop_tokens,
            pad_id=tokenizer.pad_id,
            on_token=on_token,
        )
        answers += [stream.text for stream in streams]
    return answers


def score(records: list[dict[str, str]], answers: list[str]) -> dict[str, Any]:
    """Overall and per-family exact match (families as the demo data names them)."""
    by_family: dict[str, list[bool]] = defaultdict(list)
    for record, answer in zip(records, answers):
        by_family[family_of(record["instruction"])].append(answer == record["output"])
    hits = sum(sum(v) for v in by_family.values())
    return {
        "correct": hits,
        "total": len(records),
        "accuracy": hits / len(records),
        "families": {name: {"correct": sum(v), "total": len(v)} for name, v in sorted(by_family.items())},
    }


def train_demo(run_dir: Path, threads: Optional[int]) -> dict[str, float]:
    """Run the README's first command into `run_dir`; its wall-clock and CPU seconds."""
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    command = [sys.executable, "-m", "finetune.cli", "finetune_llm", "--config", "tiny_full", f"output_dir={run_dir}"]
    print("running:", "tune", *command[3:], f"(OMP_NUM_THREADS={env.get('OMP_NUM_THREADS', 'unset')})", flush=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, env=env, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"error: the demo run failed with exit status {done.returncode} (its error is above)")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu}


def newest_checkpoint(path: Path) -> Path:
    """`path` itself when it is a checkpoint, else the run folder's newest step_<N>."""
    if (path / "params.yaml").is_file() and not (path / "metrics.jsonl").is_file():
        return path
    steps = [(int(m[1]), p) for p in path.glob("step_*") if (m := re.fullmatch(r"step_(\d+)", p.name))]
    if not steps:
        sys.exit(f"error: {path} holds no step_<N> checkpoint; train the demo first (or pass --train)")
    return max(steps)[1]


def run_figures(run_dir: Path) -> dict[str, Any]:
    """Held-out loss first and last, steps and wall time, from the files the run wrote."""
    figures: dict[str, Any] = {}
    metrics_file = run_dir / "metrics.jsonl"
    if metrics_file.is_file():
        records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
        evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
        steps = [r["step"] for r in records if "loss" in r]
        if evals:
            figures["eval_loss"] = (evals[0], evals[-1])
        if steps:
            figures["steps"] = steps[-1]
    events_file = run_dir / "events.jsonl"
    if events_file.is_file():
        ends = [json.loads(line) for line in events_file.read_text().splitlines() if '"job_end"' in line]
        if ends:
            figures["run_wall_s"] = ends[-1]["elapsed_s"]
    return figures


def _minutes(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "run", type=Path, nargs="?", default=Path("output/tiny_full"), help="a demo run's output_dir or a checkpoint"
    )
    parser.add_argument("--train", action="store_true", help="first train the demo into RUN, timed")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for --train")
    parser.add_argument("--no-untrained", action="store_true", help="skip scoring the run's random initialisation")
    parser.add_argument("--data", default="pkg:data/demo/heldout.jsonl", help="instruct .jsonl with reference outputs")
    parser.add_argument(
        "--tokenizer", default=None, help="tokenizer.model (default: the checkpoint's, else the demo's)"
    )
    parser.add_argument("--template", default="plain", help="prompt template the model was trained with")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--limit", type=int, default=None, help="score only the first N records")
    parser.add_argument("--show", type=int, default=5, help="print this many answers next to their references")
    parser.add_argument("--output", type=Path, default=None, help="also write the figures as JSON")
    args = parser.parse_args(argv)

    timing = train_demo(args.run, args.threads) if args.train else None
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if not args.run.is_dir():
        sys.exit(f"error: {args.run} does not exist; train the demo first (or pass --train)")
    checkpoint = newest_checkpoint(args.run)
    run_dir = checkpoint.parent
    own_tokenizer = checkpoint / "tokenizer.model"
    tokenizer_path = args.tokenizer or (own_tokenizer if own_tokenizer.is_file() else "pkg:data/demo/tokenizer.model")
    tokenizer = load_tokenizer(resolve_path(str(tokenizer_path)))
    lines = resolve_path(args.data).read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines if line.strip()][: args.limit]

    models = [(f"trained ({checkpoint.name})", load_checkpoint(checkpoint))]
    if not args.no_untrained:
        model, seed = untrained_model(checkpoint)
        models.append((f"untrained (seed {seed})", model))

    results = {}
    for name, model in models:
        answers = answer_all(model, tokenizer, records, args.template, args.max_new_tokens, args.batch_size)
        results[name] = score(records, answers)
        print(f"\n{name}: first answers")
        for record, answer in list(zip(records, answers))[: args.show]:
            mark = "ok " if answer == record["output"] else "   "
            print(
                f"  {mark}{record['instruction']} {record.get('input', '')!r:<14} -> {answer!r} (reference "
                f"{record['output']!r})"
            )

    figures = run_figures(run_dir)
    print(f"\ndemo run {run_dir}")
    if timing is not None:
        threads = args.threads if args.threads is not None else os.environ.get("OMP_NUM_THREADS", "default")
        print(
            f"  time          {_minutes(timing['wall_s'])} wall clock, {timing['cpu_s']:.0f} s CPU (user + system), "
            f"OMP_NUM_THREADS={threads}"
        )
    elif "run_wall_s" in figures:
        print(f"  time          {_minutes(figures['run_wall_s'])} wall clock (the run's events.jsonl)")
    if "steps" in figures:
        print(f"  steps         {figures['steps']}")
    if "eval_loss" in figures:
        (first_step, first), (last_step, last) = figures["eval_loss"]
        print(f"  held-out loss {first:.2f} at step {first_step} -> {last:.2f} at step {last_step}")

    families = sorted({f for r in results.values() for f in r["families"]})
    width = max(len(f) for f in (*families, "overall")) + 2
    print(f"\nexact match on {len(records)} held-out prompts ({args.data}, template {args.template}, greedy)")
    print(f"{'family':<{width}}" + "".join(f"{name:>24}" for name in results))
    for family in families:
        cells = [r["families"].get(family, {"correct": 0, "total": 0}) for r in results.values()]
        print(f"{family:<{width}}" + "".join(f"{c['correct']:>20}/{c['total']:<3}" for c in cells))
    print(
        f"{'overall':<{width}}"
        + "".join(f"{r['correct']:>13}/{r['total']} ({100 * r['accuracy']:4.1f}%)" for r in results.values())
    )
    if args.output is not None:
        payload = {"run": str(run_dir), "timing": timing, "figures": figures, "exact_match": results}
        args.output.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
