"""The dummy recipe: the whole pipeline of a training run with no model, tokenizer or data.

`tune dummy` (no config needed) starts a run exactly as the fine-tuning recipes do (`start_run`:
process group, the output_dir lock, status.json through the JobMonitor), runs fake optimizer
steps whose "loss" is a known function of the step, all-reduces it across ranks (so a
multi-process run proves the process group works), and writes what a real run writes:
`params.yaml`, `metrics.jsonl`, and checkpoint-shaped `step_<N>/` folders, written atomically.
It ends as a real run does: status `done`, or `stopped` / `preempted` after Ctrl-C / SIGTERM at
a step boundary with a checkpoint saved. A scheduler or pipeline can be tried against it anywhere.

A fine-tuning config also runs under it (`tune dummy --config tiny_full`): DummyParams drops the
keys it has no use for, so the dummy tries that job's output_dir, epochs and logging.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from finetune.checkpointing.atomic import atomic_directory
from finetune.checkpointing.recipe_state import choose_checkpoint
from finetune.errors import UserError
from finetune.params import DummyParams
from finetune.recipes import recipe_main, run_recipe
from finetune.training.distributed import all_reduce_sum
from finetune.training.guards import StopAtStepBoundary, stop_exception
from finetune.training.run import RunContext, close_run, start_run

PARAMS_CLASS = DummyParams


def fake_loss(step: int) -> float:
    """The loss every rank agrees on at `step`: exp(-0.1 * step)."""
    return math.exp(-0.1 * step)


class DummyRecipe:
    """Fake training steps with real metrics, status and a checkpoint-shaped output."""

    def __init__(self, params: DummyParams) -> None:
        self.params = params
        self.run: Optional[RunContext] = None
        self.step = 0

    def setup(self) -> None:
        p = self.params
        if p.resume_from_checkpoint:  # before the run starts: resuming a finished run writes nothing
            self.step = _step_of(choose_checkpoint(Path(p.output_dir), p.resume_from_checkpoint))
            if self.step >= p.steps_per_epoch * p.epochs:
                raise UserError(
                    f"the run in {p.output_dir} is finished at step {self.step} ({p.epochs} epoch(s) of "
                    f"{p.steps_per_epoch} steps), so there is nothing to resume and nothing was changed; raise "
                    "epochs to run further, or start a new run in another output_dir"
                )
        self.run = start_run(p)  # type: ignore[arg-type]
        dist = self.run.dist
        print(f"dummy: rank {dist.rank} of {dist.world_size}", flush=True)
        if self.run.rank_zero:
            self.params.to_yaml(self.run.output_dir / "params.yaml")

    def train(self) -> None:
        run = self._run()
        p = self.params
        total = p.steps_per_epoch * p.epochs
        run.monitor.set_state("running")
        with StopAtStepBoundary(run.device, log=run.log) as stop:
            while self.step < total:
                self.step += 1
                loss = self._fake_step(self.step)
                epoch = (self.step - 1) // p.steps_per_epoch
                run.monitor.update(step=self.step, epoch=epoch, loss=loss)
                run.events.add_loss(loss)
                if self.step % p.log_every_n_steps == 0:
                    self._log_metrics(loss, epoch)
                    run.events.step(step=self.step, epoch=epoch, loss=loss, lr=p.lr)
                if self.step % p.steps_per_epoch == 0:
                    run.events.epoch(epoch, steps=p.steps_per_epoch)
                signum = stop.agreed()
                if signum is not None:
                    self.save_checkpoint()
                    raise stop_exception(signum)
                if p.save_every_n_steps and self.step % p.save_every_n_steps == 0 and self.step < total:
                    self.save_checkpoint()
        self.save_checkpoint()
        run.monitor.finish()

    def _fake_step(self, step: int) -> float:
        run = self._run()
        time.sleep(self.params.step_time_s)
        # Each rank contributes its own share; the normalised sum is the same on every rank.
        world = run.dist.world_size
        share = torch.tensor([fake_loss(step) * (run.dist.rank + 1)], device=run.device)
        return all_reduce_sum(share).item() / (world * (world + 1) / 2)

    def _log_metrics(self, loss: float, epoch: int) -> None:
        run = self._run()
        if not run.rank_zero:
            return
        record = {
            "step": self.step,
            "epoch": epoch,
            "loss": loss,
            "lr": self.params.lr,
            "batch_size": self.params.batch_size,
            "ranks": run.dist.world_size,
            "time": time.time(),
        }
        with (run.output_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")

    def save_checkpoint(self) -> None:
        run = self._run()
        if not run.rank_zero:
            return
        run.monitor.set_state("checkpointing")
        step_dir = run.output_dir / f"step_{self.step}"
        with atomic_directory(step_dir) as tmp:
            save_file({"weight": torch.zeros(2, 2)}, str(tmp / "model.safetensors"))
            self.params.to_yaml(tmp / "params.yaml")
        run.monitor.checkpoint_saved(step_dir)
        run.events.checkpoint(self.step, step_dir)
        print(f"dummy: wrote {step_dir}", flush=True)

    def cleanup(self) -> None:
        close_run(self.run)

    def _run(self) -> RunContext:
        if self.run is None:
            raise RuntimeError("DummyRecipe.setup() must run first")
        return self.run


def _step_of(checkpoint: Optional[Path]) -> int:
    return int(checkpoint.name.split("_", 1)[1]) if checkpoint is not None else 0


def _run(params: DummyParams) -> int:
    return run_recipe(DummyRecipe(params))


main = recipe_main(PARAMS_CLASS, "tune dummy", _run)

if __name__ == "__main__":
    sys.exit(main())
