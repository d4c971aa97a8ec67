"""What a run needs beyond the weights to resume exactly: optimizer, scheduler, progress, RNG.

The recipe state is one `torch.save`d dict (loaded back with `weights_only=True`) holding:
`format_version`, `optimizer` (full state dict keyed by parameter name), `lr_scheduler`,
`global_step`, `epoch`, `steps_done_in_epoch` (the position in this epoch's data order) and
`rng_states` (one entry per rank); the training loop (`finetune/training/loop.py`) writes and
reads them. RNG states are plain Python values and tensors so that they too load under
`weights_only`.
"""

import logging
import os
import random
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
import yaml

from finetune.checkpointing.atomic import latest_checkpoint, list_checkpoints
from finetune.checkpointing.output_lock import OutputDirLock, lock_output_dir
from finetune.errors import UserError

log = logging.getLogger(__name__)

RECIPE_STATE_VERSION = 1

try:
    import numpy as np
except ImportError:  # numpy is optional
    np = None


def capture_rng_state() -> dict[str, Any]:
    """This process's random generators: Python, NumPy (if installed), torch CPU and CUDA."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if np is not None:
        kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
        state["numpy"] = {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    numpy_state = state.get("numpy")
    if np is not None and numpy_state is not None:
        keys = numpy_state["keys"].numpy().astype(np.uint32)
        np.random.set_state(
            (
                numpy_state["kind"],
                keys,
                numpy_state["pos"],
                numpy_state["has_gauss"],
                numpy_state["cached_gaussian"],
            )
        )
    cuda_states = state.get("cuda")
    if cuda_states is not None and torch.cuda.is_available():
        count = min(len(cuda_states), torch.cuda.device_count())
        for device in range(count):
            torch.cuda.set_rng_state(cuda_states[device], device)


def gather_rng_states(world_size: int) -> list[dict[str, Any]]:
    """Every rank's RNG state, indexed by rank (collective; the result is the same on all ranks)."""
    mine = capture_rng_state()
    if world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return [mine]
    states: list[Any] = [None] * world_size
    dist.all_gather_object(states, mine)
    return states


def rng_state_for_rank(states: list[dict[str, Any]], rank: int) -> dict[str, Any]:
    """This rank's saved RNG state. A run resumed on a different number of ranks cannot
    replay randomness exactly; it then reuses the saved states round-robin and says so."""
    if rank < len(states) and len(states) > 0:
        return states[rank]
    if not states:
        raise UserError("the recipe state holds no RNG states; resume from a checkpoint this library wrote")
    log.warning(
        "checkpoint holds RNG states for %d ranks but this is rank %d; random draws will differ from "
        "an uninterrupted run",
        len(states),
        rank,
    )
    return states[rank % len(states)]


def save_recipe_state(path: Path | str, state: dict[str, Any]) -> None:
    """Write `state` (plus `format_version`) to `path`, replacing any old file atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save({**state, "format_version": RECIPE_STATE_VERSION}, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_recipe_state(path: Path | str) -> dict[str, Any]:
    """Read a state written by `save_recipe_state`, on CPU."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe state file {path} does not exist; resume from a complete checkpoint directory")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot read recipe state {path} ({reason}); resume from another checkpoint") from None
    version = state.get("format_version") if isinstance(state, dict) else None
    if version != RECIPE_STATE_VERSION:
        raise UserError(
            f"recipe state {path} has format version {version}, this library reads {RECIPE_STATE_VERSION}; "
            "resume with the finetune version that wrote it"
        )
    return state


def claim_output_dir(output_dir: Path | str, resume: bool) -> OutputDirLock:
    """Make `output_dir` and lock it for this run, refusing a folder another run holds and a
    fresh run over an earlier run's checkpoints.

    A fresh run there would mix its metrics with the old ones, prune the old run's checkpoints
    (or its own, by step number), and a later resume would pick whichever step is highest. The
    lock comes before anything is read or written there (see output_lock); the caller releases
    it when the run ends.
    """
    root = Path(output_dir)
    if root.exists() and not root.is_dir():
        raise UserError(f"output_dir {root} is a file, not a directory; choose another output_dir")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output_dir {root} ({e.strerror}); choose a writable output_dir") from None
    if not os.access(root, os.W_OK):
        raise UserError(f"output_dir {root} is not writable; choose a writable output_dir")
    lock = lock_output_dir(root)
    existing = list_checkpoints(root)
    if existing and not resume:
        lock.release()
        raise UserError(
            f"output_dir {root} already holds checkpoints of an earlier run ({', '.join(p.name for p in existing)}); "
            "set resume_from_checkpoint=true to continue it, or choose another output_dir"
        )
    return lock


def find_resume_checkpoint(output_dir: Path | str, log: Callable[[str], None], lora: bool = False) -> Optional[Path]:
    """The newest complete `step_<N>` in `output_dir`, or None (said once) on a first start.

    A LoRA run's checkpoint holds an adapter and a full run's a model: each resumes only under
    its own recipe.
    """
    checkpoint = latest_checkpoint(output_dir)
    if checkpoint is None:
        log(f"resume_from_checkpoint: no checkpoint in {output_dir} yet, starting from step 0")
        return None
    if (checkpoint / "adapter_config.json").is_file() != lora:
        kind, recipe = (
            ("a LoRA", "lora_finetune_single_device")
            if not lora
            else ("a full fine-tune", "full_finetune_single_device")
        )
        raise UserError(
            f"{checkpoint} is a checkpoint of {kind} run; resume it with {recipe} (or its _distributed alias), "
            "or choose another output_dir"
        )
    log(f"resuming from {checkpoint}")
    return checkpoint


def check_resume_settings(checkpoint: Path, params: Any, keys: Sequence[str]) -> None:
    """Refuse settings that changed since `checkpoint` was saved and would change what resumes
    (an adapter's scale, say): a resumed run continues the same run."""
    saved_file = checkpoint / "params.yaml"
    if not saved_file.is_file():
        return
    saved = yaml.safe_load(saved_file.read_text(encoding="utf-8")) or {}
    for key in keys:
        if key in saved and saved[key] != getattr(params, key):
            raise UserError(
                f"{key} is {getattr(params, key)!r} but {checkpoint} was trained with {saved[key]!r}; "
                "a resumed run keeps "
                f"its settings: set {key}={saved[key]}, or start a new run in another output_dir"
            )


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed python, numpy and torch (CPU and CUDA) for this rank: same seed, same run.

    Ranks get different streams (seed + rank) so their dropout masks differ; the data order
    does not depend on this, it comes from the sampler's own seed.
    """
    seed = seed + rank
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if np is not None:
        np.random.seed(seed % 2**32)
