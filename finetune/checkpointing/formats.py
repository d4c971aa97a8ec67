"""Which checkpoint format a directory holds, and which of its files carry the weights."""

import json
import os
from pathlib import Path
from typing import Any, Union

from finetune.errors import UserError

PathLike = Union[str, os.PathLike]

FORMATS = ("hf", "meta")
CHECKPOINT_FORMATS = ("auto", *FORMATS)  # what a config's checkpoint_format may say
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


def describe_listing(names: list[str], limit: int = 8) -> str:
    """'a, b, c and 5 more' for error messages."""
    if not names:
        return "nothing"
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


def checkpoint_directory(checkpoint_dir: PathLike) -> Path:
    directory = Path(checkpoint_dir)
    if not directory.exists():
        raise UserError(f"checkpoint directory {directory} does not exist; check the path")
    if not directory.is_dir():
        raise UserError(f"checkpoint path {directory} is not a directory; pass the directory that holds the weights")
    return directory


def _is_hf_weight_file(path: Path) -> bool:
    name = path.name
    if name.startswith("adapter_model"):  # a PEFT adapter, not a model
        return False
    return name.endswith(".safetensors") or (name.startswith("pytorch_model") and name.endswith(".bin"))


def _is_meta_weight_file(path: Path) -> bool:
    return path.name.startswith("consolidated.") and path.name.endswith(".pth")


def detect_format(checkpoint_dir: PathLike) -> str:
    """ "hf" (safetensors / pytorch_model*.bin) or "meta" (consolidated.NN.pth)."""
    directory = checkpoint_directory(checkpoint_dir)
    files = sorted(p for p in directory.iterdir() if p.is_file())
    if any(_is_hf_weight_file(p) for p in files) or (directory / SAFETENSORS_INDEX).is_file():
        return "hf"
    if any(_is_meta_weight_file(p) for p in files):
        return "meta"
    found = sorted(p.name for p in directory.iterdir())
    if "adapter_config.json" in found:
        merged = f"{directory / 'merged'} (the merged model) or " if (directory / "merged").is_dir() else ""
        raise UserError(
            f"{directory} holds a LoRA adapter, not a model: point checkpoint_dir at {merged}the base model; "
            f"generate and eleuther_eval apply the adapter with adapter_dir={directory}"
        )
    raise UserError(
        f"no checkpoint found in {directory}: expected model*.safetensors or pytorch_model*.bin (Hugging Face) "
        f"or consolidated.NN.pth (Meta), found {describe_listing(found)}"
    )


def read_json(path: Path) -> dict[str, Any]:
    """A checkpoint's JSON object file (config, params, weight index), or one UserError line saying what is wrong."""
    if not path.is_file():
        raise UserError(f"{path} not found; the checkpoint directory needs it to describe the model")
    try:
        with open(path, encoding="utf-8") as f:
            values = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON (line {e.lineno}: {e.msg}); fix or re-download it") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; fix or re-download it") from None
    if not isinstance(values, dict):
        raise UserError(f"{path} must hold a JSON object, found {type(values).__name__}; fix or re-download it")
    return values


def check_format_name(checkpoint_format: str) -> str:
    if checkpoint_format not in CHECKPOINT_FORMATS:
        *first, last = map(repr, CHECKPOINT_FORMATS)
        raise UserError(f"checkpoint_format {checkpoint_format!r} is unknown; use {', '.join(first)} or {last}")
    return checkpoint_format


def _files_from_index(directory: Path, index_name: str) -> list[Path]:
    index_path = directory / index_name
    index = read_json(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise UserError(f"{index_path} has no 'weight_map' object; fix or re-download the index")
    files = []
    for file_name in sorted(set(weight_map.values())):
        path = directory / str(file_name)
        if not path.is_file():
            raise UserError(f"shard {path.name} listed in {index_path} is missing; re-download the checkpoint")
        files.append(path)
    return files


def hf_weight_files(directory: Path) -> list[Path]:
    """Weight files of a Hugging Face checkpoint, safetensors preferred over .bin."""
    if (directory / SAFETENSORS_INDEX).is_file():
        return _files_from_index(directory, SAFETENSORS_INDEX)
    if (directory / "model.safetensors").is_file():
        return [directory / "model.safetensors"]
    safetensors = sorted(p for p in directory.glob("*.safetensors") if _is_hf_weight_file(p))
    if safetensors:
        return safetensors
    if (directory / BIN_INDEX).is_file():
        return _files_from_index(directory, BIN_INDEX)
    bins = sorted(p for p in directory.glob("pytorch_model*.bin") if p.is_file())
    if bins:
        return bins
    found = sorted(p.name for p in directory.iterdir())
    raise UserError(
        f"no Hugging Face weights in {directory}: expected model.safetensors, model-*.safetensors or "
        f"pytorch_model*.bin, found {describe_listing(found)}"
    )


def meta_weight_files(directory: Path) -> list[Path]:
    """consolidated.00.pth, consolidated.01.pth, ... (several = a model-parallel split)."""
    files = sorted(p for p in directory.glob("consolidated.*.pth") if p.is_file())
    if not files:
        found = sorted(p.name for p in directory.iterdir())
        raise UserError(
            f"no Meta weights in {directory}: expected consolidated.00.pth, found {describe_listing(found)}"
        )
    return files
