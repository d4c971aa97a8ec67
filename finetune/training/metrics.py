"""Metric loggers: every logger has `log(step, metrics)` and `close()`.

`metrics.jsonl` is always written (one JSON object per line: step, wall time, metrics) and is
appended to on resume, after the records of the steps past the checkpoint are dropped
(`drop_records_after`: those steps are trained again), so a resumed run's file reads as one
uninterrupted run. TensorBoard purges the same steps. Weights & Biases is an optional extra.
Only rank 0 logs.
"""

import json
import time
from pathlib import Path
from typing import Any, Optional

from finetune.checkpointing.atomic import atomic_write_text
from finetune.errors import UserError

LOGGERS = ("jsonl", "tensorboard", "wandb")


class JsonlLogger:
    def __init__(self, output_dir: Path | str, filename: str = "metrics.jsonl") -> None:
        path = Path(output_dir)
        path.mkdir(parents=True, exist_ok=True)
        self.path = path / filename
        self._file = open(self.path, "a", encoding="utf-8")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, "time": time.time(), **{k: float(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        # Flush per record: a crashed run keeps every metric logged before the crash.
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def drop_records_after(path: Path, step: int) -> int:
    """Keep the records of `path` up to `step`, replacing the file atomically; return how many
    were dropped. A line cut short by a kill mid-write is dropped too."""
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    kept = [line for line in lines if _step_of_record(line) is not None and _step_of_record(line) <= step]
    if len(kept) < len(lines):
        atomic_write_text(path, "".join(f"{line}\n" for line in kept))
    return len(lines) - len(kept)


def _step_of_record(line: str) -> Optional[int]:
    try:
        step = json.loads(line).get("step")
    except (ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


class TensorBoardLogger:
    def __init__(self, output_dir: Path | str, subdir: str = "tensorboard", resume_step: Optional[int] = None) -> None:
        # tensorboard is optional and slow to import: only metric_logger_type=tensorboard needs it.
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(output_dir) / subdir
        # A resumed run hides what the interrupted one logged past its checkpoint.
        purge_step = None if resume_step is None else resume_step + 1
        self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge_step)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self._writer.add_scalar(name, float(value), global_step=step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbLogger:
    def __init__(
        self, output_dir: Path | str, *, project: str = "finetune", config: Optional[dict[str, Any]] = None
    ) -> None:
        try:
            import wandb  # optional: only metric_logger_type=wandb needs it
        except ImportError:
            raise UserError(
                "metric_logger_type=wandb needs the wandb package, which is not installed; "
                "run `pip install wandb` or use metric_logger_type=tensorboard"
            ) from None
        self._wandb = wandb
        self._run = wandb.init(project=project, dir=str(output_dir), config=config, resume="allow")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self._run.log({k: float(v) for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        self._run.finish()


def build_metric_loggers(kind: str, output_dir: Path | str, *, rank: int, resume_step: Optional[int] = None) -> list:
    """jsonl always, plus `kind` when it is tensorboard or wandb; an empty list off rank 0.
    `resume_step`: the checkpoint's step a resumed run continues after."""
    if kind not in LOGGERS:
        raise UserError(f"unknown metric_logger {kind!r}; use one of: {', '.join(LOGGERS)}")
    if rank != 0:
        return []
    loggers: list = [JsonlLogger(output_dir)]
    if kind == "tensorboard":
        loggers.append(TensorBoardLogger(output_dir, resume_step=resume_step))
    elif kind == "wandb":
        loggers.append(WandbLogger(output_dir))
    return loggers
