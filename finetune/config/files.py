"""Config files: where the built-in configs are, how a config name or path resolves, reading one.

A config is a flat YAML mapping of Params keys. A name (`tiny_full`) means a file in the built-in
configs folder; anything that is a file is read as it is.
"""

from __future__ import annotations

import difflib
import os
import sysconfig
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from finetune.errors import UserError

SOURCE_TREE_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def builtin_config_dir(source_tree: Path = SOURCE_TREE_CONFIGS, data_roots: Optional[Sequence[Path]] = None) -> Path:
    """configs/ beside the package in a source checkout, else the copy a regular install puts under share/."""
    if source_tree.is_dir():
        return source_tree
    if data_roots is None:
        schemes = [sysconfig.get_default_scheme(), f"{os.name}_user"]
        data_roots = [Path(sysconfig.get_path("data", scheme)) for scheme in schemes]
    installed = [root / "share" / "finetune" / "configs" for root in data_roots]
    return next((d for d in installed if d.is_dir()), source_tree)


CONFIG_DIR = Path(os.environ.get("FINETUNE_CONFIG_DIR") or builtin_config_dir())


def resolve_config_path(config: str) -> Path:
    """A config name from configs/ (with or without .yaml) or a path to a YAML file."""
    path = Path(config).expanduser()
    if path.is_file():
        return path
    named = CONFIG_DIR / (config if config.endswith(".yaml") else f"{config}.yaml")
    if named.is_file() and os.sep not in config:
        return named
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    close = difflib.get_close_matches(config, names, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise UserError(
        f"config '{config}' not found (no such file, and not a config name); {hint}"
        f"configs: {', '.join(names) or 'none'}"
    )


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML itself keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)  # type: ignore[no-untyped-call]
            line = key_node.start_mark.line + 1
            if isinstance(key, (str, int, float, bool)) and key in seen:
                lines = f"line {line}" if seen[key] == line else f"lines {seen[key]} and {line}"
                raise _DuplicateKey(f"key '{key}' is given twice ({lines})", line)
            if isinstance(key, (str, int, float, bool)):
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


class _DuplicateKey(Exception):
    def __init__(self, problem: str, line: int) -> None:
        super().__init__(problem)
        self.problem, self.line = problem, line


def read_config(path: Path) -> dict[str, Any]:
    """The mapping a YAML config holds; a malformed file, or a key given twice, is one UserError
    naming the line."""
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except _DuplicateKey as exc:
        raise UserError(f"{path}, line {exc.line}: {exc.problem}; keep one of them") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise UserError(f"malformed YAML in {where}: {problem}; fix the file") from None
    except UnicodeDecodeError:
        raise UserError(f"config {path} is not UTF-8 text; save it as UTF-8") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config {path} must be a mapping of key: value lines, found a {type(data).__name__}")
    return data
