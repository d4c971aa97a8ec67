"""Score a Llama-family model on EleutherAI lm-evaluation-harness tasks.

Read it top to bottom: `HarnessModel` is our decoder and tokenizer behind the harness's model
interface (`loglikelihood`, `loglikelihood_rolling`, `generate_until`, each batched); the
recipe checks the task names, loads the checkpoint (plain, quantized, or with a LoRA adapter),
runs `lm_eval.simple_evaluate`, prints the harness's table and writes the results as JSON.
lm-eval is optional (`pip install "finetune[eval]"`); without it this recipe says so.
"""

from __future__ import annotations

import difflib
import importlib
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from finetune.checkpointing import load_model
from finetune.checkpointing.atomic import atomic_write_text
from finetune.checkpointing.peft import apply_lora_settings, describe_adapted, load_peft_adapter
from finetune.checkpointing.model_configs import resolve_model_args
from finetune.tokenizers.loader import load_tokenizer_for_model
from finetune.config import TuneArgumentParser, recipe_entry_point
from finetune.errors import UserError
from finetune.models import TransformerDecoder, num_params
from finetune.models.generation import TextStream, generate
from finetune.models.lora import apply_lora, load_adapter_state_dict
from finetune.params import EvalParams, resolve_path
from finetune.quantization import is_quantized_checkpoint, load_quantized_model
from finetune.tokenizers import Tokenizer
from finetune.training.distributed import resolve_device
from finetune.training.precision import resolve_dtype

try:  # optional: only this recipe needs it, and it says how to install it when missing
    from lm_eval.api.model import LM as _HarnessLM
except ImportError:
    _HarnessLM = object  # type: ignore[assignment,misc]

PARAMS_CLASS = EvalParams
INSTALL_HINT = 'pip install "finetune[eval]"'
DEFAULT_MAX_SEQ_LEN = 4096  # rolling perplexity over a 128k context would not fit in memory
_LOGIT_CHUNK = 1024  # positions projected to the vocabulary at once


def import_lm_eval() -> ModuleType:
    try:
        return importlib.import_module("lm_eval")
    except ImportError:
        raise UserError(
            f"tune eleuther_eval needs EleutherAI's lm-eval, which is not installed; install it with {INSTALL_HINT}"
        ) from None


class HarnessModel(_HarnessLM):
    """A `TransformerDecoder` and its tokenizer as an lm-eval model.

    Every context starts with BOS, as in training. Scoring runs `batch_size` requests per
    forward, longest first so that padding stays small; right padding cannot reach real
    tokens under the causal mask. Generation is greedy unless a task asks for sampling.
    """

    def __init__(
        self,
        model: TransformerDecoder,
        tokenizer: Tokenizer,
        *,
        batch_size: int = 8,
        max_seq_len: Optional[int] = None,
        max_gen_toks: int = 256,
        seed: int = 1234,
    ) -> None:
        super().__init__()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_seq_len = min(max_seq_len or DEFAULT_MAX_SEQ_LEN, model.args.max_seq_len)
        self.max_gen_toks = max_gen_toks
        self.seed = seed

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    # ----- tokenization -----

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_bos=False, add_eos=False)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context ids (BOS first) and continuation ids, split where the joined text's ids split,
        so the continuation is tokenized as it would be in running text."""
        if not context:
            return [self.tokenizer.bos_id], self._encode(continuation)
        # A context's trailing spaces belong to the continuation's first word.
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self._encode(context + continuation)
        context_ids = self._encode(context)
        return [self.tokenizer.bos_id] + context_ids, whole[len(context_ids):]

    # ----- the harness's interface -----

    def loglikelihood(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self.encode_pair(*request.args) for request in requests]
        results = self.score(pairs, disable_tqdm=disable_tqdm)
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def loglikelihood_rolling(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows: list[tuple[list[int], list[int]]] = []
        owners: list[int] = []
        for index, request in enumerate(requests):
            tokens = self._encode(request.args[0])
            # Each token is predicted once; windows after the first keep the most context that fits.
            for window in get_rolling_token_windows(tokens, self.tokenizer.bos_id, self.max_seq_len, context_len=1):
                windows.append(make_disjoint_window(window))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self.score(windows, disable_tqdm=disable_tqdm)):
            totals[owner] += logprob
        return totals

    def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
        results: list[Optional[str]] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(index)
        progress = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm)
        for indices in groups.values():
            kwargs = dict(requests[indices[0]].args[1])
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            sampled = bool(kwargs.get("do_sample", False))
            temperature = float(kwargs.get("temperature", 1.0)) if sampled else 0.0
            budget = self.max_seq_len - max_new
            if budget < 1:
                raise UserError(
                    f"a task asks for {max_new} new tokens but max_seq_len is {self.max_seq_len}; raise max_seq_len"
                )
            indices = sorted(indices, key=lambda i: -len(requests[i].args[0]))
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                prompts = [([self.tokenizer.bos_id] + self._encode(requests[i].args[0]))[-budget:] for i in batch]
                texts = self._generate(prompts, max_new, until, temperature)
                for i, text in zip(batch, texts):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                progress.update(len(batch))
        progress.close()
        return [r if r is not None else "" for r in results]

    # ----- computation -----

    @torch.inference_mode()
    def score(self, pairs: Sequence[tuple[list[int], list[int]]], disable_tqdm: bool = True) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding gives the continuation)
        for each (context ids, continuation ids) pair. Contexts too long for max_seq_len lose
        their oldest tokens."""
        # An empty continuation is certain: log 1 = 0, and greedy decoding trivially "produces" it.
        results: list[Optional[tuple[float, bool]]] = [None if pair[1] else (0.0, True) for pair in pairs]
        order = sorted((i for i, pair in enumerate(pairs) if pair[1]), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        for start in tqdm(range(0, len(order), self.batch_size), desc="loglikelihood", disable=disable_tqdm):
            batch = order[start : start + self.batch_size]
            rows = []
            for i in batch:
                context, continuation = pairs[i]
                if len(continuation) > self.max_seq_len:
                    raise UserError(
                        f"a continuation has {len(continuation)} tokens, more than max_seq_len={self.max_seq_len}; "
                        "raise max_seq_len"
                    )
                rows.append((context + continuation)[-(self.max_seq_len + 1):][:-1])
            tokens = torch.full((len(rows), max(map(len, rows))), self.tokenizer.pad_id, dtype=torch.long)
            for r, row in enumerate(rows):
                tokens[r, : len(row)] = torch.tensor(row)
            hidden = self.model(tokens.to(self.device), return_hidden=True)
            for r, i in enumerate(batch):
                continuation = pairs[i][1]
                end = len(rows[r])
                target = torch.tensor(continuation, device=self.device)
                logprob, greedy = 0.0, True
                # Only the positions that predict the continuation are projected to the vocabulary.
                for h, y in zip(hidden[r, end - len(continuation) : end].split(_LOGIT_CHUNK), target.split(_LOGIT_CHUNK)):
                    logprobs = F.log_softmax(self.model.output(h).float(), dim=-1)
                    logprob += logprobs.gather(-1, y[:, None]).sum().item()
                    greedy = greedy and bool((logprobs.argmax(-1) == y).all())
                results[i] = (logprob, greedy)
        return results  # type: ignore[return-value]

    def _generate(self, prompts: list[list[int]], max_new: int, until: list[str], temperature: float) -> list[str]:
        streams = [TextStream(self.tokenizer.decode, until) for _ in prompts]

        def on_token(row: int, token: int) -> bool:
            streams[row].push(token)
            return streams[row].stopped  # a stop string ends the row early

        generate(
            self.model, prompts, max_new_tokens=max_new, stop_tokens=self.tokenizer.stop_tokens,
            temperature=temperature, seed=self.seed, pad_id=self.tokenizer.pad_id, on_token=on_token,
        )
        return [stream.text for stream in streams]


class EleutherEvalRecipe:
    """Check the tasks, load the model, run the harness, report."""

    def __init__(self, params: EvalParams) -> None:
        self.params = params

    # ------------------------------------------------------------------------------------------
    # Setup
    # ------------------------------------------------------------------------------------------

    def setup(self) -> None:
        p = self.params
        p.check()  # a notebook may have changed a field since the params were built
        self.lm_eval = import_lm_eval()
        # Task names and the results path are checked before gigabytes of weights are read.
        self.task_manager = self._task_manager()
        self.results_path = results_file(p.output_path) if p.output_path is not None else None
        self.device = resolve_device(p.device)
        self.dtype = resolve_dtype(p.dtype if p.dtype != "auto" else ("bf16" if self.device.type == "cuda" else "fp32"), self.device)
        checkpoint_dir = resolve_path(p.checkpoint_dir)  # type: ignore[arg-type]
        self.model_args = resolve_model_args(p.model, checkpoint_dir, p.checkpoint_format)
        self.tokenizer = load_tokenizer_for_model(
            resolve_path(p.tokenizer_path) if p.tokenizer_path else checkpoint_dir,
            self.model_args.family, self.model_args.vocab_size,
        )
        self.model = self._load_model(checkpoint_dir)
        self.harness_model = HarnessModel(
            self.model, self.tokenizer, batch_size=p.batch_size, max_seq_len=p.max_seq_len, max_gen_toks=p.max_gen_toks
        )
        self.log(
            f"model from {checkpoint_dir}: {num_params(self.model):,} parameters on {self.device} in "
            f"{self.model.tok_embeddings.weight.dtype}; scoring with context {self.harness_model.max_seq_len}"
        )

    def _task_manager(self) -> Any:
        p = self.params
        tasks_module = importlib.import_module("lm_eval.tasks")
        include = None
        if p.include_path is not None:
            include = str(resolve_path(p.include_path))
            if not Path(include).is_dir():
                raise UserError(f"include_path {include} is not a directory; point it at the folder holding your task YAMLs")
            # Indexing the harness's own ~15k task files takes many seconds: skip it when
            # the user's folder has every task asked for.
            custom = tasks_module.TaskManager(include_path=include, include_defaults=False)
            if all(task in custom.all_tasks for task in p.tasks):
                return custom
        manager = tasks_module.TaskManager(include_path=include)
        for task in p.tasks:
            if task not in manager.all_tasks:
                close = difflib.get_close_matches(task, manager.all_tasks, n=3)
                hint = f"did you mean {', '.join(close)}? " if close else ""
                where = " or in include_path" if include else " (add your own with include_path)"
                raise UserError(
                    f"task '{task}' is not an lm-eval task{where}; {hint}list them with `lm-eval list tasks`"
                )
        return manager

    def _load_model(self, checkpoint_dir: Path) -> TransformerDecoder:
        p = self.params
        # The adapter is checked against the architecture before any base weight is read.
        adapter = (
            load_peft_adapter(resolve_path(p.adapter_dir), self.model_args, base_dir=checkpoint_dir)
            if p.adapter_dir else None
        )
        if is_quantized_checkpoint(checkpoint_dir):
            model, record = load_quantized_model(checkpoint_dir, device=self.device, args=self.model_args)
            self.log(f"quantized checkpoint: {record['scheme']}, computing in {record['dtype']}")
        else:
            model, _ = load_model(
                checkpoint_dir, self.model_args, checkpoint_format=p.checkpoint_format, device=self.device, dtype=self.dtype
            )
        if adapter is not None:
            weights, config = adapter
            dtype = model.tok_embeddings.weight.dtype
            settings = apply_lora_settings(config, weights)  # from the tensors: target_modules may be a pattern
            apply_lora(model, **settings)
            load_adapter_state_dict(model, {k: v.to(self.device, dtype) for k, v in weights.items()}, strict=False)
            self.log(f"adapter {p.adapter_dir}: LoRA rank {config['r']} on {describe_adapted(settings)}")
        return model.eval()

    # ------------------------------------------------------------------------------------------
    # Evaluation
    # ------------------------------------------------------------------------------------------

    def evaluate(self) -> dict[str, Any]:
        p = self.params
        limit: Optional[float] = p.limit
        if limit is not None and limit >= 1:
            limit = int(limit)  # the harness reads a float below 1 as a fraction of each task
        results = self.lm_eval.simple_evaluate(
            model=self.harness_model, tasks=list(p.tasks), num_fewshot=p.num_fewshot, limit=limit,
            task_manager=self.task_manager, log_samples=False,
        )
        utils = importlib.import_module("lm_eval.utils")
        print(utils.make_table(results), flush=True)
        if results.get("groups"):
            print(utils.make_table(results, "groups"), flush=True)
        if self.results_path is not None:
            self._write(self.results_path, results, utils.handle_non_serializable)
        return results

    def _write(self, path: Path, results: dict[str, Any], default: Any) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(results, indent=2, default=default) + "\n")  # whole or not at all
        except OSError as exc:
            raise UserError(f"cannot write output_path {path}: {exc.strerror}; choose another path") from None
        self.log(f"results written to {path}")

    # ------------------------------------------------------------------------------------------
    # The end
    # ------------------------------------------------------------------------------------------

    def cleanup(self) -> None:
        pass

    def log(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)


def results_file(output_path: str) -> Path:
    """Where output_path puts the results: a folder (one that exists, or a path ending in /, as
    lm-eval's --output_path takes) gets results.json; a file must be .json, so that no other
    file (a checkpoint's weights, say) is written over."""
    path = Path(output_path).expanduser()
    if path.is_dir() or output_path.endswith(("/", "\\")):
        return path / "results.json"
    if path.suffix != ".json":
        raise UserError(f"output_path {output_path} must be a .json file or a folder (end it with /); choose such a path")
    return path


def _main(argv: Sequence[str]) -> int:
    params = TuneArgumentParser(PARAMS_CLASS, prog="tune eleuther_eval").parse_args(argv)
    recipe = EleutherEvalRecipe(params)
    try:
        recipe.setup()
        recipe.evaluate()
    finally:
        recipe.cleanup()
    return 0


main = recipe_entry_point(_main)

if __name__ == "__main__":
    sys.exit(main())
