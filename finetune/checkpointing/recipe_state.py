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
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
import yaml

from finetune.checkpointing.atomic import list_checkpoints
from finetune.checkpointing.output_lock import OutputDirLock, lock_output_dir
from finetune.checkpointing.torch_files import save_torch_file
from finetune.errors import UserError

log = logging.getLogger(__name__)

RECIPE_STATE_VERSION = 1
RECIPE_STATE_FILE = "recipe_state.pt"  # its name in a step_<N> folder

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
        save_torch_file({**state, "format_version": RECIPE_STATE_VERSION}, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_recipe_state(
    path: Path | str, mmap: bool = False, advice: str = "resume from another checkpoint"
) -> dict[str, Any]:
    """Read a state written by `save_recipe_state`, on CPU (memory-mapped with `mmap`).

    A damaged or foreign file is one line saying so, ending in `advice`; torch's own text (which
    suggests `weights_only=False`, the one thing not to do with a file of unknown origin) is not shown.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe state file {path} does not exist; resume from a complete checkpoint directory")
    if not zipfile.is_zipfile(path):  # every torch.save since torch 1.6 is a zip archive
        raise UserError(f"cannot read recipe state {path} (it is truncated or damaged); {advice}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        raise UserError(
            f"cannot read recipe state {path} (it holds objects other than tensors and plain values, so it was "
            f"not written by finetune, or was altered; it is not loaded); {advice}"
        ) from None
    except Exception:  # torch raises assorted types for a damaged archive
        raise UserError(f"cannot read recipe state {path} (it is truncated or damaged); {advice}") from None
    if not isinstance(state, dict):
        raise UserError(
            f"cannot read recipe state {path} (it holds a {type(state).__name__}, not a recipe state); {advice}"
        )
    version = state.get("format_version")
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


def choose_checkpoint(output_dir: Path | str, resume: bool | str = True) -> Optional[Path]:
    """The `step_<N>` folder `resume` names in `output_dir` (true: the newest), or None when a
    `true` resume finds none yet. A named step with newer ones beside it is refused: a later
    `resume_from_checkpoint=true` would pick a newer one, from the abandoned run."""
    checkpoints = list_checkpoints(output_dir)
    if resume is True:
        return checkpoints[-1] if checkpoints else None
    chosen = next((c for c in checkpoints if c.name == resume), None)
    if chosen is None:
        held = f"its checkpoints are {', '.join(c.name for c in checkpoints)}" if checkpoints else "it holds none"
        raise UserError(f"resume_from_checkpoint={resume}: there is no complete {resume} in {output_dir} ({held})")
    newer = checkpoints[checkpoints.index(chosen) + 1 :]
    if newer:
        raise UserError(
            f"resume_from_checkpoint={resume}: {output_dir} also holds the newer {', '.join(c.name for c in newer)}, "
            "which a later resume_from_checkpoint=true would continue instead; move them out of output_dir "
            "(or delete them), then run again"
        )
    return chosen


def check_checkpoint_kind(checkpoint: Path, lora: bool) -> None:
    """A LoRA run's checkpoint holds an adapter and a full run's a model: each resumes only under
    its own recipe."""
    if (checkpoint / "adapter_config.json").is_file() != lora:
        kind, recipes = (
            ("a LoRA", "tune lora_finetune, or tune dpo with use_lora=true")
            if not lora
            else ("a full fine-tune", "tune full_finetune, or tune dpo with use_lora=false")
        )
        raise UserError(
            f"{checkpoint} is a checkpoint of {kind} run; resume it with the recipe that wrote it ({recipes}), "
            "or choose another output_dir"
        )


def find_resume_checkpoint(
    output_dir: Path | str, log: Callable[[str], None], lora: bool = False, resume: bool | str = True
) -> Optional[Path]:
    """The checkpoint `resume` names (true: the newest complete `step_<N>`), or None (said once)
    on a first start."""
    checkpoint = choose_checkpoint(output_dir, resume)
    if checkpoint is None:
        log(f"resume_from_checkpoint: no checkpoint in {output_dir} yet, starting from step 0")
        return None
    check_checkpoint_kind(checkpoint, lora)
    log(f"resuming from {checkpoint}")
    return checkpoint


def read_saved_params(checkpoint: Path) -> dict[str, Any]:
    """The params.yaml saved in `checkpoint` ({} without one: nothing to compare against)."""
    path = checkpoint / "params.yaml"
    if not path.is_file():
        return {}
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        raise UserError(
            f"{path} is damaged (not YAML), so this run's settings cannot be checked against it; "
            "restore it, or start a new run in another output_dir"
        ) from None
    return saved if isinstance(saved, dict) else {}


# Paths a user may have moved since: a saved one that no longer exists is not held against the run.
_PATH_KEYS = ("checkpoint_dir", "tokenizer_path", "dataset", "eval_dataset")


def changed_settings(saved: dict[str, Any], params: Any, keys: Sequence[str]) -> list[str]:
    """Which of `keys` `params` sets otherwise than the `saved` params.yaml of a checkpoint."""
    return [key for key in keys if key in saved and hasattr(params, key) and _differs(key, saved[key], params)]


def _differs(key: str, saved: Any, params: Any) -> bool:
    value = getattr(params, key)
    if key in _PATH_KEYS and isinstance(saved, str) and isinstance(value, str):
        if saved.startswith("pkg:") or value.startswith("pkg:"):
            return saved != value
        if os.path.normpath(os.path.expanduser(saved)) == os.path.normpath(os.path.expanduser(value)):
            return False
        return Path(saved).expanduser().exists()
    if isinstance(saved, (int, float)) and isinstance(value, (int, float)) and not isinstance(saved, bool):
        return float(saved) != float(value)
    return saved != value


def as_setting(value: Any) -> str:
    """A value as it is written on the command line (`key=<this>`)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, dict)):
        return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return str(value)


def check_resume_settings(
    checkpoint: Path, params: Any, keys: Sequence[str], saved: Optional[dict[str, Any]] = None
) -> None:
    """Refuse settings that changed since `checkpoint` was saved and would change what resumes
    (the data order, the model, an adapter's scale): a resumed run continues the same run. One
    line names the first such key, its saved and its new value (and the other changed keys)."""
    saved = read_saved_params(checkpoint) if saved is None else saved
    changed = changed_settings(saved, params, keys)
    if not changed:
        return
    key, others = changed[0], changed[1:]
    also = f" ({', '.join(others)} changed too)" if others else ""
    raise UserError(
        f"{key} is {getattr(params, key)!r} but {checkpoint} was trained with {saved[key]!r}{also}; a resumed run "
        f"keeps its settings: set {key}={as_setting(saved[key])}, or start a new run in another output_dir"
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
