"""Preference tuning (DPO, IPO, SimPO) of a Llama-family model, usually one fine-tuned on
instructions first: every weight, or LoRA / QLoRA / DoRA adapters with `use_lora=true`, on one
CPU or GPU or with FSDP2 across processes and nodes (`tune --nproc_per_node N dpo ...`).

Read it top to bottom. `setup` starts the run, loads the architecture, tokenizer and the
preference pairs, then the policy (the model that trains) and the reference it is compared
with, and hands the training loop a preference objective in place of the supervised loss. The
reference is, by the user's choice:

- a frozen copy of the starting weights, built and sharded like the policy (full fine-tuning);
- the policy itself with its adapters turned off (LoRA: no second copy in memory);
- a table of every pair's reference log-probs, scored once with the starting model before the
  first step and saved in each checkpoint (`precompute_reference_logps=true`);
- nothing, for SimPO.

Checkpoints are a full run's HF model, or a LoRA run's PEFT adapter plus the merged model in
`merged/`, as the supervised recipes write them. One class, no base class.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from finetune.checkpointing import load_peft_adapter, save_hf_checkpoint, save_peft_adapter
from finetune.checkpointing.peft import MERGED_DIR
from finetune.data import ResumableDistributedSampler, build_dataloader
from finetune.data.preference import PreferenceDataset, build_preference_dataset, collate_pairs
from finetune.errors import UserError
from finetune.models import TransformerDecoder, num_params
from finetune.models.lora import (
    adapter_state_dict,
    adapters_disabled,
    initialize_adapters,
    load_adapter_state_dict,
    merged_state_dict,
)
from finetune.params import DpoParams, resolve_path
from finetune.recipes import recipe_main, run_recipe
from finetune.recipes.lora_finetune import LORA_SETTINGS, add_adapters, check_rank_fits
from finetune.training.data_setup import TrainingData, steps_per_epoch
from finetune.training.fsdp import full_model_state_dict
from finetune.training.loop import TrainingLoop
from finetune.training.model_setup import build_on_cpu
from finetune.training.preference import (
    PreferenceLoss,
    PreferenceObjective,
    ReferenceFn,
    precompute_reference_logps,
    reference_from_model,
    reference_from_table,
)
from finetune.training.run import ModelSource, RunContext, close_run, load_model_source, start_run

PARAMS_CLASS = DpoParams
# What a resumed run must keep besides the data, the model and the adapter: what the loss compares.
RESUME_SETTINGS = (
    "use_lora",
    "loss_type",
    "beta",
    "label_smoothing",
    "simpo_gamma",
    "precompute_reference_logps",
)
REFERENCE_FILE = "reference_logps.pt"  # in each checkpoint with precompute_reference_logps=true


class DpoRecipe:
    """Teach a model to prefer the chosen response of each pair over the rejected one."""

    def __init__(self, params: DpoParams) -> None:
        self.params = params
        self.run: Optional[RunContext] = None
        self.loop: Optional[TrainingLoop] = None
        self.reference_model: Optional[TransformerDecoder] = None
        self.reference_tables: Optional[dict[str, torch.Tensor]] = None

    def setup(self) -> None:
        p = self.params
        self.run = start_run(p, adapter_settings=LORA_SETTINGS if p.use_lora else None, recipe_settings=RESUME_SETTINGS)
        resume_dir = self.run.resume.checkpoint if self.run.resume is not None else None
        self.source: ModelSource = load_model_source(p)
        if p.use_lora:
            check_rank_fits(p, self.source.args)
        self.tokenizer = self.source.tokenizer
        data = self._setup_data()
        # Weights last: bad pairs are reported before minutes of loading.
        self.model = self._setup_policy(resume_dir)
        trainable = [param for param in self.model.parameters() if param.requires_grad]
        train_reference, eval_reference = self._setup_reference(data, resume_dir)
        objective = PreferenceObjective(
            self.model,
            PreferenceLoss(p.loss_type, p.beta, p.label_smoothing, p.simpo_gamma),
            train_reference=train_reference,
            eval_reference=eval_reference,
            device=self.run.device,
            world_size=self.run.dist.world_size,
            loss_chunks=p.loss_chunks,
            offload_activations=p.enable_activation_offloading,
            eval_max_batches=p.eval_max_batches,
        )
        self.loop = TrainingLoop(
            self.run,
            self.model,
            trainable,
            data,
            pad_id=self.tokenizer.pad_id,
            gather_weights=self._gather_weights,
            write_weights=self._write_weights,
            resume_dir=resume_dir,
            objective=objective,
        )
        self.run.log(
            f"model {p.model} ({'LoRA' if p.use_lora else 'full'}, loss {p.loss_type}, reference: "
            f"{self._describe_reference()}): {num_params(self.model, trainable_only=True):,} trainable of "
            f"{num_params(self.model):,} parameters {self.loop.describe()}"
        )

    # ------------------------------------------------------------------------------------------
    # Data: pairs, both responses of a pair in one batch
    # ------------------------------------------------------------------------------------------

    def _setup_data(self) -> TrainingData:
        p = self.params
        assert self.run is not None
        train_loader = self._pair_loader(p.dataset, p.split, "split", shuffle=True)
        eval_loader = self._pair_loader(p.eval_dataset, p.eval_split, "eval_split", shuffle=False)
        sampler = train_loader.sampler
        return TrainingData(train_loader, sampler, eval_loader, steps_per_epoch(p, sampler, self.run.dist.world_size))

    def _pair_loader(
        self, source: Optional[str], split: str, split_key: str, *, shuffle: bool
    ) -> Optional[torch.utils.data.DataLoader]:
        """Seeded and resumable mid-epoch like a supervised run's; held-out data keeps every pair."""
        p, run = self.params, self.run
        assert run is not None
        if source is None:
            return None
        dataset = build_preference_dataset(
            str(resolve_path(source)) if source.startswith("pkg:") else source,
            chat=p.dataset_type == "chat",
            tokenizer=self.tokenizer,
            max_seq_len=p.max_seq_len,
            template=p.template,
            column_map=p.column_map,
            split=split,
            split_key=split_key,
            subset=p.dataset_subset if source == p.dataset else None,
            log=run.log,
        )
        dist = run.dist
        sampler = ResumableDistributedSampler(
            len(dataset), rank=dist.rank, world_size=dist.world_size, seed=p.seed, shuffle=shuffle, drop_last=shuffle
        )
        return build_dataloader(
            dataset,
            batch_size=p.batch_size,
            sampler=sampler,
            num_workers=p.num_workers,
            collate_fn=partial(collate_pairs, pad_id=self.tokenizer.pad_id),
            seed=p.seed,
        )

    # ------------------------------------------------------------------------------------------
    # The policy
    # ------------------------------------------------------------------------------------------

    def _setup_policy(self, resume_dir: Optional[Path]) -> TransformerDecoder:
        """Full: the starting weights, or the checkpoint's when resuming. LoRA: the base from the
        original checkpoint with adapters seeded, or loaded from `resume_dir`."""
        p, run = self.params, self.run
        assert run is not None
        if not p.use_lora:
            if resume_dir is not None:
                return run.prepare_model(self.source.args, run.load_weights(self.source.args, resume_dir, "hf"))
            return run.prepare_model(self.source.args, self._starting_weights())

        def initialize(model: nn.Module) -> None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(p.seed)
                initialize_adapters(model)
            if resume_dir is not None:
                adapter, _ = load_peft_adapter(resume_dir, self.source.args)
                load_adapter_state_dict(model, adapter)

        return run.prepare_model(
            self.source.args,
            self._starting_weights(),
            adapt=partial(add_adapters, p=self.params),
            initialize=initialize,
        )

    def _starting_weights(self) -> dict[str, torch.Tensor]:
        assert self.run is not None
        return self.run.load_weights(self.source.args, self.source.checkpoint_dir, self.params.checkpoint_format)

    # ------------------------------------------------------------------------------------------
    # The reference
    # ------------------------------------------------------------------------------------------

    def _setup_reference(
        self, data: TrainingData, resume_dir: Optional[Path]
    ) -> tuple[Optional[ReferenceFn], Optional[ReferenceFn]]:
        """The reference log-probs of training and held-out batches (None for SimPO)."""
        p = self.params
        if p.loss_type == "simpo":
            return None, None
        if p.use_lora:  # the base model is the policy with its adapters off: no second copy
            model_reference = reference_from_model(
                self.model, loss_chunks=p.loss_chunks, context=partial(adapters_disabled, self.model)
            )
        elif p.precompute_reference_logps and resume_dir is not None:
            model_reference = None  # the checkpoint holds the tables already
        elif p.precompute_reference_logps:
            model_reference = reference_from_model(self.model, loss_chunks=p.loss_chunks)  # still the start
        else:
            self.reference_model = self._frozen_copy()
            model_reference = reference_from_model(self.reference_model, loss_chunks=p.loss_chunks)
        if not p.precompute_reference_logps:
            return model_reference, model_reference
        self.reference_tables = self._reference_tables(data, resume_dir, model_reference)
        tables = self.reference_tables
        return reference_from_table(tables["train"]), (
            reference_from_table(tables["eval"]) if "eval" in tables else None
        )

    def _frozen_copy(self) -> TransformerDecoder:
        """The starting weights again, built and sharded like the policy, without gradients."""
        assert self.run is not None
        model = self.run.prepare_model(self.source.args, self._starting_weights())
        for param in model.parameters():
            param.requires_grad_(False)
        return model.eval()

    def _reference_tables(
        self, data: TrainingData, resume_dir: Optional[Path], reference: Optional[ReferenceFn]
    ) -> dict[str, torch.Tensor]:
        """Every pair's reference log-probs: read from the checkpoint when resuming (the policy
        has moved on since), else scored now with the starting model."""
        datasets: dict[str, PreferenceDataset] = {"train": data.train_loader.dataset}  # type: ignore[dict-item]
        if data.eval_loader is not None:
            datasets["eval"] = data.eval_loader.dataset  # type: ignore[assignment]
        if resume_dir is not None:
            tables = torch.load(resume_dir / REFERENCE_FILE, weights_only=True)
            for name, dataset in datasets.items():
                if name not in tables or len(tables[name]) != len(dataset):
                    raise UserError(
                        f"{resume_dir / REFERENCE_FILE} holds no reference log-probs for the {len(dataset)} "
                        f"{name} pairs of this run; resume with the data it was trained on, or start a new run"
                    )
            return tables
        assert self.run is not None and reference is not None
        self.model.eval()
        tables = {
            name: precompute_reference_logps(
                reference,
                dataset,
                batch_size=self.params.batch_size,
                pad_id=self.tokenizer.pad_id,
                dist=self.run.dist,
                device=self.run.device,
                desc=f"reference log-probs ({name})",
            )
            for name, dataset in datasets.items()
        }
        self.model.train()
        return tables

    def _describe_reference(self) -> str:
        p = self.params
        if p.loss_type == "simpo":
            return "none"
        if p.precompute_reference_logps:
            return "precomputed log-probs"
        return "base with adapters off" if p.use_lora else "frozen copy"

    def train(self) -> None:
        assert self.loop is not None
        self.loop.train()

    # ------------------------------------------------------------------------------------------
    # Checkpoints: as the supervised recipes write them, plus the reference table
    # ------------------------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        """Write `output_dir/step_<N>/` atomically: the HF model (full) or the PEFT adapter and
        merged model (LoRA), params.yaml, the recipe state and any precomputed reference table."""
        assert self.loop is not None
        self.loop.save_checkpoint()

    def _gather_weights(self) -> Any:
        if not self.params.use_lora:
            return full_model_state_dict(self.model)
        adapter = adapter_state_dict(self.model)
        return adapter, self._merged_state_dict() if self.params.save_merged_model else None

    def _write_weights(self, weights: Any, folder: Path) -> None:
        p = self.params
        extras = self.source.output_extras()
        if not p.use_lora:
            save_hf_checkpoint(weights, self.source.args, folder, **extras)
        else:
            adapter, merged = weights
            save_peft_adapter(
                adapter,
                folder,
                rank=p.lora_rank,
                alpha=p.lora_alpha,
                dropout=p.lora_dropout,
                use_dora=p.use_dora,
                base_model_name_or_path=str(resolve_path(p.checkpoint_dir).resolve()) if p.checkpoint_dir else None,
            )
            if merged is not None:
                save_hf_checkpoint(merged, self.source.args, folder / MERGED_DIR, **extras)
        if self.reference_tables is not None:
            torch.save(self.reference_tables, folder / REFERENCE_FILE)

    def _merged_state_dict(self) -> dict[str, torch.Tensor]:
        """Base + scale * B @ A for every adapted weight (DoRA rescaled), on CPU, on rank 0."""
        assert self.run is not None
        if not self.run.dist.is_distributed:
            return {name: tensor.to("cpu") for name, tensor in merged_state_dict(self.model).items()}
        full_state = full_model_state_dict(self.model)
        if not self.run.rank_zero:
            return {}
        return merged_state_dict(build_on_cpu(self.source.args, full_state, adapt=partial(add_adapters, p=self.params)))

    def cleanup(self) -> None:
        close_run(self.run)


main = recipe_main(PARAMS_CLASS, "tune dpo", lambda params: run_recipe(DpoRecipe(params)))

if __name__ == "__main__":
    sys.exit(main())
