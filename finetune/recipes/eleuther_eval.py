"""Score a Llama-family model on EleutherAI lm-evaluation-harness tasks.

Read it top to bottom: the recipe checks the task names, loads the checkpoint (plain,
quantized, or with a LoRA adapter) through `finetune.inference`, puts it behind the harness's
model interface (`finetune.evaluation.harness.HarnessModel`), runs `lm_eval.simple_evaluate`,
prints the harness's table and writes the results as JSON. lm-eval is optional
(`pip install "finetune[eval]"`); without it this recipe says so.
"""

from __future__ import annotations

import difflib
import importlib
import json
import logging
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Optional

from finetune.checkpointing.atomic import atomic_write_text
from finetune.errors import UserError
from finetune.evaluation.harness import HarnessModel
from finetune.inference import load_inference_model, prepare_inference
from finetune.models import num_params
from finetune.params import EvalParams, resolve_path
from finetune.recipes import recipe_main, run_once

PARAMS_CLASS = EvalParams
INSTALL_HINT = 'pip install "finetune[eval]"'


def import_lm_eval() -> ModuleType:
    try:
        # Late: lm-eval is optional, and its absence is one error line with the install command.
        return importlib.import_module("lm_eval")
    except ImportError:
        raise UserError(
            f"tune eleuther_eval needs EleutherAI's lm-eval, which is not installed; install it with {INSTALL_HINT}"
        ) from None


def _without_metadata_flag_hint(record: logging.LogRecord) -> bool:
    """Drop lm-eval's hint, for a task with its own dataset function, to pass `--metadata` on its
    command line: `tune eleuther_eval` has no such flag (the task YAML's `metadata:` is read)."""
    return "`--metadata`" not in record.getMessage()


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
        logging.getLogger("lm_eval.api.task").addFilter(_without_metadata_flag_hint)
        # Task names and the results path are checked before gigabytes of weights are read.
        self.task_manager = self._task_manager()
        self.results_path = results_file(p.output_path) if p.output_path is not None else None
        inference = prepare_inference(p)
        self.device, self.dtype = inference.device, inference.dtype
        self.model_args, self.tokenizer = inference.model_args, inference.tokenizer
        if inference.quantization is not None:
            record = inference.quantization
            self.log(f"quantized checkpoint: {record['scheme']}, computing in {record['dtype']}")
        self.model = load_inference_model(inference, p.adapter_dir, self.log)
        self.harness_model = HarnessModel(
            self.model, self.tokenizer, batch_size=p.batch_size, max_seq_len=p.max_seq_len, max_gen_toks=p.max_gen_toks
        )
        self.log(
            f"model from {inference.checkpoint_dir}: {num_params(self.model):,} parameters on {self.device} in "
            f"{self.model.tok_embeddings.weight.dtype}; scoring with context {self.harness_model.max_seq_len}"
        )

    def _task_manager(self) -> Any:
        p = self.params
        tasks_module = importlib.import_module("lm_eval.tasks")  # late: lm-eval is optional
        include = None
        if p.include_path is not None:
            include = str(resolve_path(p.include_path))
            if not Path(include).is_dir():
                raise UserError(
                    f"include_path {include} is not a directory; point it at the folder holding your task YAMLs"
                )
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

    # ------------------------------------------------------------------------------------------
    # Evaluation
    # ------------------------------------------------------------------------------------------

    def evaluate(self) -> dict[str, Any]:
        p = self.params
        limit: Optional[float] = p.limit
        if limit is not None and limit >= 1:
            limit = int(limit)  # the harness reads a float below 1 as a fraction of each task
        results = self.lm_eval.simple_evaluate(
            model=self.harness_model,
            tasks=list(p.tasks),
            num_fewshot=p.num_fewshot,
            limit=limit,
            task_manager=self.task_manager,
            log_samples=False,
        )
        utils = importlib.import_module("lm_eval.utils")  # late: lm-eval is optional
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
        raise UserError(
            f"output_path {output_path} must be a .json file or a folder (end it with /); choose such a path"
        )
    return path


def _run(params: EvalParams) -> int:
    recipe = EleutherEvalRecipe(params)
    return run_once(recipe, recipe.evaluate)


main = recipe_main(PARAMS_CLASS, "tune eleuther_eval", _run)

if __name__ == "__main__":
    sys.exit(main())
