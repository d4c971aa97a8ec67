"""Full fine-tuning of a Llama-family model, on one CPU or GPU or with FSDP2 across processes
and nodes (`tune --nproc_per_node N finetune_llm ...`).

Read it top to bottom: `setup` starts the run, loads the architecture, tokenizer and data, then
the weights (its own checkpoint's when resuming), and hands the whole model to the training
loop, every parameter trainable; at each checkpoint the loop asks this recipe for the weights,
which it writes in Hugging Face format. `train` and `cleanup` are the loop's and the run's.
One class, no base class.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import torch

from finetune.checkpointing import save_hf_checkpoint
from finetune.models import TransformerDecoder, num_params
from finetune.params import FullFinetuneParams
from finetune.recipes import recipe_main, run_recipe
from finetune.training.data_setup import build_training_data
from finetune.training.fsdp import full_model_state_dict
from finetune.training.loop import TrainingLoop
from finetune.training.run import ModelSource, RunContext, close_run, load_model_source, start_run

PARAMS_CLASS = FullFinetuneParams
ALIASES = ("finetune_llm", "full_finetune_single_device", "full_finetune_distributed")  # other names `tune` runs it by


class FullFinetuneRecipe:
    """Update every weight of the model on instruction, chat or text data."""

    def __init__(self, params: FullFinetuneParams) -> None:
        self.params = params
        self.run: Optional[RunContext] = None
        self.loop: Optional[TrainingLoop] = None

    def setup(self) -> None:
        p = self.params
        self.run = start_run(p)
        resume_dir = self.run.resume.checkpoint if self.run.resume is not None else None
        self.source: ModelSource = load_model_source(p)
        self.tokenizer = self.source.tokenizer
        data = build_training_data(p, self.tokenizer, self.run.dist, self.run.log)
        # Weights last: a bad tokenizer or dataset is reported before minutes of loading.
        self.model = self._setup_model(resume_dir)
        self.loop = TrainingLoop(
            self.run,
            self.model,
            list(self.model.parameters()),
            data,
            pad_id=self.tokenizer.pad_id,
            gather_weights=lambda: full_model_state_dict(self.model),
            write_weights=self._write_weights,
            resume_dir=resume_dir,
        )
        self.run.log(f"model {p.model}: {num_params(self.model):,} parameters {self.loop.describe()}")

    def _setup_model(self, resume_dir: Optional[Path]) -> TransformerDecoder:
        assert self.run is not None
        if resume_dir is not None:  # a resumed run continues from its own weights, not the original ones
            state_dict = self.run.load_weights(self.source.args, resume_dir, "hf")
        else:
            state_dict = self.run.load_weights(
                self.source.args, self.source.checkpoint_dir, self.params.checkpoint_format
            )
        return self.run.prepare_model(self.source.args, state_dict)

    def _write_weights(self, state_dict: dict[str, torch.Tensor], folder: Path) -> None:
        save_hf_checkpoint(state_dict, self.source.args, folder, **self.source.output_extras())

    def train(self) -> None:
        assert self.loop is not None
        self.loop.train()

    def save_checkpoint(self) -> None:
        """Write `output_dir/step_<N>/` atomically: HF model, params.yaml, recipe state."""
        assert self.loop is not None
        self.loop.save_checkpoint()

    def cleanup(self) -> None:
        close_run(self.run)


main = recipe_main(PARAMS_CLASS, "tune full_finetune", lambda params: run_recipe(FullFinetuneRecipe(params)))

if __name__ == "__main__":
    sys.exit(main())
