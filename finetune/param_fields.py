"""What every Params dataclass is built from: fields with a help line, `pkg:` paths, the checks
`__post_init__` runs, and `ParamsIO` (YAML in and out, the notes `tune validate` adds).

The Params themselves live in `finetune/params.py`, which re-exports the names users import.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml

from finetune.config.coercion import describe_type, matches_type
from finetune.config.parser import TuneArgumentParser
from finetune.data.sources import FILE_SUFFIXES
from finetune.data.templates import get_template
from finetune.errors import UserError

# Paths starting with this prefix point inside the installed package (the demo data and
# tokenizer ship there), so configs work from any working directory.
PACKAGE_PREFIX = "pkg:"


def param(default: Any, help: str, hint: str = "") -> Any:
    """A dataclass field with a one-line help text (shown by `--help`) and an optional hint
    added to the message when a value of the wrong type or choice is given."""
    metadata = {"help": help, "hint": hint}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


# What a scheduler watches, the same keys for every training run and the dummy's.
def heartbeat_param() -> Any:
    return param(5.0, "how often status.json's heartbeat is refreshed")


def events_webhook_param() -> Any:
    return param(None, "POST each events.jsonl record as JSON to this URL (never blocks training)")


def events_redis_url_param() -> Any:
    return param(None, "publish each events.jsonl record to this Redis (redis://host:port/db)")


def events_redis_channel_param() -> Any:
    return param("finetune.events", "the Redis pub/sub channel for events_redis_url")


def resolve_path(path: str) -> Path:
    """Turn a path from params into a real path: `pkg:...` is relative to the package."""
    if path.startswith(PACKAGE_PREFIX):
        return Path(__file__).parent / path[len(PACKAGE_PREFIX) :]  # the finetune package
    return Path(path).expanduser()


def require(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise UserError(f"{name}={value!r} is not allowed; choose one of {', '.join(map(str, choices))}{hint}")


def check_field_types(params: Any) -> None:
    """Check every field against its annotation, so notebook-built params fail like CLI ones."""
    hints = typing.get_type_hints(type(params))
    for f in dataclasses.fields(params):
        value = getattr(params, f.name)
        expected = hints[f.name]
        if isinstance(value, os.PathLike) and matches_type("", expected):  # a notebook's pathlib.Path
            value = os.fspath(value)
            setattr(params, f.name, value)
        hint = f" ({f.metadata['hint']})" if f.metadata.get("hint") else ""
        try:
            if typing.get_origin(expected) is Literal:
                check_choice(f.name, value, typing.get_args(expected))
            elif typing.get_origin(expected) is list and typing.get_origin(typing.get_args(expected)[0]) is Literal:
                for item in value if isinstance(value, list) else []:
                    check_choice(f.name, item, typing.get_args(typing.get_args(expected)[0]))
        except UserError as e:
            raise UserError(f"{e}{hint}") from None
        if not matches_type(value, expected):
            raise UserError(f"{f.name}={value!r} has the wrong type; expected {describe_type(expected)}{hint}")


# Fields naming local files or folders a run reads, which `tune validate` looks for.
_PATH_KEYS = (
    "checkpoint_dir",
    "tokenizer_path",
    "adapter_dir",
    "dataset",
    "eval_dataset",
    "calibration_dataset",
    "prompt_file",
)


def field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


class ParamsIO:
    """YAML in and out, shared by every Params dataclass (data only, no recipe behaviour)."""

    def check(self) -> None:
        """Check every field again: a notebook may have changed one since the params were built."""
        self.__post_init__()  # type: ignore[attr-defined]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Sequence[str] = ()):  # noqa: ANN206
        argv = ["--config", str(path), *overrides]
        return TuneArgumentParser(cls).parse_args(argv)

    def check_before_run(self) -> list[str]:
        """What `tune validate` checks beyond construction. An unknown instruct template raises; local
        paths a run would read but this machine lacks come back as notes (configs may be validated
        away from the machine that runs them, so these do not fail validation)."""
        if getattr(self, "dataset_type", None) == "instruct":
            get_template(self.template)  # type: ignore[attr-defined]
        notes = []
        for key in _PATH_KEYS:
            value = getattr(self, key, None)
            if not isinstance(value, str) or not value:
                continue
            # A dataset without a file suffix or a path prefix may be a Hub name.
            local = (
                "dataset" not in key
                or value.startswith((PACKAGE_PREFIX, ".", "/", "~"))
                or Path(value).suffix.lower() in FILE_SUFFIXES
            )
            if local and not resolve_path(value).exists():
                notes.append(f"note: {key}={value} does not exist on this machine")
        return notes

    def __str__(self) -> str:
        width = max(len(f.name) for f in dataclasses.fields(self))  # type: ignore[arg-type]
        lines = [f"{type(self).__name__}:"]
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            lines.append(f"  {f.name:<{width}} = {getattr(self, f.name)!r}")
        return "\n".join(lines)
