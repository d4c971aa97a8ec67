"""LoRA fine-tuning of a Llama-family model (and QLoRA with an NF4 base, and DoRA), on one CPU
or GPU or with FSDP2 across processes and nodes (`tune --nproc_per_node N lora_finetune ...`).

Read it top to bottom. It differs from the full recipe in four places: adapters are inserted
before the weights arrive, only adapter parameters train (so the optimizer state is
adapter-sized), each checkpoint holds a PEFT-format adapter plus the merged model in Hugging
Face format (in `merged/`), and a resume rebuilds the base from the original checkpoint and loads the saved
adapter on top. Everything else comes from the same blocks as the full recipe.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn
from tqdm import tqdm

from finetune.checkpointing import load_peft_adapter, save_hf_checkpoint, save_peft_adapter
from finetune.checkpointing.atomic import atomic_directory, prune_checkpoints
from finetune.checkpointing.recipe_state import (
    check_resume_settings,
    claim_output_dir,
    find_resume_checkpoint,
    gather_rng_states,
    load_recipe_state,
    restore_rng_state,
    rng_state_for_rank,
    save_recipe_state,
    seed_everything,
)
from finetune.checkpointing.model_configs import resolve_model_args
from finetune.checkpointing.writers import hf_output_extras
from finetune.checkpointing.peft import MERGED_DIR
from finetune.tokenizers.loader import load_tokenizer_for_model
from finetune.config import TuneArgumentParser, recipe_entry_point
from finetune.errors import UserError
from finetune.models import ModelArgs, TransformerDecoder, num_params
from finetune.models.lora import (
    adapter_state_dict,
    apply_lora,
    initialize_adapters,
    load_adapter_state_dict,
    merged_state_dict,
    set_trainable_params,
)
from finetune.params import LoraFinetuneParams, resolve_path
from finetune.recipes import run_recipe
from finetune.tokenizers.loader import resolve_tokenizer_path
from finetune.training.data_setup import build_data, build_eval_data, steps_per_epoch
from finetune.training.distributed import (
    barrier, destroy_distributed, init_distributed, resolve_device, run_on_rank_zero,
)
from finetune.training.fsdp import full_model_state_dict, full_optimizer_state_dict, load_full_optimizer_state_dict
from finetune.training.guards import StopAtStepBoundary, check_finite_loss, out_of_memory_error
from finetune.training.lr_schedule import build_lr_scheduler
from finetune.training.memory import keep_freed_host_memory, peak_memory_gb
from finetune.training.metrics import build_metric_loggers
from finetune.training.model_setup import build_on_cpu, initial_state_dict, prepare_model
from finetune.training.monitor import JobMonitor
from finetune.training.optim import build_optimizer, clip_grad_norm
from finetune.training.precision import resolve_run_dtype
from finetune.training.profiler import build_profiler
from finetune.training.steps import accumulate_gradients, count_non_pad_tokens, evaluate

PARAMS_CLASS = LoraFinetuneParams
RECIPE_STATE_FILE = "recipe_state.pt"
# What the adapter is: a resumed run must keep these (the optimizer state and the scale follow them).
LORA_SETTINGS = ("lora_attn_modules", "apply_lora_to_mlp", "apply_lora_to_output", "lora_rank", "lora_alpha",
                 "lora_dropout", "use_dora", "quantize_base")


class LoraFinetuneRecipe:
    """Train low-rank adapters on a frozen (optionally NF4-quantized) base model."""

    def __init__(self, params: LoraFinetuneParams) -> None:
        self.params = params
        self.output_dir = Path(params.output_dir)
        self.global_step = 0
        self.epoch = 0
        self.steps_done_in_epoch = 0
        self.last_saved_step: Optional[int] = None
        self.monitor: Optional[JobMonitor] = None

    # ------------------------------------------------------------------------------------------
    # Setup
    # ------------------------------------------------------------------------------------------

    def setup(self) -> None:
        p = self.params
        p.check()  # a notebook may have changed a field since the params were built
        self.dist = init_distributed(resolve_device(p.device).type)
        self.rank_zero = self.dist.rank == 0
        self.device = resolve_device(p.device, self.dist.local_rank)
        if self.device.type == "cpu":
            keep_freed_host_memory()
        self.dtype = resolve_run_dtype(p.dtype, self.device)
        seed_everything(p.seed, self.dist.rank)
        claim_output_dir(self.output_dir, resume=p.resume_from_checkpoint)
        self.monitor = JobMonitor(self.output_dir, rank=self.dist.rank, heartbeat_interval_s=p.heartbeat_interval_s)
        if self.rank_zero:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self.log(str(p))

        resume_dir = find_resume_checkpoint(self.output_dir, self.log, lora=True) if p.resume_from_checkpoint else None
        if resume_dir is not None:
            check_resume_settings(resume_dir, p, LORA_SETTINGS)
        self.model_args = resolve_model_args(p.model, resolve_path(p.checkpoint_dir) if p.checkpoint_dir else None)
        check_rank_fits(p, self.model_args)
        self.tokenizer_path = resolve_path(p.tokenizer_path or p.checkpoint_dir)  # type: ignore[arg-type]
        self.tokenizer = load_tokenizer_for_model(self.tokenizer_path, self.model_args.family, self.model_args.vocab_size)
        self.train_loader, self.sampler = build_data(
            p, self.tokenizer, self.dist, source=p.dataset, split=p.split, shuffle=p.shuffle, log=self.log
        )
        self.eval_loader = build_eval_data(p, self.tokenizer, self.dist, log=self.log)
        # Weights last: a bad tokenizer or dataset is reported before minutes of loading.
        self.model = self._setup_model(resume_dir)
        self.trainable_params = [param for param in self.model.parameters() if param.requires_grad]
        self.steps_per_epoch = steps_per_epoch(p, self.sampler, self.dist.world_size)
        self.optimizer = build_optimizer(
            p.optimizer, self.trainable_params, lr=p.lr, weight_decay=p.weight_decay, device=self.device
        )
        self.lr_scheduler = build_lr_scheduler(
            p.lr_scheduler, self.optimizer, warmup_steps=p.warmup_steps, total_steps=self.steps_per_epoch * p.epochs,
            log=self.log,
        )
        if resume_dir is not None:
            self._load_recipe_state(resume_dir)
        if self.rank_zero:  # only now: a refused resume leaves the run's params.yaml as it was
            p.to_yaml(self.output_dir / "params.yaml")
        self.metric_loggers = build_metric_loggers(p.metric_logger_type, self.output_dir, rank=self.dist.rank)
        self.log(
            f"model {p.model} with LoRA: {num_params(self.model, trainable_only=True):,} trainable of "
            f"{num_params(self.model):,} parameters on {self.device} in {self.dtype}; "
            f"{self.dist.world_size} process(es); {self.steps_per_epoch} steps per epoch"
        )

    def _setup_model(self, resume_dir: Optional[Path]) -> TransformerDecoder:
        p = self.params
        base_state = run_on_rank_zero(
            lambda: initial_state_dict(
                self.model_args, weights_dir=resolve_path(p.checkpoint_dir) if p.checkpoint_dir else None,
                checkpoint_format=p.checkpoint_format, dtype=self.dtype, seed=p.seed,
            ),
            default={},
        )

        def initialize(model: nn.Module) -> None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(p.seed)
                initialize_adapters(model)
            if resume_dir is not None:
                adapter, _ = load_peft_adapter(resume_dir, self.model_args)
                load_adapter_state_dict(model, adapter)

        return prepare_model(
            self.model_args, base_state, dist=self.dist, device=self.device, dtype=self.dtype,
            activation_checkpointing=p.enable_activation_checkpointing, compile=p.compile,
            reshard_after_forward=p.reshard_after_forward, cpu_offload=p.cpu_offload,
            adapt=self._add_adapters, initialize=initialize,
        )

    def _add_adapters(self, model: nn.Module) -> None:
        p = self.params
        apply_lora(
            model, attn_modules=p.lora_attn_modules, mlp=p.apply_lora_to_mlp, output=p.apply_lora_to_output,
            rank=p.lora_rank, alpha=p.lora_alpha, dropout=p.lora_dropout, use_dora=p.use_dora,
            quantize_base=p.quantize_base,
        )
        set_trainable_params(model)

    def _load_recipe_state(self, checkpoint: Path) -> None:
        state = load_recipe_state(checkpoint / RECIPE_STATE_FILE)
        load_full_optimizer_state_dict(self.model, self.optimizer, state["optimizer"] if self.rank_zero else {})
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.global_step = state["global_step"]
        self.epoch = state["epoch"]
        self.steps_done_in_epoch = state["steps_done_in_epoch"]
        self.last_saved_step = self.global_step
        restore_rng_state(rng_state_for_rank(state["rng_states"], self.dist.rank))

    # ------------------------------------------------------------------------------------------
    # Training
    # ------------------------------------------------------------------------------------------

    def train(self) -> None:
        p = self.params
        assert self.monitor is not None
        self.monitor.set_state("running")
        if self.eval_loader is not None and self.global_step == 0:
            self._log_metrics({"eval_loss": self.evaluate()})
        progress = tqdm(
            total=self.steps_per_epoch * p.epochs, initial=self.global_step, disable=not self.rank_zero,
            desc="train", dynamic_ncols=True,
        )
        profiler = build_profiler(
            p.profile, self.output_dir, wait=p.profile_wait_steps, warmup=1, active=p.profile_active_steps
        )
        try:
            with profiler, StopAtStepBoundary(self.device, self.log) as stop:
                for self.epoch in range(self.epoch, p.epochs):
                    self._train_epoch(progress, profiler, stop)
                    self.steps_done_in_epoch = 0
                    self.epoch += 1
                    if self.last_saved_step != self.global_step:
                        self.save_checkpoint()
        except KeyboardInterrupt:
            self.log(f"interrupted at step {self.global_step}: saving a checkpoint before exiting")
            if self.last_saved_step != self.global_step:
                self.save_checkpoint()
            raise
        except torch.OutOfMemoryError as exc:
            raise out_of_memory_error(self.global_step, self.device) from exc
        finally:
            progress.close()
        evaluated_last_step = bool(p.eval_every_n_steps) and self.global_step % p.eval_every_n_steps == 0
        if self.eval_loader is not None and not evaluated_last_step:
            self._log_metrics({"eval_loss": self.evaluate()})
        self.monitor.finish()

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
            assert self.monitor is not None
            self.monitor.update(step=self.global_step, epoch=self.epoch, loss=metrics["loss"])
            if self.global_step % p.log_every_n_steps == 0:
                metrics["peak_memory_gb"] = peak_memory_gb(self.device)
                self._log_metrics(metrics)
            if self.eval_loader is not None and p.eval_every_n_steps and self.global_step % p.eval_every_n_steps == 0:
                self._log_metrics({"eval_loss": self.evaluate()})
            if p.save_every_n_steps and self.global_step % p.save_every_n_steps == 0:
                self.save_checkpoint()
            profiler.step()
            if stop.agreed():
                raise KeyboardInterrupt

    def train_step(self, micro_batches: Sequence[dict[str, torch.Tensor]]) -> dict[str, float]:
        """One optimizer step over `micro_batches` (gradient accumulation)."""
        loss = self.accumulate_gradients(micro_batches)
        check_finite_loss(loss, self.global_step + 1, self._last_checkpoint_dir())
        grad_norm = clip_grad_norm(self.trainable_params, self.params.clip_grad_norm or math.inf)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_scheduler.step()
        tokens = count_non_pad_tokens(micro_batches, self.tokenizer.pad_id, self.device)
        return {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens}

    def accumulate_gradients(self, micro_batches: Sequence[dict[str, torch.Tensor]]) -> float:
        """Backpropagate every micro-batch; the loss is normalised by all their trained tokens."""
        return accumulate_gradients(
            self.model, micro_batches, device=self.device, world_size=self.dist.world_size,
            loss_chunks=self.params.loss_chunks, offload_activations=self.params.enable_activation_offloading,
        )

    def evaluate(self) -> float:
        """Mean per-token loss on the held-out data."""
        assert self.eval_loader is not None
        return evaluate(
            self.model, self.eval_loader, device=self.device, loss_chunks=self.params.loss_chunks,
            max_batches=self.params.eval_max_batches,
        )

    def _hf_output_extras(self) -> dict:
        source = resolve_path(self.params.checkpoint_dir) if self.params.checkpoint_dir else None
        return hf_output_extras(source, resolve_tokenizer_path(self.tokenizer_path), self.tokenizer.bos_id,
                                self.tokenizer.stop_tokens, self.tokenizer.family)

    def _last_checkpoint_dir(self) -> Optional[Path]:
        return None if self.last_saved_step is None else self.output_dir / f"step_{self.last_saved_step}"

    def _log_metrics(self, metrics: dict[str, float]) -> None:
        for logger in self.metric_loggers:
            logger.log(self.global_step, metrics)
        if "eval_loss" in metrics:
            self.log(f"step {self.global_step}: eval_loss {metrics['eval_loss']:.4f}")

    # ------------------------------------------------------------------------------------------
    # Checkpoints
    # ------------------------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        """Write `output_dir/step_<N>/` atomically: the PEFT adapter, params.yaml and the
        (adapter-sized) recipe state, and the merged model in HF format in `step_<N>/merged/`."""
        assert self.monitor is not None
        self.monitor.set_state("checkpointing")
        # Gathering is collective: every rank takes part, rank 0 writes.
        adapter = adapter_state_dict(self.model)
        merged = self._merged_state_dict() if self.params.save_merged_model else None
        optimizer_state = full_optimizer_state_dict(self.model, self.optimizer)
        rng_states = gather_rng_states(self.dist.world_size)
        step_dir = self.output_dir / f"step_{self.global_step}"
        if self.rank_zero:
            p = self.params
            with atomic_directory(step_dir) as tmp:
                save_peft_adapter(
                    adapter, tmp, rank=p.lora_rank, alpha=p.lora_alpha, dropout=p.lora_dropout, use_dora=p.use_dora,
                    base_model_name_or_path=str(resolve_path(p.checkpoint_dir).resolve()) if p.checkpoint_dir else None,
                )
                if merged is not None:
                    # Its own folder: transformers would apply an adapter_config.json beside it again.
                    save_hf_checkpoint(merged, self.model_args, tmp / MERGED_DIR, **self._hf_output_extras())
                self.params.to_yaml(tmp / "params.yaml")
                save_recipe_state(tmp / RECIPE_STATE_FILE, {
                    "optimizer": optimizer_state,
                    "lr_scheduler": self.lr_scheduler.state_dict(),
                    "global_step": self.global_step,
                    "epoch": self.epoch,
                    "steps_done_in_epoch": self.steps_done_in_epoch,
                    "rng_states": rng_states,
                })
            if self.params.keep_last_n_checkpoints:
                prune_checkpoints(self.output_dir, self.params.keep_last_n_checkpoints)
            self.monitor.checkpoint_saved(step_dir)
            self.log(f"saved {step_dir}")
        barrier()
        self.last_saved_step = self.global_step
        self.monitor.set_state("running")

    def _merged_state_dict(self) -> dict[str, torch.Tensor]:
        """Base + scale * B @ A for every adapted weight (DoRA rescaled), on CPU, on rank 0."""
        if not self.dist.is_distributed:
            return {name: tensor.to("cpu") for name, tensor in merged_state_dict(self.model).items()}
        full_state = full_model_state_dict(self.model)
        if not self.rank_zero:
            return {}
        # Rebuild an unsharded CPU copy around the gathered tensors (assigned, not copied).
        return merged_state_dict(build_on_cpu(self.model_args, full_state, adapt=self._add_adapters))

    # ------------------------------------------------------------------------------------------
    # The end
    # ------------------------------------------------------------------------------------------

    def fail(self, error: BaseException) -> None:
        if self.monitor is not None:
            self.monitor.fail(str(error) or type(error).__name__)

    def cleanup(self) -> None:
        if self.monitor is not None:
            self.monitor.close()
        for logger in getattr(self, "metric_loggers", []):
            logger.close()
        destroy_distributed()

    def log(self, message: str) -> None:
        if getattr(self, "rank_zero", True):
            tqdm.write(message, file=sys.stderr)



def check_rank_fits(p: LoraFinetuneParams, args: ModelArgs) -> None:
    """A rank above an adapted layer's smaller side adds parameters and memory but no capacity."""
    kv_dim = args.n_kv_heads * (args.dim // args.n_heads)
    sides = {"q_proj": args.dim, "k_proj": kv_dim, "v_proj": kv_dim, "output_proj": args.dim}
    smallest = min([sides[m] for m in p.lora_attn_modules] + [args.dim] * (p.apply_lora_to_mlp or p.apply_lora_to_output))
    if p.lora_rank > smallest:
        raise UserError(f"lora_rank={p.lora_rank} exceeds {smallest}, the smallest side of an adapted layer of "
                        f"model {p.model}; use a rank of at most {smallest} (8 to 64 is usual)")


def _main(argv: Sequence[str]) -> int:
    params = TuneArgumentParser(PARAMS_CLASS, prog="tune lora_finetune").parse_args(argv)
    return run_recipe(LoraFinetuneRecipe(params))


main = recipe_entry_point(_main)

if __name__ == "__main__":
    sys.exit(main())
