"""LoRA adapters in Hugging Face PEFT's format, out and back in.

A PEFT adapter directory holds `adapter_model.safetensors` (tensors named after the HF model,
e.g. `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`) and `adapter_config.json`.
`PeftModel.from_pretrained(hf_model, dir)` loads what `save_peft_adapter` writes, and
`load_peft_adapter` reads PEFT's own LoRA/DoRA adapters for Llama models.
"""

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch

from finetune.checkpointing.key_mapping import from_hf_name, hf_module_name
from finetune.checkpointing.loader import expected_shapes
from finetune.checkpointing.safetensors_io import load_safetensors, save_safetensors
from finetune.errors import UserError
from finetune.models import ModelArgs
from finetune.models.lora import ATTN_MODULES

PathLike = Union[str, os.PathLike]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
MERGED_DIR = "merged"  # where the LoRA recipe writes base + adapter merged, beside the adapter
_PREFIX = "base_model.model."

# Tensor names inside an adapted module: ours -> PEFT's.
_TO_PEFT_LEAF = {
    "lora_a.weight": "lora_A.weight",
    "lora_b.weight": "lora_B.weight",
    "magnitude": "lora_magnitude_vector",
}
# PEFT versions have stored the DoRA magnitude with and without a ".weight" suffix.
_FROM_PEFT_LEAF = {
    **{theirs: ours for ours, theirs in _TO_PEFT_LEAF.items()},
    "lora_magnitude_vector.weight": "magnitude",
}

# Adaptable linears: our short module name -> the name PEFT's `target_modules` uses.
TARGET_MODULES = {
    "q_proj": "q_proj",
    "k_proj": "k_proj",
    "v_proj": "v_proj",
    "output_proj": "o_proj",
    "w1": "gate_proj",
    "w2": "down_proj",
    "w3": "up_proj",
    "output": "lm_head",
}
_TARGETS_FROM_HF = {theirs: ours for ours, theirs in TARGET_MODULES.items()}


def _split_leaf(name: str, leaves: Mapping[str, str]) -> Optional[tuple[str, str]]:
    """("layers.0.attn.q_proj", "lora_a.weight") for a tensor name ending in one of `leaves`."""
    for leaf in sorted(leaves, key=len, reverse=True):
        if name.endswith("." + leaf):
            return name[: -len(leaf) - 1], leaf
    return None


def peft_tensor_name(our_name: str) -> str:
    """ "layers.0.attn.q_proj.lora_a.weight" -> "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"."""
    split = _split_leaf(our_name, _TO_PEFT_LEAF)
    if split is None:
        raise ValueError(f"{our_name!r} is not an adapter tensor name (…lora_a.weight, …lora_b.weight or …magnitude)")
    module, leaf = split
    return f"{_PREFIX}{hf_module_name(module)}.{_TO_PEFT_LEAF[leaf]}"


def _hf_targets(target_modules: Sequence[str]) -> list[str]:
    unknown = [name for name in target_modules if name not in TARGET_MODULES]
    if unknown:
        raise UserError(
            f"unknown LoRA target module(s) {', '.join(map(repr, unknown))}; choose from {', '.join(TARGET_MODULES)}"
        )
    return sorted({TARGET_MODULES[name] for name in target_modules})


def adapter_config(
    *,
    rank: int,
    alpha: float,
    dropout: float,
    target_modules: Sequence[str],
    use_dora: bool,
    base_model_name_or_path: Optional[str] = None,
) -> dict[str, Any]:
    """adapter_config.json for a LoRA adapter on a causal LM. Only fields PEFT has long known, so
    older PEFT versions load it without "unexpected keyword" warnings; newer ones fill in defaults."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": _hf_targets(target_modules),
        "use_dora": use_dora,
        "use_rslora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }


def save_peft_adapter(
    adapter_state_dict: Mapping[str, torch.Tensor],
    out_dir: PathLike,
    *,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    target_modules: Optional[Sequence[str]] = None,
    use_dora: bool = False,
    base_model_name_or_path: Optional[str] = None,
) -> list[Path]:
    """Write adapter_model.safetensors and adapter_config.json into `out_dir`; returns the two paths.

    `adapter_state_dict` uses our names (`adapter_state_dict(model)`); `target_modules` our short
    module names (q_proj, output_proj, w1, output, ...), by default those the tensors belong to.
    """
    tensors = {peft_tensor_name(name): tensor for name, tensor in adapter_state_dict.items()}
    if target_modules is None:
        target_modules = sorted({_split_leaf(name, _TO_PEFT_LEAF)[0].rpartition(".")[2] for name in adapter_state_dict})
    config = adapter_config(
        rank=rank,
        alpha=alpha,
        dropout=dropout,
        target_modules=target_modules,
        use_dora=use_dora,
        base_model_name_or_path=None if base_model_name_or_path is None else str(base_model_name_or_path),
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights_path, config_path = out / ADAPTER_WEIGHTS, out / ADAPTER_CONFIG
    save_safetensors(tensors, weights_path)
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    return [weights_path, config_path]


# ----- loading -----


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(
            f"adapter directory {path.parent} has no {ADAPTER_CONFIG}; "
            "pass a directory written by PEFT or by a LoRA run"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); fix or re-export the adapter") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} must hold a JSON object; fix or re-export the adapter")
    _check_config(config, path)
    return config


def _check_config(config: dict[str, Any], path: Path) -> None:
    if config.get("peft_type") != "LORA":
        raise UserError(
            f"{path} has peft_type={config.get('peft_type')!r}; only LoRA adapters (peft_type LORA) are supported"
        )
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise UserError(f"{path} has r={rank!r}; it must be a positive integer")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
        raise UserError(f"{path} has lora_alpha={alpha!r}; it must be a positive number")
    unsupported = {
        "use_rslora": config.get("use_rslora", False),
        "fan_in_fan_out": config.get("fan_in_fan_out", False),
        "rank_pattern": config.get("rank_pattern") or {},
        "alpha_pattern": config.get("alpha_pattern") or {},
        "modules_to_save": config.get("modules_to_save") or None,
    }
    for key, value in unsupported.items():
        if value:
            raise UserError(
                f"{path} sets {key}={value!r}, which finetune's LoRA does not support; train the adapter without it"
            )
    if config.get("bias", "none") != "none":
        raise UserError(
            f"{path} sets bias={config['bias']!r}; only bias 'none' is supported (Llama linears have no bias)"
        )


def _our_adapter_name(peft_name: str, path: Path) -> Optional[str]:
    """Our tensor name for a PEFT tensor name; None for base-layer copies PEFT may store."""
    where = f"adapter tensor {peft_name} in {path}"
    if not peft_name.startswith(_PREFIX):
        raise UserError(f"{where} does not start with {_PREFIX!r}; this is not a PEFT adapter of a causal LM")
    name = peft_name[len(_PREFIX) :]
    if name.endswith(".base_layer.weight"):
        return None  # a copy of a base weight (PEFT saves lm_head's); the base checkpoint has it
    split = _split_leaf(name, _FROM_PEFT_LEAF)
    if split is None:
        raise UserError(
            f"{where} is not a LoRA A, B or DoRA magnitude tensor; "
            "only plain LoRA/DoRA adapters on linear layers are supported"
        )
    hf_module, leaf = split
    ours = from_hf_name(hf_module)
    if ours is None or ours.rpartition(".")[2] not in TARGET_MODULES:
        raise UserError(
            f"{where} names module {hf_module}, which is not a linear layer of a Llama model; "
            "use an adapter trained on a Llama model"
        )
    return f"{ours}.{_FROM_PEFT_LEAF[leaf]}"


def _module_shapes(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, tuple[int, ...]]]:
    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, tensor in tensors.items():
        module, leaf = _split_leaf(name, _TO_PEFT_LEAF)
        modules.setdefault(module, {})[leaf] = tuple(tensor.shape)
    return modules


def _check_tensors(
    tensors: Mapping[str, torch.Tensor], config: dict[str, Any], path: Path, args: Optional[ModelArgs]
) -> None:
    if not tensors:
        raise UserError(f"{path} holds no LoRA tensors; re-export the adapter")
    # Tied models have no output.weight here, so an adapter on their output layer is refused.
    base_shapes = expected_shapes(args) if args is not None else None
    rank, use_dora = config["r"], bool(config.get("use_dora", False))
    for module, leaves in sorted(_module_shapes(tensors).items()):
        missing = [leaf for leaf in ("lora_a.weight", "lora_b.weight") if leaf not in leaves]
        if use_dora and "magnitude" not in leaves:
            missing.append("magnitude")
        if missing:
            raise UserError(
                f"adapter {path} lacks {', '.join(f'{module}.{leaf}' for leaf in missing)}; "
                "the adapter is incomplete, re-export it"
            )
        if "magnitude" in leaves and not use_dora:
            raise UserError(
                f"adapter {path} has DoRA magnitudes but its config says use_dora=false; "
                f"fix use_dora in {ADAPTER_CONFIG}"
            )
        if base_shapes is not None:
            if f"{module}.weight" not in base_shapes:
                raise UserError(
                    f"adapter {path} adapts {module}, which this model does not have; "
                    "use the base model the adapter was trained on"
                )
            out_dim, in_dim = base_shapes[f"{module}.weight"]
        else:
            out_dim, in_dim = leaves["lora_b.weight"][0], leaves["lora_a.weight"][-1]
        expected = {"lora_a.weight": (rank, in_dim), "lora_b.weight": (out_dim, rank), "magnitude": (out_dim,)}
        for leaf, found in leaves.items():
            if found != expected[leaf]:
                raise UserError(
                    f"adapter tensor {peft_tensor_name(f'{module}.{leaf}')} in {path} has shape {list(found)} but "
                    f"{list(expected[leaf])} is expected (r={rank}); the adapter is for a different model or rank"
                )


def load_peft_adapter(
    adapter_dir: PathLike, args: Optional[ModelArgs] = None, *, base_dir: Optional[PathLike] = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(adapter tensors under our names, the adapter_config.json contents).

    With `args`, every tensor's shape is checked against that base model as well as against r.
    With `base_dir` (the model it will be applied to), the merged model written beside the
    adapter is refused: it already holds the adapter, which would then count twice.
    """
    directory = Path(adapter_dir)
    if not directory.is_dir():
        raise UserError(f"adapter directory {directory} does not exist or is not a directory; check adapter_dir")
    config = _read_config(directory / ADAPTER_CONFIG)
    if base_dir is not None and Path(base_dir).resolve() == (directory / MERGED_DIR).resolve():
        base = config.get("base_model_name_or_path")
        raise UserError(
            f"checkpoint_dir {base_dir} is the merged model of adapter_dir {directory} and already holds the "
            "adapter; "
            f"use it without adapter_dir, or set checkpoint_dir to the base model{f' ({base})' if base else ''}"
        )
    weights = directory / ADAPTER_WEIGHTS
    if not weights.is_file():
        hint = (
            "convert adapter_model.bin to safetensors"
            if (directory / "adapter_model.bin").is_file()
            else "the adapter is incomplete"
        )
        raise UserError(f"adapter directory {directory} has no {ADAPTER_WEIGHTS}; {hint}")
    tensors = {}
    for peft_name, tensor in load_safetensors(weights).items():
        ours = _our_adapter_name(peft_name, weights)
        if ours is not None:
            tensors[ours] = tensor
    _check_tensors(tensors, config, weights, args)
    return tensors, config


def describe_adapted(settings: Mapping[str, Any]) -> str:
    """The adapted layers of `apply_lora_settings`' result, for a log line."""
    parts = (
        list(settings["attn_modules"])
        + (["mlp"] if settings["mlp"] else [])
        + (["output"] if settings["output"] else [])
    )
    return ", ".join(parts)


def apply_lora_settings(
    config: Mapping[str, Any], tensors: Optional[Mapping[str, torch.Tensor]] = None
) -> dict[str, Any]:
    """Keyword arguments for `finetune.models.lora.apply_lora` that rebuild the adapter of `config`.

    The adapted modules come from `tensors` (as `load_peft_adapter` returns them) when given, which
    also covers configs whose target_modules is a pattern, else from the config's target_modules.
    An adapter on only some MLP projections or layers gets adapters on all of them; the extra ones
    keep their no-op init (load with `load_adapter_state_dict(..., strict=False)`).
    """
    if tensors is not None:
        ours = {_split_leaf(name, _TO_PEFT_LEAF)[0].rpartition(".")[2] for name in tensors}
    else:
        targets = config.get("target_modules") or []
        if isinstance(targets, str):
            raise UserError(
                f"adapter target_modules={targets!r} is a pattern, not a list of module names; "
                "pass the adapter tensors too"
            )
        unknown = [name for name in targets if name not in _TARGETS_FROM_HF]
        if unknown:
            raise UserError(
                f"adapter target_modules has {', '.join(map(repr, unknown))}, which are not Llama linear layers; "
                "use a Llama adapter"
            )
        ours = {_TARGETS_FROM_HF[name] for name in targets}
    return dict(
        attn_modules=[name for name in ATTN_MODULES if name in ours],
        mlp=bool(ours & {"w1", "w2", "w3"}),
        output="output" in ours,
        rank=config["r"],
        alpha=config["lora_alpha"],
        dropout=float(config.get("lora_dropout", 0.0)),
        use_dora=bool(config.get("use_dora", False)),
    )
