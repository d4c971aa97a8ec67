"""Where a resumed run continues from, and which changed settings it honours: decided in
`start_run`, after the output folder is locked and before status.json or events.jsonl is
written, so a refused resume leaves the earlier run's record exactly as it was.

`plan_resume` picks the checkpoint (`resume_from_checkpoint=true`: the newest complete
`step_<N>`; `step_<N>`: that one, when no newer one would shadow it), reads its recipe state and
params.yaml, and refuses with one line what cannot continue the same run: the other recipe's
checkpoint, a damaged recipe state, another number of processes, a finished run, and any changed
setting that fixes the data order or position, the model or the optimizer state. What only
steers training from the saved step on (lr, weight_decay, the schedule, more epochs,
clip_grad_norm) is honoured by `steer_optimizer` and said in the log.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from finetune.checkpointing.atomic import list_checkpoints
from finetune.checkpointing.recipe_state import (
    RECIPE_STATE_FILE,
    changed_settings,
    check_checkpoint_kind,
    check_resume_settings,
    choose_checkpoint,
    load_recipe_state,
    read_saved_params,
)
from finetune.config.paths import STEP_NAME
from finetune.errors import UserError

# Which samples each step trains on: the saved position is steps x samples per step into an order
# fixed by these, so with one changed the rest of the run would repeat some samples and skip others.
DATA_ORDER_KEYS = (
    "dataset",
    "dataset_type",
    "template",
    "column_map",
    "dataset_subset",
    "split",
    "max_seq_len",
    "train_on_input",
    "packed",
    "seed",
    "shuffle",
    "batch_size",
    "gradient_accumulation_steps",
    "max_steps_per_epoch",
)
# What the weights and the optimizer state are.
MODEL_KEYS = ("model", "checkpoint_dir", "checkpoint_format", "tokenizer_path", "dtype", "optimizer")
# Steer training from the saved step on: honoured, and said in the log.
STEERING_KEYS = ("lr", "weight_decay", "lr_scheduler", "warmup_steps", "epochs", "clip_grad_norm")
_SCHEDULE_KEYS = ("lr_scheduler", "warmup_steps", "epochs")

# The recipe state the training loop writes: key -> what its value must be.
_STATE_FIELDS: dict[str, tuple[type, ...]] = {
    "optimizer": (dict,),
    "lr_scheduler": (dict,),
    "global_step": (int,),
    "epoch": (int,),
    "steps_done_in_epoch": (int,),
    "rng_states": (list,),
}


@dataclass
class ResumePoint:
    """The checkpoint a run continues from: its folder, recipe state and saved params."""

    checkpoint: Path
    state: dict[str, Any]
    saved_params: dict[str, Any]

    @property
    def step(self) -> int:
        return self.state["global_step"]


def plan_resume(
    params: Any,
    output_dir: Path,
    *,
    world_size: int,
    adapter_settings: Optional[Sequence[str]],
    log: Callable[[str], None],
    recipe_settings: Sequence[str] = (),
) -> Optional[ResumePoint]:
    """The checkpoint this run continues from (None on a first start), every refusal said first.

    `adapter_settings` are a LoRA recipe's adapter keys (its checkpoints hold adapters); None for
    a recipe that trains the whole model. `recipe_settings`: other keys of the recipe's own that
    a resumed run must keep (what a preference loss compares, for one).
    """
    checkpoint = choose_checkpoint(output_dir, params.resume_from_checkpoint)
    if checkpoint is None:
        log(f"resume_from_checkpoint: no checkpoint in {output_dir} yet, starting from step 0")
        return None
    check_checkpoint_kind(checkpoint, lora=adapter_settings is not None)
    state = read_recipe_state(checkpoint)
    saved = _saved_params(checkpoint)
    check_resume_settings(
        checkpoint, params, (*DATA_ORDER_KEYS, *MODEL_KEYS, *(adapter_settings or ()), *recipe_settings), saved
    )
    saved_world = len(state["rng_states"])  # one per rank
    if saved_world != world_size:
        raise UserError(
            f"this run has {world_size} process(es) but {checkpoint} was trained with {saved_world}; each process "
            f"reads its own share of every step's samples: resume with {saved_world} process(es) "
            "(tune --nproc_per_node/--nnodes), or start a new run in another output_dir"
        )
    _check_progress(checkpoint, state, params, saved)
    for note in steering_notes(checkpoint, saved, params):
        log(note)
    log(f"resuming from {checkpoint} (step {state['global_step']})")
    return ResumePoint(checkpoint, state, saved)


def _saved_params(checkpoint: Path) -> dict[str, Any]:
    """The settings `checkpoint` was trained with: its params.yaml, else the run's own (written at
    its start); with neither the settings cannot be checked, and the resume is refused."""
    for folder in (checkpoint, checkpoint.parent):
        saved = read_saved_params(folder)
        if saved:
            return saved
    raise UserError(
        f"{checkpoint} has no params.yaml (nor has {checkpoint.parent}), so this run's settings cannot be checked "
        "against the ones it was trained with; restore the file, or start a new run in another output_dir"
    )


def read_recipe_state(checkpoint: Path) -> dict[str, Any]:
    """The recipe state in `checkpoint`, memory-mapped (the optimizer's tensors are read when
    loaded into the optimizer), checked against what the training loop writes."""
    earlier = [c.name for c in list_checkpoints(checkpoint.parent) if _step_of(c) < _step_of(checkpoint)]
    advice = (
        f"resume from an earlier checkpoint (resume_from_checkpoint={earlier[-1]}, after moving {checkpoint.name} "
        "out of output_dir), or start a new run in another output_dir"
        if earlier
        else "there is no earlier checkpoint here: start a new run in another output_dir"
    )
    path = checkpoint / RECIPE_STATE_FILE
    state = load_recipe_state(path, mmap=True, advice=advice)
    problem = _state_problem(state, checkpoint)
    if problem:
        raise UserError(f"recipe state {path} {problem}, so it was not written by finetune or was altered; {advice}")
    return state


def _state_problem(state: dict[str, Any], checkpoint: Path) -> str:
    for key, types in _STATE_FIELDS.items():
        value = state.get(key)
        if not isinstance(value, types) or isinstance(value, bool):
            return f"lacks {key}" if value is None else f"holds {key}={value!r:.40}"
    for key in ("global_step", "epoch", "steps_done_in_epoch"):
        if state[key] < 0:
            return f"holds {key}={state[key]}"
    if state["global_step"] != _step_of(checkpoint):
        return f"says step {state['global_step']} in {checkpoint.name}"
    if not state["rng_states"] or not all(isinstance(s, dict) for s in state["rng_states"]):
        return "holds no RNG states"
    return ""


def _check_progress(checkpoint: Path, state: dict[str, Any], params: Any, saved: dict[str, Any]) -> None:
    """Refuse a resume with nothing left to train: a finished run, or one past fewer epochs."""
    epoch, done = state["epoch"], state["steps_done_in_epoch"]
    # A save at an epoch's last step comes before the epoch is counted as done.
    epoch_length = state.get("steps_per_epoch") or saved.get("max_steps_per_epoch")
    if isinstance(epoch_length, int) and done >= epoch_length > 0:
        epoch, done = epoch + 1, 0
    if epoch < params.epochs:
        return
    if epoch == params.epochs and done == 0:
        raise UserError(
            f"the run in {checkpoint.parent} is finished: {checkpoint.name} ends its {epoch} epoch(s), so there is "
            f"nothing to resume and nothing was changed; to train further set epochs={epoch + 1} (or more) with "
            "resume_from_checkpoint=true, or start a new run in another output_dir"
        )
    raise UserError(
        f"epochs is {params.epochs} but {checkpoint} is {done} step(s) into epoch {epoch + 1}; set epochs={epoch + 1} "
        "or more to finish it, or start a new run in another output_dir"
    )


_HOW_HONOURED = {
    "lr": "the schedule continues from the saved step with the new peak lr",
    "weight_decay": "the optimizer decays with the new value from the next step",
    "clip_grad_norm": "gradients are clipped to the new norm from the next step",
    "epochs": "the run continues to the new last epoch, its schedule recomputed for the new length",
}


def steering_notes(checkpoint: Path, saved: dict[str, Any], params: Any) -> list[str]:
    """A line for each steering setting changed since `checkpoint` (these are honoured), and for
    each source path that moved (the saved one is gone)."""
    notes = []
    for key in ("checkpoint_dir", "tokenizer_path", "dataset", "eval_dataset"):
        old, new = saved.get(key), getattr(params, key, None)
        if isinstance(old, str) and isinstance(new, str) and old != new and not changed_settings(saved, params, [key]):
            notes.append(
                f"note: {key} is {new} (was {old} up to {checkpoint.name}, which no longer exists): read as moved"
            )
    for key in changed_settings(saved, params, STEERING_KEYS):
        how = _HOW_HONOURED.get(key, "the schedule is recomputed from the saved step on")
        notes.append(f"note: {key} is {getattr(params, key)!r} (was {saved[key]!r} up to {checkpoint.name}): {how}")
    return notes


def steer_optimizer(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    params: Any,
    saved: dict[str, Any],
    log: Callable[[str], None],
) -> None:
    """After the saved optimizer and scheduler states are loaded (which bring back the saved lr
    and weight_decay), apply this run's: a new peak lr, weight decay or schedule holds from the
    next step. Nothing is touched when none changed, so a plain resume stays bit-identical."""
    if not changed_settings(saved, params, ("lr", "weight_decay", *_SCHEDULE_KEYS)):
        return
    saved_next_lr = float(optimizer.param_groups[0]["lr"])
    scheduler.base_lrs = [params.lr] * len(optimizer.param_groups)
    for group, multiplier in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = params.lr
        _set(group, "weight_decay", params.weight_decay)
        _set(group, "lr", params.lr * multiplier(scheduler.last_epoch))
    scheduler._last_lr = [float(group["lr"]) for group in optimizer.param_groups]  # what get_last_lr() reports
    next_lr = float(optimizer.param_groups[0]["lr"])
    if not math.isclose(next_lr, saved_next_lr, rel_tol=1e-12):
        log(f"note: the next step's lr is {next_lr:.6g} (the saved run's next would have been {saved_next_lr:.6g})")


def _set(group: dict[str, Any], key: str, value: float) -> None:
    # torchao's low-bit optimizers hold lr as a tensor: keep its type.
    if isinstance(group.get(key), torch.Tensor):
        group[key].fill_(value)
    else:
        group[key] = value


def _step_of(checkpoint: Path) -> int:
    match = STEP_NAME.match(checkpoint.name)
    return int(match.group(1)) if match else -1
