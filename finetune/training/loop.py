"""The training loop both fine-tuning recipes own: epochs of optimizer steps with gradient
accumulation, evaluation, metrics, the job monitor, Ctrl-C and SIGTERM at a step boundary,
checkpoints and an exact resume.

A recipe hands it what is particular to it: the model, the parameters that train, and how the
model is gathered and written into a checkpoint folder. The loop writes everything else of a
checkpoint (params.yaml and the recipe state) and never builds a model itself.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence

import torch
from torch import nn
from tqdm import tqdm

from finetune.checkpointing.atomic import atomic_directory, prune_checkpoints
from finetune.checkpointing.recipe_state import (
    RECIPE_STATE_FILE,
    gather_rng_states,
    read_saved_params,
    restore_rng_state,
    rng_state_for_rank,
    save_recipe_state,
)
from finetune.errors import UserError
from finetune.training.data_setup import TrainingData
from finetune.training.distributed import barrier
from finetune.training.fsdp import full_optimizer_state_dict, load_full_optimizer_state_dict
from finetune.training.guards import (
    Preempted,
    StopAtStepBoundary,
    check_finite_loss,
    out_of_memory_error,
    stop_exception,
)
from finetune.training.lr_schedule import build_lr_scheduler
from finetune.training.memory import peak_memory_gb
from finetune.training.metrics import build_metric_loggers, drop_records_after
from finetune.training.optim import build_optimizer, clip_grad_norm
from finetune.training.profiler import build_profiler
from finetune.training.resume import ResumePoint, read_recipe_state, steer_optimizer
from finetune.training.run import RunContext
from finetune.training.steps import accumulate_gradients, count_non_pad_tokens, evaluate

Batch = dict[str, torch.Tensor]


class Objective(Protocol):
    """A training objective other than the supervised loss (a preference loss, say): it
    backpropagates a step's micro-batches and returns `loss` plus what else it measured, and
    evaluates held-out batches into `eval_*` metrics."""

    def accumulate_gradients(self, micro_batches: Sequence[Batch]) -> dict[str, float]: ...

    def evaluate(self, loader: torch.utils.data.DataLoader) -> dict[str, float]: ...


class TrainingLoop:
    """Trains `trainable_params` of `model` over `data` and saves `step_<N>/` checkpoints.

    `gather_weights` runs on every rank at a save (gathering is collective) and returns what
    `write_weights(gathered, folder)` then writes on rank 0 alone. Without an `objective` the
    loop trains and evaluates the supervised next-token loss.
    """

    def __init__(
        self,
        run: RunContext,
        model: nn.Module,
        trainable_params: list[nn.Parameter],
        data: TrainingData,
        *,
        pad_id: int,
        gather_weights: Callable[[], Any],
        write_weights: Callable[[Any, Path], None],
        resume_dir: Optional[Path] = None,
        objective: Optional[Objective] = None,
    ) -> None:
        p = run.params
        self.objective = objective
        self.run, self.params, self.model, self.trainable_params = run, p, model, trainable_params
        self.train_loader, self.sampler, self.eval_loader = data.train_loader, data.sampler, data.eval_loader
        self.steps_per_epoch = data.steps_per_epoch
        self.pad_id = pad_id
        self.gather_weights, self.write_weights = gather_weights, write_weights
        self.global_step = 0
        self.epoch = 0
        self.steps_done_in_epoch = 0
        self.last_saved_step: Optional[int] = None
        self.optimizer = build_optimizer(
            p.optimizer, trainable_params, lr=p.lr, weight_decay=p.weight_decay, device=run.device
        )
        self.lr_scheduler = build_lr_scheduler(
            p.lr_scheduler,
            self.optimizer,
            warmup_steps=p.warmup_steps,
            total_steps=self.steps_per_epoch * p.epochs,
            log=run.log,
        )
        resume = self._resume_point(resume_dir)
        if resume is not None:
            self._load_recipe_state(resume)
        run.writing_results = True
        if run.rank_zero:  # only now: a refused resume leaves the run's params.yaml and metrics as they were
            p.to_yaml(run.output_dir / "params.yaml")
            if resume is not None:  # the steps trained after the checkpoint are trained again
                drop_records_after(run.output_dir / "metrics.jsonl", resume.step)
        self.metric_loggers = build_metric_loggers(
            p.metric_logger_type,
            run.output_dir,
            rank=run.dist.rank,
            resume_step=None if resume is None else resume.step,
        )
        run.closers += [logger.close for logger in self.metric_loggers]

    def describe(self) -> str:
        """Where and how long the run trains, for the line a recipe prints after setup."""
        return (
            f"on {self.run.device} in {self.run.dtype}; {self.run.dist.world_size} process(es); "
            f"{self.steps_per_epoch} steps per epoch"
        )

    def _resume_point(self, resume_dir: Optional[Path]) -> Optional[ResumePoint]:
        """What `start_run` planned to resume from; read here for a recipe that found `resume_dir` itself."""
        if resume_dir is None:
            return None
        planned = self.run.resume
        if planned is not None and planned.checkpoint == resume_dir:
            return planned
        return ResumePoint(resume_dir, read_recipe_state(resume_dir), read_saved_params(resume_dir))

    def _load_recipe_state(self, resume: ResumePoint) -> None:
        state = resume.state
        saved_samples = state.get("dataset_len")
        if None not in (saved_samples, self.sampler.dataset_len) and saved_samples != self.sampler.dataset_len:
            raise UserError(
                f"the training data has {self.sampler.dataset_len} samples but {resume.checkpoint} was trained on "
                f"{saved_samples}: it changed since, so the saved position would point into another order; "
                "restore the data it was trained on, or start a new run in another output_dir"
            )
        load_full_optimizer_state_dict(self.model, self.optimizer, state["optimizer"] if self.run.rank_zero else {})
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        steer_optimizer(self.optimizer, self.lr_scheduler, self.params, resume.saved_params, self.run.log)
        self.global_step = state["global_step"]
        self.epoch = state["epoch"]
        self.steps_done_in_epoch = state["steps_done_in_epoch"]
        self.last_saved_step = self.global_step
        restore_rng_state(rng_state_for_rank(state["rng_states"], self.run.dist.rank))

    # ------------------------------------------------------------------------------------------
    # Training
    # ------------------------------------------------------------------------------------------

    def train(self) -> None:
        """Every remaining epoch; a checkpoint at each epoch end and on Ctrl-C or SIGTERM."""
        p, run = self.params, self.run
        run.monitor.set_state("running")
        if self.eval_loader is not None and self.global_step == 0:
            self._log_metrics(self._eval_metrics())
        progress = tqdm(
            total=self.steps_per_epoch * p.epochs,
            initial=self.global_step,
            disable=not run.rank_zero,
            desc="train",
            dynamic_ncols=True,
        )
        profiler = build_profiler(
            p.profile, run.output_dir, wait=p.profile_wait_steps, warmup=1, active=p.profile_active_steps
        )
        try:
            with profiler, StopAtStepBoundary(run.device, run.log) as stop:
                self._train_epochs(progress, profiler, stop)
        except torch.OutOfMemoryError as exc:
            raise out_of_memory_error(self.global_step, run.device) from exc
        finally:
            progress.close()
        evaluated_last_step = bool(p.eval_every_n_steps) and self.global_step % p.eval_every_n_steps == 0
        if self.eval_loader is not None and not evaluated_last_step:
            self._log_metrics(self._eval_metrics())
        run.monitor.finish()

    def _train_epochs(self, progress: tqdm, profiler: Any, stop: StopAtStepBoundary) -> None:
        """The remaining epochs; a stop request (Ctrl-C, SIGTERM) saves the step it stopped after.

        The save on a stop runs while `stop` still holds the signals: a second signal (torchrun
        passing on one that every process already got) only repeats the request.
        """
        try:
            while self.epoch < self.params.epochs:
                self._train_epoch(progress, profiler, stop)
                self.run.events.epoch(self.epoch, steps=self.steps_done_in_epoch)
                self.steps_done_in_epoch = 0
                self.epoch += 1
                if self.last_saved_step != self.global_step:
                    self.save_checkpoint()
        except (KeyboardInterrupt, Preempted) as exc:
            why = "preempted (SIGTERM)" if isinstance(exc, Preempted) else "interrupted"
            self.run.log(f"{why} at step {self.global_step}: saving a checkpoint before exiting")
            if self.last_saved_step != self.global_step:
                self.save_checkpoint()
            raise

    def _train_epoch(self, progress: tqdm, profiler: Any, stop: StopAtStepBoundary) -> None:
        p = self.params
        samples_per_step = p.batch_size * p.gradient_accumulation_steps
        self.sampler.set_epoch(self.epoch, start_index=self.steps_done_in_epoch * samples_per_step)
        batches = iter(self.train_loader)
        while self.steps_done_in_epoch < self.steps_per_epoch:
            started = time.perf_counter()
            micro_batches = [next(batches) for _ in range(p.gradient_accumulation_steps)]
            metrics = self.train_step(micro_batches)
            self.global_step += 1
            self.steps_done_in_epoch += 1
            metrics["tokens_per_second"] = metrics.pop("tokens") / (time.perf_counter() - started)
            progress.update(1)
            progress.set_postfix(loss=f"{metrics['loss']:.4f}")
            self.run.monitor.update(step=self.global_step, epoch=self.epoch, loss=metrics["loss"])
            self.run.events.add_loss(metrics["loss"])
            if self.global_step % p.log_every_n_steps == 0:
                metrics["peak_memory_gb"] = peak_memory_gb(self.run.device)
                self._log_metrics(metrics)
                self.run.events.step(step=self.global_step, epoch=self.epoch, **metrics)
            if self.eval_loader is not None and p.eval_every_n_steps and self.global_step % p.eval_every_n_steps == 0:
                self._log_metrics(self._eval_metrics())
            if p.save_every_n_steps and self.global_step % p.save_every_n_steps == 0:
                self.save_checkpoint()
            profiler.step()
            asked = stop.agreed()
            if asked is not None:
                raise stop_exception(asked)

    def train_step(self, micro_batches: Sequence[Batch]) -> dict[str, float]:
        """One optimizer step over `micro_batches` (gradient accumulation)."""
        if self.objective is None:
            measured = {"loss": self.accumulate_gradients(micro_batches)}
        else:
            measured = self.objective.accumulate_gradients(micro_batches)
        loss = measured["loss"]
        check_finite_loss(loss, self.global_step + 1, self._last_checkpoint_dir())
        grad_norm = clip_grad_norm(self.trainable_params, self.params.clip_grad_norm or math.inf)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_scheduler.step()
        tokens = count_non_pad_tokens(micro_batches, self.pad_id, self.run.device)
        return {**measured, "lr": lr, "grad_norm": grad_norm, "tokens": tokens}

    def accumulate_gradients(self, micro_batches: Sequence[Batch]) -> float:
        """Backpropagate every micro-batch; the loss is normalised by all their trained tokens."""
        return accumulate_gradients(
            self.model,
            micro_batches,
            device=self.run.device,
            world_size=self.run.dist.world_size,
            loss_chunks=self.params.loss_chunks,
            offload_activations=self.params.enable_activation_offloading,
        )

    def evaluate(self) -> float:
        """Mean per-token loss on the held-out data."""
        assert self.eval_loader is not None
        return evaluate(
            self.model,
            self.eval_loader,
            device=self.run.device,
            loss_chunks=self.params.loss_chunks,
            max_batches=self.params.eval_max_batches,
        )

    def _eval_metrics(self) -> dict[str, float]:
        if self.objective is None:
            return {"eval_loss": self.evaluate()}
        assert self.eval_loader is not None
        return self.objective.evaluate(self.eval_loader)

    def _last_checkpoint_dir(self) -> Optional[Path]:
        return None if self.last_saved_step is None else self.run.output_dir / f"step_{self.last_saved_step}"

    def _log_metrics(self, metrics: dict[str, float]) -> None:
        for logger in self.metric_loggers:
            logger.log(self.global_step, metrics)
        if "eval_loss" in metrics:
            said = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("eval_"))
            self.run.log(f"step {self.global_step}: {said}")

    # ------------------------------------------------------------------------------------------
    # Checkpoints
    # ------------------------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        """Write `output_dir/step_<N>/` atomically: the recipe's weights, params.yaml, recipe state."""
        run = self.run
        run.monitor.set_state("checkpointing")
        # Gathering is collective: every rank takes part, rank 0 writes.
        weights = self.gather_weights()
        optimizer_state = full_optimizer_state_dict(self.model, self.optimizer)
        rng_states = gather_rng_states(run.dist.world_size)
        step_dir = run.output_dir / f"step_{self.global_step}"
        if run.rank_zero:
            with atomic_directory(step_dir) as tmp:
                self.write_weights(weights, tmp)
                self.params.to_yaml(tmp / "params.yaml")
                save_recipe_state(
                    tmp / RECIPE_STATE_FILE,
                    {
                        "optimizer": optimizer_state,
                        "lr_scheduler": self.lr_scheduler.state_dict(),
                        "global_step": self.global_step,
                        "epoch": self.epoch,
                        "steps_done_in_epoch": self.steps_done_in_epoch,
                        "steps_per_epoch": self.steps_per_epoch,
                        "dataset_len": self.sampler.dataset_len,
                        "rng_states": rng_states,
                    },
                )
            if self.params.keep_last_n_checkpoints:
                prune_checkpoints(run.output_dir, self.params.keep_last_n_checkpoints)
            run.monitor.checkpoint_saved(step_dir)
            run.events.checkpoint(self.global_step, step_dir)
            run.log(f"saved {step_dir}")
        barrier()
        self.last_saved_step = self.global_step
        run.monitor.set_state("running")
