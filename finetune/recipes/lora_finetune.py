"""LoRA fine-tuning of a Llama-family model (and QLoRA with an NF4 base, and DoRA), on one CPU
or GPU or with FSDP2 across processes and nodes (`tune --nproc_per_node N lora_finetune ...`).

Read it top to bottom. It differs from the full recipe in four places: adapters are inserted
before the weights arrive, only adapter parameters train (so the optimizer state is
adapter-sized), each checkpoint holds a PEFT-format adapter plus the merged model in Hugging
Face format (in `merged/`), and a resume rebuilds the base from the original checkpoint and
loads the saved adapter on top. The loop, the run and the data are the same blocks the full
recipe uses.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from finetune.checkpointing import load_peft_adapter, save_hf_checkpoint, save_peft_adapter
from finetune.checkpointing.lazy import LazyStateDict
from finetune.checkpointing.peft import MERGED_DIR
from finetune.errors import UserError
from finetune.models import ModelArgs, TransformerDecoder, num_params
from finetune.models.lora import (
    adapter_state_dict,
    apply_lora,
    initialize_adapters,
    load_adapter_state_dict,
    merged_state_dict,
    merged_weights,
    set_trainable_params,
)
from finetune.params import LoraFinetuneParams, resolve_path
from finetune.recipes import recipe_main, run_recipe
from finetune.training.data_setup import build_training_data
from finetune.training.fsdp import full_model_state_dict
from finetune.training.loop import TrainingLoop
from finetune.training.model_setup import build_on_cpu
from finetune.training.run import ModelSource, RunContext, close_run, load_model_source, start_run

PARAMS_CLASS = LoraFinetuneParams
ALIASES = ("lora_finetune_single_device", "lora_finetune_distributed")  # other names `tune` runs it by
# What the adapter is: a resumed run must keep these (the optimizer state and the scale follow them).
LORA_SETTINGS = (
    "lora_attn_modules",
    "apply_lora_to_mlp",
    "apply_lora_to_output",
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "use_dora",
    "quantize_base",
)

Weights = tuple[dict[str, torch.Tensor], Optional[Mapping[str, torch.Tensor]]]  # adapter, merged model


def add_adapters(model: nn.Module, p: LoraFinetuneParams) -> None:
    """The adapters `p` asks for, on a built model; only they stay trainable."""
    apply_lora(
        model,
        attn_modules=p.lora_attn_modules,
        mlp=p.apply_lora_to_mlp,
        output=p.apply_lora_to_output,
        rank=p.lora_rank,
        alpha=p.lora_alpha,
        dropout=p.lora_dropout,
        use_dora=p.use_dora,
        quantize_base=p.quantize_base,
    )
    set_trainable_params(model)


class LoraFinetuneRecipe:
    """Train low-rank adapters on a frozen (optionally NF4-quantized) base model: only the
    adapters have gradients and optimizer state, and only they are saved for a resume."""

    def __init__(self, params: LoraFinetuneParams) -> None:
        self.params = params
        self.run: Optional[RunContext] = None
        self.loop: Optional[TrainingLoop] = None

    def setup(self) -> None:
        p = self.params
        self.run = start_run(p, adapter_settings=LORA_SETTINGS)
        resume_dir = self.run.resume.checkpoint if self.run.resume is not None else None
        self.source: ModelSource = load_model_source(p)
        check_rank_fits(p, self.source.args)
        self.tokenizer = self.source.tokenizer
        data = build_training_data(p, self.tokenizer, self.run.dist, self.run.log)
        # Weights last: a bad tokenizer or dataset is reported before minutes of loading.
        self.model = self._setup_model(resume_dir)
        trainable = [param for param in self.model.parameters() if param.requires_grad]
        self.loop = TrainingLoop(
            self.run,
            self.model,
            trainable,
            data,
            pad_id=self.tokenizer.pad_id,
            gather_weights=self._gather_weights,
            write_weights=self._write_weights,
            resume_dir=resume_dir,
        )
        self.run.log(
            f"model {p.model} with LoRA: {num_params(self.model, trainable_only=True):,} trainable of "
            f"{num_params(self.model):,} parameters {self.loop.describe()}"
        )

    def _setup_model(self, resume_dir: Optional[Path]) -> TransformerDecoder:
        """The base from the original checkpoint, adapters seeded, or loaded from `resume_dir`."""
        p, run = self.params, self.run
        assert run is not None
        base_state = run.load_weights(self.source.args, self.source.checkpoint_dir, p.checkpoint_format)

        def initialize(model: nn.Module) -> None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(p.seed)
                initialize_adapters(model)
            if resume_dir is not None:
                adapter, _ = load_peft_adapter(resume_dir, self.source.args)
                load_adapter_state_dict(model, adapter)

        return run.prepare_model(
            self.source.args, base_state, adapt=partial(add_adapters, p=self.params), initialize=initialize
        )

    def train(self) -> None:
        assert self.loop is not None
        self.loop.train()

    # ------------------------------------------------------------------------------------------
    # Checkpoints: the PEFT adapter, and the merged model in its own folder
    # ------------------------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        """Write `output_dir/step_<N>/` atomically: the PEFT adapter, params.yaml and the
        (adapter-sized) recipe state, and the merged model in HF format in `step_<N>/merged/`."""
        assert self.loop is not None
        self.loop.save_checkpoint()

    def _gather_weights(self) -> Weights:
        adapter = adapter_state_dict(self.model)
        return adapter, self._merged_state_dict() if self.params.save_merged_model else None

    def _write_weights(self, weights: Weights, folder: Path) -> None:
        p = self.params
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
            # Its own folder: transformers would apply an adapter_config.json beside it again.
            save_hf_checkpoint(merged, self.source.args, folder / MERGED_DIR, **self.source.output_extras())

    def _merged_state_dict(self) -> Mapping[str, torch.Tensor]:
        """Base + scale * B @ A for every adapted weight (DoRA rescaled), on CPU, on rank 0.

        In one process each weight is merged on the device and copied to the host only while the
        writer writes it, so the host never holds the whole merged model."""
        assert self.run is not None
        if not self.run.dist.is_distributed:
            specs, make = merged_weights(self.model)
            return LazyStateDict(specs, lambda name: make(name).to("cpu"))
        full_state = full_model_state_dict(self.model)
        if not self.run.rank_zero:
            return {}
        # Rebuild an unsharded CPU copy around the gathered tensors (assigned, not copied).
        return merged_state_dict(build_on_cpu(self.source.args, full_state, adapt=partial(add_adapters, p=self.params)))

    def cleanup(self) -> None:
        close_run(self.run)


def check_rank_fits(p: LoraFinetuneParams, args: ModelArgs) -> None:
    """A rank above an adapted layer's smaller side adds parameters and memory but no capacity."""
    q_dim, kv_dim = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    sides = {"q_proj": min(args.dim, q_dim), "k_proj": kv_dim, "v_proj": kv_dim, "output_proj": min(args.dim, q_dim)}
    smallest = min(
        [sides[m] for m in p.lora_attn_modules] + [args.dim] * (p.apply_lora_to_mlp or p.apply_lora_to_output)
    )
    if p.lora_rank > smallest:
        raise UserError(
            f"lora_rank={p.lora_rank} exceeds {smallest}, the smallest side of an adapted layer of "
            f"model {p.model}; use a rank of at most {smallest} (8 to 64 is usual)"
        )


main = recipe_main(PARAMS_CLASS, "tune lora_finetune", lambda params: run_recipe(LoraFinetuneRecipe(params)))

if __name__ == "__main__":
    sys.exit(main())
