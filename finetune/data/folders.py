"""Which files of a local dataset folder make up one subset and split.

A folder is read as the Hugging Face Hub reads a dataset repository, so a local snapshot
(`huggingface-cli download --repo-type dataset`) loads like the Hub name would:

- README.md's YAML front matter, when it has `configs:`, names each subset (`config_name`)
  and the files of each of its splits (glob patterns, `**` crossing folders).
- Otherwise file and folder names say the split: `<split>-00000-of-00003.parquet` belongs to
  exactly `<split>` (e.g. `train_sft`); a name starting with a keyword (`train`, `valid`,
  `dev`, `test`, `eval`, ...) belongs to that keyword's split; a folder where no name says a
  split is all 'train'. `dataset_subset` then picks a subfolder.

Subsets are never mixed silently: a split found in several subset-like subfolders (`main/`,
`socratic/` in openai/gsm8k) must be narrowed with `dataset_subset`.
"""

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from finetune.errors import UserError

# The split each keyword in a file or folder name stands for, as on the Hub.
_KEYWORDS = {
    "train": "train",
    "training": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
    "testing": "test",
    "eval": "test",
    "evaluation": "test",
}
# Longest first, so that 'training_x' is read as 'training' and not rejected after 'train'.
_KEYWORD_RE = re.compile(r"^(%s)(?:$|[-_. 0-9])" % "|".join(sorted(_KEYWORDS, key=len, reverse=True)))
_SHARD_RE = re.compile(r"^(\w+(?:\.\w+)*)-\d+-of-\d+(?:[-_.]|$)")
_SUBSET_KEY = "dataset_subset"


@dataclass
class _Config:
    """One `configs:` entry of README.md: a subset and the patterns of each of its splits."""

    name: str
    default: bool
    base: Path  # the folder, or its `data_dir`
    splits: Optional[dict[str, list[str]]]  # None: no data_files, split by names under `base`


def canonical_split(name: str) -> str:
    """The split a requested name means: 'valid' -> 'validation', 'eval' -> 'test'; any
    other name stays as it is ('train_sft')."""
    return _KEYWORDS.get(name.lower(), name)


def split_files(
    folder: Path,
    split: str,
    *,
    subset: Optional[str] = None,
    split_key: str = "split",
    suffixes: tuple[str, ...],
) -> list[Path]:
    """The data files (ending in one of `suffixes`) of `subset`'s `split` in `folder`.

    `split` is a bare split name (no slice); `split_key` is the parameter it came from, named
    in messages.
    """
    configs = read_configs(folder)
    if configs is not None:
        return _config_files(folder, configs, split, subset, split_key, suffixes)
    if subset is not None:
        folder = _subset_folder(folder, subset, suffixes)
    return _named_split_files(folder, split, split_key, suffixes)


def read_configs(folder: Path) -> Optional[list[_Config]]:
    """The `configs:` of `folder`/README.md's YAML front matter, or None when it has none."""
    readme = folder / "README.md"
    if not readme.is_file():
        return None
    lines = readme.read_text(encoding="utf-8", errors="replace").lstrip("\ufeff").split("\n")
    if lines[0].strip() != "---":
        return None
    end = next((i for i in range(1, len(lines)) if lines[i].strip() == "---"), None)
    if end is None:
        return None
    front = "\n".join(lines[1:end])
    # A README whose front matter says nothing of configs must not stop a run over its YAML.
    if not re.search(r"^configs\s*:", front, re.MULTILINE):
        return None
    try:
        meta = yaml.safe_load(front)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 2}" if mark is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise UserError(f"{readme}{where}: the YAML front matter is not valid ({problem}); fix it") from None
    entries = meta.get("configs") if isinstance(meta, dict) else None
    if not isinstance(entries, list) or not entries:
        raise UserError(
            f"{readme}: 'configs' must be a list of entries with config_name and data_files; fix the front matter"
        )
    return [_parse_config(folder, readme, i, entry) for i, entry in enumerate(entries, start=1)]


def _parse_config(folder: Path, readme: Path, index: int, entry: Any) -> _Config:
    if not isinstance(entry, dict) or entry.get("config_name") is None:
        raise UserError(
            f"{readme}: configs entry {index} has no config_name; give every entry a config_name (and data_files)"
        )
    name = str(entry["config_name"])
    where = f"{readme}: data_files of config '{name}'"
    data_dir = entry.get("data_dir")
    base = folder / str(data_dir) if data_dir else folder
    value = entry.get("data_files")
    if value is None:
        splits = None
    elif isinstance(value, dict):
        splits = {str(s): _patterns(p, f"{where}, split '{s}'") for s, p in value.items()}
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        splits = {}
        for item in value:
            if "split" not in item or "path" not in item:
                raise UserError(
                    f"{where} has an entry without 'split' or 'path' ({item!r}); "
                    "write entries like {split: train, path: data/train-*}"
                )
            splits.setdefault(str(item["split"]), []).extend(
                _patterns(item["path"], f"{where}, split '{item['split']}'")
            )
    else:
        # Patterns without a split are the 'train' split, as on the Hub.
        splits = {"train": _patterns(value, where)}
    return _Config(name=name, default=entry.get("default") is True, base=base, splits=splits)


def _patterns(value: Any, where: str) -> list[str]:
    if isinstance(value, str) and value:
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return list(value)
    raise UserError(f"{where} must be a file pattern or a list of them, got {value!r}; fix README.md")


def _config_files(
    folder: Path,
    configs: list[_Config],
    split: str,
    subset: Optional[str],
    split_key: str,
    suffixes: tuple[str, ...],
) -> list[Path]:
    names = ", ".join(c.name for c in configs)
    if subset is not None:
        config = next((c for c in configs if c.name == subset), None)
        if config is None:
            raise UserError(
                f"dataset folder {folder} has no subset '{subset}'; subsets found (configs in "
                f"its README.md): {names}; pick one with {_SUBSET_KEY}"
            )
    elif len(configs) == 1:
        config = configs[0]
    else:
        config = next((c for c in configs if c.default), None)
        if config is None:
            raise UserError(
                f"dataset folder {folder} has {len(configs)} subsets (configs in its README.md) "
                f"and none is the default: {names}; pick one with {_SUBSET_KEY}"
            )
    if config.splits is None:
        return _named_split_files(config.base, split, split_key, suffixes)
    name = _config_split(config, split)
    if name is None:
        raise UserError(
            f"subset '{config.name}' of dataset folder {folder} has no split '{split}'; "
            f"splits found: {', '.join(config.splits)}; pick one with {split_key}"
        )
    files: dict[Path, None] = {}  # ordered and without repeats when patterns overlap
    for pattern in config.splits[name]:
        matched = _glob(config.base, pattern, suffixes)
        if not matched:
            raise UserError(
                f"{folder / 'README.md'}: pattern '{pattern}' (subset '{config.name}', split "
                f"'{name}') matches no data files ending in {', '.join(suffixes)} under "
                f"{config.base}; fix the pattern or download the missing files"
            )
        files.update(dict.fromkeys(matched))
    return list(files)


def _config_split(config: _Config, split: str) -> Optional[str]:
    """The config's split named `split`, else the only one with the same meaning
    ('valid' finds 'validation')."""
    assert config.splits is not None
    if split in config.splits:
        return split
    same = [s for s in config.splits if canonical_split(s) == canonical_split(split)]
    return same[0] if len(same) == 1 else None


def _glob(base: Path, pattern: str, suffixes: tuple[str, ...]) -> list[Path]:
    # On the Hub a trailing '**' matches files too; pathlib's matches folders only.
    if pattern.endswith("**"):
        pattern += "/*"
    try:
        found = sorted(base.glob(pattern))
    except (NotImplementedError, ValueError) as e:
        raise UserError(
            f"data_files pattern '{pattern}' in {base} cannot be used ({e}); "
            "write patterns relative to the dataset folder"
        ) from None
    return [p for p in found if p.is_file() and p.suffix.lower() in suffixes and _visible(p, base)]


def _visible(path: Path, root: Path) -> bool:
    """False for files in hidden folders such as the `.cache/` a Hub download leaves."""
    try:
        parts = path.relative_to(root).parts
    except ValueError:
        return True
    return not any(part.startswith(".") for part in parts)


def _data_files(root: Path, suffixes: tuple[str, ...]) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in suffixes and _visible(p, root))


def _split_of(relative: Path) -> Optional[str]:
    """The split a file's name (or else its nearest split-named folder) says, or None."""
    shard = _SHARD_RE.match(relative.name)
    if shard:
        return canonical_split(shard.group(1))
    for part in (relative.name, *reversed(relative.parts[:-1])):
        keyword = _KEYWORD_RE.match(part.lower())
        if keyword:
            return _KEYWORDS[keyword.group(1)]
    return None


def _named_split_files(root: Path, split: str, split_key: str, suffixes: tuple[str, ...]) -> list[Path]:
    files = _data_files(root, suffixes)
    if not files:
        raise UserError(f"dataset folder {root} holds no data files; add files ending in {', '.join(suffixes)}")
    named = {file: _split_of(file.relative_to(root)) for file in files}
    wanted = canonical_split(split)
    if not any(named.values()):
        chosen = files if wanted == "train" else []
    else:
        chosen = [file for file, name in named.items() if name == wanted]
    found = sorted({name for name in named.values() if name}) or ["train"]
    if not chosen:
        raise UserError(
            f"dataset folder {root} has no '{split}' files; splits found: {', '.join(found)}; pick one with {split_key}"
        )
    if any(named.values()):
        _refuse_mixed_subsets(root, chosen, split, set(found))
    return chosen


def _refuse_mixed_subsets(root: Path, chosen: list[Path], split: str, splits: set[str]) -> None:
    """Stop when one split's files lie in several subset-like subfolders (gsm8k's `main/`
    and `socratic/`): merging them would train on two datasets at once."""
    parts = [file.relative_to(root).parts for file in chosen]
    tops = {p[0] for p in parts if len(p) > 1}
    subsets = sorted(top for top in tops if _may_be_subset(top) and top not in splits)
    if len(subsets) >= 2:
        raise UserError(
            f"dataset folder {root} has '{split}' files in the subfolders {', '.join(subsets)}, "
            f"which look like subsets of the dataset; pick one with {_SUBSET_KEY} "
            f"(e.g. {_SUBSET_KEY}={subsets[0]})"
        )


def _may_be_subset(folder_name: str) -> bool:
    """Whether a top-level folder can be a subset: not hidden, not the Hub's `data/`, not a split."""
    return not folder_name.startswith(".") and folder_name != "data" and not _KEYWORD_RE.match(folder_name.lower())


def _subset_folder(folder: Path, subset: str, suffixes: tuple[str, ...]) -> Path:
    candidate = folder / subset
    inside = not Path(subset).is_absolute() and ".." not in Path(subset).parts
    if inside and candidate.is_dir():
        return candidate
    found = sorted(
        d.name for d in folder.iterdir() if d.is_dir() and _may_be_subset(d.name) and _data_files(d, suffixes)
    )
    if not found:
        raise UserError(
            f"dataset folder {folder} has no subsets (no configs in a README.md and no "
            f"subfolders of data files), asked for {_SUBSET_KEY}={subset}; unset {_SUBSET_KEY}"
        )
    raise UserError(
        f"dataset folder {folder} has no subset '{subset}'; subsets (subfolders) found: "
        f"{', '.join(found)}; pick one with {_SUBSET_KEY}"
    )
