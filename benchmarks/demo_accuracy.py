"""Did the demo model learn its tasks? Exact-match accuracy on the held-out demo prompts,
trained against untrained.

    tune finetune_llm --config tiny_full output_dir=output/tiny_full
    python benchmarks/demo_accuracy.py output/tiny_full/step_563 --untrained

Each held-out record's prompt is rendered with the template the demo trains with ("plain"),
answered greedily (KV-cached, batched), cut at the end-of-sequence token or a newline, and
scored 1 when the answer equals the reference exactly. `--untrained` also scores the model the
training run started from: the same architecture initialised with the run's seed, read from
the checkpoint's params.yaml, exactly as `tune finetune_llm` initialises it. Any checkpoint
directory works, a `tune quantize` output included. The same scoring runs inside lm-eval with
`tune eleuther_eval --config eleuther_evaluation` (task demo_exact_match); both give the same
number for the same model.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

from finetune.checkpointing import load_model
from finetune.checkpointing.quantized import is_quantized_checkpoint, load_quantized_model
from finetune.data import get_template
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
    """Overall and per-task exact match (a task = the record's instruction, numbers aside)."""
    by_task: dict[str, list[bool]] = defaultdict(list)
    for record, answer in zip(records, answers):
        task = "".join(c for c in record["instruction"] if not c.isdigit()).split(" from")[0].strip()
        by_task[task].append(answer == record["output"])
    hits = sum(sum(v) for v in by_task.values())
    return {
        "correct": hits,
        "total": len(records),
        "accuracy": hits / len(records),
        "tasks": {task: {"correct": sum(v), "total": len(v)} for task, v in sorted(by_task.items())},
    }


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="checkpoint directory (e.g. output/tiny_full/step_563)")
    parser.add_argument("--untrained", action="store_true", help="also score the run's random initialisation")
    parser.add_argument("--data", default="pkg:data/demo/heldout.jsonl", help="instruct .jsonl with reference outputs")
    parser.add_argument(
        "--tokenizer", default=None, help="tokenizer.model (default: the checkpoint's, else the demo's)"
    )
    parser.add_argument("--template", default="plain", help="prompt template the model was trained with")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--limit", type=int, default=None, help="score only the first N records")
    parser.add_argument("--show", type=int, default=5, help="print this many answers next to their references")
    parser.add_argument("--output", type=Path, default=None, help="also write the scores as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))

    if not args.checkpoint.is_dir():
        sys.exit(f"error: checkpoint directory {args.checkpoint} does not exist; train the demo first")
    tokenizer_path = args.tokenizer or (
        args.checkpoint / "tokenizer.model"
        if (args.checkpoint / "tokenizer.model").is_file()
        else "pkg:data/demo/tokenizer.model"
    )
    tokenizer = load_tokenizer(resolve_path(str(tokenizer_path)))
    lines = resolve_path(args.data).read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines if line.strip()][: args.limit]

    models = [(f"trained ({args.checkpoint.name})", load_checkpoint(args.checkpoint))]
    if args.untrained:
        model, seed = untrained_model(args.checkpoint)
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

    tasks = sorted({t for r in results.values() for t in r["tasks"]})
    width = max(len(t) for t in tasks) + 2
    print(f"\nexact match on {len(records)} held-out prompts ({args.data}, template {args.template}, greedy)")
    print(f"{'task':<{width}}" + "".join(f"{name:>24}" for name in results))
    for task in tasks:
        cells = [r["tasks"].get(task, {"correct": 0, "total": 0}) for r in results.values()]
        print(f"{task:<{width}}" + "".join(f"{c['correct']:>20}/{c['total']:<3}" for c in cells))
    print(
        f"{'overall':<{width}}"
        + "".join(f"{r['correct']:>11}/{r['total']} ({100 * r['accuracy']:4.1f}%)" for r in results.values())
    )
    if args.output is not None:
        args.output.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
