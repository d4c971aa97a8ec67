"""The dummy recipe: exercises the launcher, params, distributed setup and outputs without a model.

It runs fake optimizer steps whose "loss" is a known function of the step, all-reduces it
across ranks (so a multi-process run proves the process group works), and writes what a real
run writes: `metrics.jsonl`, `params.yaml` and a checkpoint-shaped `step_<N>/` directory.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from finetune.params import FullFinetuneParams
from finetune.recipes import recipe_main, run_once

PARAMS_CLASS = FullFinetuneParams


class DummyRecipe:
    """Fake training steps with real metrics and a checkpoint-shaped output."""

    def __init__(self, params: FullFinetuneParams) -> None:
        self.params = params
        self.rank = 0
        self.world_size = 1
        self.output_dir = Path(params.output_dir)

    def setup(self) -> None:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            dist.init_process_group("gloo")
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        print(f"dummy: rank {self.rank} of {self.world_size}", flush=True)
        if self.rank == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self.params.to_yaml(self.output_dir / "params.yaml")
        self.steps = (self.params.max_steps_per_epoch or 5) * self.params.epochs

    def train(self) -> None:
        metrics_path = self.output_dir / "metrics.jsonl"
        for step in range(1, self.steps + 1):
            # Each rank contributes its own share; the sum is the same on every rank.
            share = torch.tensor([math.exp(-0.1 * step) * (self.rank + 1)])
            if self.world_size > 1:
                dist.all_reduce(share)
            loss = share.item() / (self.world_size * (self.world_size + 1) / 2)
            if self.rank == 0 and step % self.params.log_every_n_steps == 0:
                record = {
                    "step": step,
                    "loss": loss,
                    "lr": self.params.lr,
                    "ranks": self.world_size,
                    "time": time.time(),
                }
                with metrics_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
        self.save_checkpoint()

    def save_checkpoint(self) -> None:
        if self.rank != 0:
            return
        step_dir = self.output_dir / f"step_{self.steps}"
        step_dir.mkdir(parents=True, exist_ok=True)
        save_file({"weight": torch.zeros(2, 2)}, str(step_dir / "model.safetensors"))
        self.params.to_yaml(step_dir / "params.yaml")
        print(f"dummy: wrote {step_dir}", flush=True)

    def cleanup(self) -> None:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def _run(params: FullFinetuneParams) -> int:
    recipe = DummyRecipe(params)
    return run_once(recipe, recipe.train)


main = recipe_main(PARAMS_CLASS, "tune dummy", _run)

if __name__ == "__main__":
    sys.exit(main())
