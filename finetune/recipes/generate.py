"""Generate text with a Llama-family model: one prompt, or a file of prompts in batches.

Read it top to bottom: `setup` reads the architecture, the tokenizer and the prompts (so a bad
prompt fails before gigabytes of weights are read), then loads the checkpoint in any supported
format and an optional PEFT LoRA adapter on top (both steps from `finetune.inference`).
`generate` runs batched, KV-cached decoding from `finetune.models.generation`, streams the text
of a lone prompt as it is produced, stops each response at a stop token or stop string, and
reports tokens/s and time to first token.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, TextIO

from finetune.data.sources import read_file
from finetune.data.templates import get_template
from finetune.errors import UserError
from finetune.inference import load_inference_model, prepare_inference
from finetune.models import num_params
from finetune.models.generation import TextStream, generate
from finetune.params import GenerateParams, resolve_path
from finetune.recipes import recipe_main, run_once
from finetune.tokenizers import Message

PARAMS_CLASS = GenerateParams
ALIASES = ("alpaca_generate",)  # other names `tune` runs it by


@dataclass
class Prompt:
    """One prompt as given, where it came from, and the token ids the model sees."""

    instruction: str
    input: str
    where: str  # for messages: "" for the prompt param, or "line 3 of prompts.txt"
    reference: Optional[str] = None  # the record's expected output, copied to output_file
    tokens: Optional[list[int]] = None


RECORD_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")  # a prompt_file of records; others: a prompt per line


class GenerateRecipe:
    """Load a model (plus adapter) and continue prompts with it."""

    def __init__(self, params: GenerateParams) -> None:
        self.params = params
        self.output: Optional[TextIO] = None
        self.output_path: Optional[Path] = None

    # ------------------------------------------------------------------------------------------
    # Setup
    # ------------------------------------------------------------------------------------------

    def setup(self) -> None:
        p = self.params
        p.check()  # a notebook may have changed a field since the params were built
        inference = prepare_inference(p)  # no weights yet: those are read once the prompts are checked
        self.device, self.model_args, self.tokenizer = inference.device, inference.model_args, inference.tokenizer
        self.template = None if p.chat or p.template == "none" else get_template(p.template)
        if p.temperature == 0 and (p.top_k is not None or p.top_p is not None):
            self.log(
                "note: top_k and top_p shape sampling, which needs temperature > 0; at temperature=0 "
                "decoding is greedy and they do nothing (set e.g. temperature=0.7 to sample)"
            )
        self.log(f"prompt format: {self._describe_format()}")
        self.prompts = self._read_prompts()
        for prompt in self.prompts:
            prompt.tokens = self._tokenize(prompt)
            self._check_length(prompt)

        if p.output_file is not None:
            self.output_path = self._check_output_file(Path(p.output_file))
            self.output = self._open_output(self._partial(self.output_path))

        self.model = load_inference_model(inference, p.adapter_dir, self.log)
        self.dtype = self.model.tok_embeddings.weight.dtype  # a quantized checkpoint keeps its own
        args = self.model_args
        self.log(
            f"model from {inference.checkpoint_dir}: {num_params(self.model):,} parameters "
            f"({args.n_layers} layers, dim {args.dim}) on {self.device} in {self.dtype}; "
            f"context {args.max_seq_len} tokens"
        )

    def _describe_format(self) -> str:
        if self.params.chat:
            return f"{self.tokenizer.family} chat format" + (
                " with a system prompt" if self.params.system_prompt else ""
            )
        return f"template {self.template.name}" if self.template else "none (raw text)"

    def _read_prompts(self) -> list[Prompt]:
        p = self.params
        if p.prompt is not None:
            return [Prompt(p.prompt, "", "")]
        path = resolve_path(p.prompt_file)  # type: ignore[arg-type]
        if not path.is_file():
            raise UserError(f"prompt_file {path} does not exist; check the path")
        if path.suffix.lower() in RECORD_SUFFIXES:
            # Records, read as training reads its data files: instruction (+ input, output).
            records = read_file(path)
            prompts = [_record_prompt(record, records.where(i)) for i, record in enumerate(records)]
        else:
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except UnicodeDecodeError:
                raise UserError(f"prompt_file {path} is not UTF-8 text; save it as UTF-8") from None
            prompts = [_line_prompt(line, f"line {n} of {path}") for n, line in enumerate(lines, 1) if line.strip()]
        if not prompts:
            raise UserError(f"prompt_file {path} holds no prompts; write one prompt per line")
        return prompts

    def _tokenize(self, prompt: Prompt) -> list[int]:
        text = f"{prompt.instruction}\n\n{prompt.input}" if prompt.input else prompt.instruction
        if self.params.chat:
            messages = [Message("system", self.params.system_prompt)] if self.params.system_prompt else []
            # An empty, open assistant turn ends the prompt where the answer begins.
            messages += [Message("user", text), Message("assistant", "")]
            return self.tokenizer.tokenize_messages(messages, add_eos=False)[0]
        if self.template is not None:
            text = self.template.format(prompt.instruction, prompt.input)
        return self.tokenizer.encode(text, add_bos=True, add_eos=False)

    def _check_length(self, prompt: Prompt) -> None:
        n, budget, context = len(prompt.tokens or []), self.params.max_new_tokens, self.model_args.max_seq_len
        if n + budget > context:
            which = f"the prompt at {prompt.where}" if prompt.where else "the prompt"
            raise UserError(
                f"{which} has {n} tokens and max_new_tokens={budget}: {n + budget} in all, more than the model's "
                f"context of {context} tokens; shorten the prompt or lower max_new_tokens"
            )

    def _check_output_file(self, path: Path) -> Path:
        """Results go only to a .jsonl that is not the prompt file, so no input is written over."""
        if path.suffix != ".jsonl":
            raise UserError(f"output_file {path} must end in .jsonl (one JSON result per line); choose such a path")
        if self.params.prompt_file is not None and path.resolve() == resolve_path(self.params.prompt_file).resolve():
            raise UserError(f"output_file {path} is the prompt_file; write the results to another path")
        return path

    @staticmethod
    def _partial(path: Path) -> Path:
        # Results gather here and replace `path` only once every prompt is done: an earlier
        # results file survives a failed or interrupted run.
        return path.with_name(path.name + ".partial")

    def _open_output(self, path: Path) -> TextIO:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return path.open("w", encoding="utf-8")
        except OSError as exc:
            raise UserError(f"cannot write output_file {path}: {exc.strerror}; choose another path") from None

    # ------------------------------------------------------------------------------------------
    # Generation
    # ------------------------------------------------------------------------------------------

    def generate(self) -> list[dict[str, Any]]:
        """Generate for every prompt, `batch_size` at a time; returns one result per prompt."""
        p = self.params
        results: list[dict[str, Any]] = []
        started = time.perf_counter()
        for start in range(0, len(self.prompts), p.batch_size):
            # Seeds differ per batch, so a file's batches do not all draw the same random numbers.
            seed = None if p.seed is None else p.seed + start
            results += self._generate_batch(self.prompts[start : start + p.batch_size], start, seed)
        if self.output is not None:
            self.output.close()
            self.output = None
            os.replace(self._partial(self.output_path), self.output_path)
            self.log(f"results written to {self.output_path}")
        if len(self.prompts) > 1:
            total = sum(r["generated_tokens"] for r in results)
            elapsed = time.perf_counter() - started
            self.log(f"{len(results)} prompts: {total} tokens in {elapsed:.2f} s ({total / elapsed:.1f} tokens/s)")
        return results

    def _generate_batch(self, batch: Sequence[Prompt], first: int, seed: Optional[int]) -> list[dict[str, Any]]:
        p = self.params
        streams = [TextStream(self.tokenizer.decode, p.stop_strings) for _ in batch]
        # A lone prompt streams its text as it comes; a batch prints whole responses at the end.
        live = len(batch) == 1
        if live:
            self._print_prompt(batch[0], first)
        first_token_at: Optional[float] = None

        def on_token(row: int, token: int) -> bool:
            nonlocal first_token_at
            if first_token_at is None:
                first_token_at = time.perf_counter()
            text = streams[row].push(token)
            if live and text:
                print(text, end="", flush=True)
            return streams[row].stopped

        started = time.perf_counter()
        outputs = generate(
            self.model,
            [prompt.tokens or [] for prompt in batch],
            max_new_tokens=p.max_new_tokens,
            stop_tokens=self.tokenizer.stop_tokens,
            temperature=p.temperature,
            top_k=p.top_k,
            top_p=p.top_p,
            seed=seed,
            pad_id=self.tokenizer.pad_id,
            on_token=on_token,
        )
        elapsed = time.perf_counter() - started
        if live:
            print(streams[0].flush(), flush=True)
        results = []
        for row, (prompt, tokens, stream) in enumerate(zip(batch, outputs, streams)):
            stream.flush()
            if not live:
                self._print_prompt(prompt, first + row)
                print(stream.text, flush=True)
            results.append(self._result(prompt, tokens, stream))
        generated = sum(len(t) for t in outputs)
        ttft = (first_token_at or started) - started
        which = f"prompt {first + 1}" if live else f"prompts {first + 1}-{first + len(batch)}"
        self.log(
            f"{which}: {generated} tokens in {elapsed:.2f} s ({generated / elapsed:.1f} tokens/s), "
            f"time to first token {ttft:.3f} s"
        )
        if self.output is not None:
            for result in results:
                self.output.write(json.dumps(result, ensure_ascii=False) + "\n")
            self.output.flush()
        return results

    def _print_prompt(self, prompt: Prompt, index: int) -> None:
        shown = self.tokenizer.decode(prompt.tokens or [], skip_special_tokens=False)
        print(f"=== prompt {index + 1} of {len(self.prompts)} ===\n{shown}\n=== response ===", flush=True)

    def _result(self, prompt: Prompt, tokens: list[int], stream: TextStream) -> dict[str, Any]:
        if tokens and tokens[-1] in self.tokenizer.stop_tokens:
            reason = "stop_token"
        elif stream.stopped:
            reason = "stop_string"
        else:
            reason = "max_new_tokens"
        result: dict[str, Any] = {
            "instruction": prompt.instruction,
            "input": prompt.input,
            "response": stream.text,
            "stop_reason": reason,
            "prompt_tokens": len(prompt.tokens or []),
            "generated_tokens": len(tokens),
        }
        if prompt.reference is not None:
            result["reference"] = prompt.reference
        return result

    # ------------------------------------------------------------------------------------------
    # The end
    # ------------------------------------------------------------------------------------------

    def cleanup(self) -> None:
        if self.output is not None:
            self.output.close()
            self.output = None

    def log(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)


def _line_prompt(line: str, where: str) -> Prompt:
    return Prompt(line.strip(), "", where)


def _record_prompt(record: dict, where: str) -> Prompt:
    if not isinstance(record.get("instruction"), str):
        raise UserError(
            f"{where} has no 'instruction' text; each record needs instruction (and optionally input), "
            'e.g. {"instruction": "Add the numbers.", "input": "2 and 3"}'
        )
    input_text = record.get("input") or ""
    if not isinstance(input_text, str):
        raise UserError(f"'input' at {where} is {type(input_text).__name__}, not text; make it a string")
    reference = record.get("output")
    return Prompt(record["instruction"], input_text, where, reference if isinstance(reference, str) else None)


def _run(params: GenerateParams) -> int:
    recipe = GenerateRecipe(params)
    return run_once(recipe, recipe.generate)


main = recipe_main(PARAMS_CLASS, "tune generate", _run)

if __name__ == "__main__":
    sys.exit(main())
