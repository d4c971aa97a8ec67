"""Checks on where a training run writes, made when its params are: an output_dir among the files
the run reads, and a `resume_from_checkpoint` that names no checkpoint of output_dir."""

from __future__ import annotations

import re
from pathlib import Path

from finetune.errors import UserError

STEP_NAME = re.compile(r"^step_(\d+)$")  # a checkpoint folder; the group is its step


def checked_resume_from(value: bool | str, output_dir: Path) -> bool | str:
    """true/false, or the `step_<N>` name of a checkpoint of `output_dir` (a path to one is cut to its name)."""
    if isinstance(value, bool):
        return value
    path = Path(value.strip()).expanduser()
    if not STEP_NAME.match(path.name):
        raise UserError(
            f"resume_from_checkpoint={value!r} is not understood; write true (the newest checkpoint in output_dir), "
            "false, or step_<N> (that checkpoint of output_dir, e.g. step_40)"
        )
    if len(path.parts) > 1 and path.parent.resolve() != output_dir.resolve():
        raise UserError(
            f"resume_from_checkpoint={value} is not in output_dir {output_dir}; a run resumes only its own "
            "checkpoints: set output_dir to that run's folder, or start from those weights with checkpoint_dir"
        )
    return path.name


def check_output_dir_apart(output_dir: Path, sources: dict[str, tuple[str, Path]]) -> None:
    """Refuse an output_dir that is, or is inside, a folder the run reads (the model's, the
    tokenizer's, a dataset folder) or is the folder of a file it reads: its checkpoints, metrics and
    params.yaml would land among the source files. `sources`: key -> (value as given, its path).
    A checkpoint_dir that is a `step_<N>` of output_dir is refused too: the run's own saves and
    keep_last_n_checkpoints would replace or delete it."""
    out = output_dir.resolve()
    for key, (value, path) in sources.items():
        if not path.exists():  # a Hub dataset name, or a path the run checks when it reads it
            continue
        source = path.resolve()
        folder, inside_too = (source, True) if source.is_dir() else (source.parent, False)
        if out == folder or (inside_too and folder in out.parents):
            where = "is" if out == folder else "is inside"
            what = "the folder" if source.is_dir() else "the folder of"
            raise UserError(
                f"output_dir {output_dir} {where} {what} {key}={value}: the run would write its checkpoints and "
                "logs among those files; choose an output_dir outside it"
            )
        if key == "checkpoint_dir" and source.parent == out and STEP_NAME.match(source.name):
            raise UserError(
                f"checkpoint_dir={value} is a checkpoint of output_dir {output_dir}, which this run's saves and "
                "keep_last_n_checkpoints replace or delete; copy it out of output_dir first, or choose another "
                "output_dir"
            )
