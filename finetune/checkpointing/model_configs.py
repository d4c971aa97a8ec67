"""Architecture files: Hugging Face `config.json` and Meta `params.json` <-> `ModelArgs`."""

import dataclasses
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch

from finetune.checkpointing.family_configs import MODEL_TYPES, family_hf_config, family_values, with_gemma3_defaults
from finetune.checkpointing.formats import detect_format, read_json
from finetune.checkpointing.readers import inspect_meta_weights
from finetune.errors import UserError
from finetune.models import model_args
from finetune.models.args import ModelArgs, RopeScaling, infer_family, meta_ffn_params, meta_hidden_dim

PathLike = Union[str, os.PathLike]

HF_CONFIG = "config.json"
META_PARAMS = "params.json"

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _require(values: dict[str, Any], key: str, path: Path) -> Any:
    if key not in values or values[key] is None:
        raise UserError(f"{path} has no {key!r}; it is not a complete Llama config, fix or re-download it")
    return values[key]


def _build_args(path: Path, **values: Any) -> ModelArgs:
    try:
        return ModelArgs(**values)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    except TypeError as e:
        raise UserError(f"{path}: a value has the wrong type ({e}); fix the file") from None


# ----- Hugging Face config.json -----


def _hf_rope(config: dict[str, Any], path: Path) -> tuple[float, Optional[RopeScaling]]:
    """rope_theta and Llama 3.1 scaling from either transformers 4 (`rope_theta` + `rope_scaling`)
    or transformers 5 (`rope_parameters`) layout."""
    params = config.get("rope_parameters") or {}
    legacy = config.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(legacy, dict):
        raise UserError(f"{path}: rope_parameters / rope_scaling must be JSON objects; fix the file")
    theta = params.get("rope_theta", config.get("rope_theta", 10_000.0))
    scaling = {**legacy, **params}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type != "llama3":
        raise UserError(
            f"{path}: rope type {rope_type!r} is not supported; only the default and 'llama3' (Llama 3.1) scalings are"
        )
    try:
        return float(theta), RopeScaling(
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: llama3 rope scaling lacks or mangles {e}; fix the file") from None


_SUPPORTED_TYPES = ("llama", *MODEL_TYPES, "gemma3")


def model_args_from_hf_config(config: dict[str, Any], path: Path) -> ModelArgs:
    model_type = config.get("model_type", "llama")
    if model_type == "gemma3":
        # Gemma 3 4B and up ship as image-text models; the text model is what trains here.
        config, model_type = with_gemma3_defaults(_text_config(config, path)), "gemma3_text"
    elif model_type == "gemma3_text":
        config = with_gemma3_defaults(config)
    if model_type not in _SUPPORTED_TYPES:
        raise UserError(
            f"{path}: model_type {model_type!r} is not supported; supported are {', '.join(_SUPPORTED_TYPES)}"
        )
    if model_type != "llama":
        return _family_model_args(model_type, config, path)
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise UserError(f"{path}: {flag}=true is not supported; Llama checkpoints have no biases")
    if config.get("hidden_act", "silu") != "silu":
        raise UserError(f"{path}: hidden_act {config['hidden_act']!r} is not supported; Llama uses 'silu'")
    dim = _require(config, "hidden_size", path)
    n_heads = _require(config, "num_attention_heads", path)
    head_dim = config.get("head_dim")
    if (
        head_dim is not None
        and isinstance(dim, int)
        and isinstance(n_heads, int)
        and n_heads
        and head_dim * n_heads != dim
    ):
        raise UserError(
            f"{path}: head_dim={head_dim} differs from hidden_size/num_attention_heads; such models are not supported"
        )
    theta, scaling = _hf_rope(config, path)
    vocab_size = _require(config, "vocab_size", path)
    return _build_args(
        path,
        vocab_size=vocab_size,
        dim=dim,
        n_layers=_require(config, "num_hidden_layers", path),
        n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads") or n_heads,
        hidden_dim=_require(config, "intermediate_size", path),
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_seq_len=config.get("max_position_embeddings", 2048),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        family=infer_family(vocab_size) if isinstance(vocab_size, int) else "llama2",
    )


def _text_config(config: dict[str, Any], path: Path) -> dict[str, Any]:
    value = config.get("text_config")
    if not isinstance(value, dict):
        raise UserError(f"{path}: an image-text Gemma 3 config needs a text_config object; fix or re-download the file")
    return value


def _family_model_args(model_type: str, config: dict[str, Any], path: Path) -> ModelArgs:
    dim = _require(config, "hidden_size", path)
    n_heads = _require(config, "num_attention_heads", path)
    head_dim = config.get("head_dim")
    values = family_values(model_type, config, path)
    return _build_args(
        path,
        vocab_size=_require(config, "vocab_size", path),
        dim=dim,
        n_layers=_require(config, "num_hidden_layers", path),
        n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads") or n_heads,
        hidden_dim=_require(config, "intermediate_size", path),
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        max_seq_len=config.get("max_position_embeddings", 32_768),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        attn_head_dim=head_dim if isinstance(head_dim, int) and head_dim * n_heads != dim else None,
        **values,
    )


def hf_config_from_model_args(
    args: ModelArgs,
    dtype: torch.dtype = torch.float32,
    bos_token_id: Optional[int] = None,
    eos_token_id: Optional[Union[int, list[int]]] = None,
) -> dict[str, Any]:
    """A config.json for the family's *ForCausalLM (LlamaForCausalLM, Qwen3ForCausalLM, ...), readable
    by transformers 4 and 5 alike."""
    rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": args.rope_theta}
    rope_scaling = None
    if args.rope_scaling is not None:
        rope_scaling = {
            "rope_type": "llama3",
            "factor": args.rope_scaling.factor,
            "low_freq_factor": args.rope_scaling.low_freq_factor,
            "high_freq_factor": args.rope_scaling.high_freq_factor,
            "original_max_position_embeddings": args.rope_scaling.original_max_position_embeddings,
        }
        rope_parameters = {**rope_scaling, "rope_theta": args.rope_theta}
    dtype_name = _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
    if args.family not in ("llama2", "llama3"):
        return family_hf_config(args, _common_hf_config(args, dtype_name, bos_token_id, eos_token_id))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": args.max_seq_len,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_scaling": rope_scaling,
        "rope_parameters": rope_parameters,
        "tie_word_embeddings": args.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
    }


def _common_hf_config(
    args: ModelArgs, dtype_name: str, bos_token_id: Optional[int], eos_token_id: Optional[Union[int, list[int]]]
) -> dict[str, Any]:
    return {
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": args.max_seq_len,
        "rms_norm_eps": args.norm_eps,
        "tie_word_embeddings": args.tie_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
    }


# ----- Meta params.json -----

# Llama 3.2 1B/3B ship `use_scaled_rope` without the factor; Meta's code uses 32 for them.
_LLAMA3_2_SHAPES = {(2048, 16), (3072, 28)}


def model_args_from_meta_params(
    params: dict[str, Any], path: Path, vocab_size_in_weights: Optional[int], tied_in_weights: bool
) -> ModelArgs:
    dim = _require(params, "dim", path)
    n_layers = _require(params, "n_layers", path)
    n_heads = _require(params, "n_heads", path)
    vocab_size = params.get("vocab_size", -1)
    if not isinstance(vocab_size, int) or vocab_size <= 0:
        # Llama 2 params.json leaves vocab_size to the tokenizer (-1): take it from the weights.
        if vocab_size_in_weights is None:
            raise UserError(
                f"{path}: vocab_size is {vocab_size!r} and the weights do not show it; set vocab_size in the file"
            )
        vocab_size = vocab_size_in_weights
    try:
        hidden_dim = meta_hidden_dim(dim, int(params.get("multiple_of", 256)), params.get("ffn_dim_multiplier"))
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: dim / multiple_of / ffn_dim_multiplier are not numbers ({e}); fix the file") from None
    family = infer_family(vocab_size)
    scaling = None
    max_seq_len = params.get("max_seq_len", 8192 if family == "llama3" else 4096)
    if params.get("use_scaled_rope"):
        default_factor = 32.0 if (dim, n_layers) in _LLAMA3_2_SHAPES else 8.0
        scaling = RopeScaling(
            factor=float(params.get("rope_scaling_factor", default_factor)),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
        )
        max_seq_len = params.get("max_seq_len", 131_072)
    return _build_args(
        path,
        vocab_size=vocab_size,
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=params.get("n_kv_heads") or n_heads,
        hidden_dim=hidden_dim,
        norm_eps=float(params.get("norm_eps", 1e-5)),
        rope_theta=float(params.get("rope_theta", 10_000.0)),
        rope_scaling=scaling,
        max_seq_len=max_seq_len,
        tie_embeddings=tied_in_weights,
        family=family,
    )


def meta_params_from_model_args(args: ModelArgs) -> dict[str, Any]:
    multiple_of, ffn_dim_multiplier = meta_ffn_params(args.dim, args.hidden_dim)
    params: dict[str, Any] = {
        "dim": args.dim,
        "n_layers": args.n_layers,
        "n_heads": args.n_heads,
        "n_kv_heads": args.n_kv_heads,
        "vocab_size": args.vocab_size,
        "multiple_of": multiple_of,
        "ffn_dim_multiplier": ffn_dim_multiplier,
        "norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "max_seq_len": args.max_seq_len,
    }
    if ffn_dim_multiplier is None:
        del params["ffn_dim_multiplier"]
    if args.rope_scaling is not None:
        params.update(
            use_scaled_rope=True,
            rope_scaling_factor=args.rope_scaling.factor,
            low_freq_factor=args.rope_scaling.low_freq_factor,
            high_freq_factor=args.rope_scaling.high_freq_factor,
            original_max_position_embeddings=args.rope_scaling.original_max_position_embeddings,
        )
    return params


# ----- either -----


def read_model_args(checkpoint_dir: PathLike, checkpoint_format: str = "auto") -> ModelArgs:
    """Architecture of the checkpoint in `checkpoint_dir` (config.json or params.json)."""
    directory = Path(checkpoint_dir)
    fmt = detect_format(directory) if checkpoint_format == "auto" else checkpoint_format
    if fmt == "hf":
        path = directory / HF_CONFIG
        if not path.is_file():
            raise UserError(
                f"{directory} has Hugging Face weights but no {HF_CONFIG}; "
                "add it or pass a model name instead of 'auto'"
            )
        return model_args_from_hf_config(read_json(path), path)
    path = directory / META_PARAMS
    if not path.is_file():
        raise UserError(
            f"{directory} has Meta weights but no {META_PARAMS}; add it or pass a model name instead of 'auto'"
        )
    params = read_json(path)
    vocab_size, tied = inspect_meta_weights(directory, params.get("dim"))
    return model_args_from_meta_params(params, path, vocab_size, tied)


def resolve_model_args(model: str, checkpoint_dir: Optional[PathLike], checkpoint_format: str = "auto") -> ModelArgs:
    """The architecture of a run: a registry name, or "auto" = read from the checkpoint's config."""
    if model == "auto":
        if checkpoint_dir is None:
            raise UserError("model=auto reads the architecture from the checkpoint, so set checkpoint_dir")
        return read_model_args(checkpoint_dir, checkpoint_format)
    if checkpoint_dir is not None and not Path(checkpoint_dir).exists():
        raise UserError(f"checkpoint directory {checkpoint_dir} does not exist; check checkpoint_dir")
    named = model_args(model)
    if checkpoint_dir is not None:
        check_named_model_matches(model, named, checkpoint_dir, checkpoint_format)
    return named


# A context length is a training choice, not part of the weights; the family follows from the rest.
_NOT_COMPARED = ("max_seq_len", "family")


def check_named_model_matches(name: str, named: ModelArgs, checkpoint_dir: PathLike, checkpoint_format: str) -> None:
    """Refuse a registry name whose architecture differs from the checkpoint's own config.

    Same-shaped weights would load and train silently wrong (say, a Llama 3.0 checkpoint run
    under llama3_1_8b's rope scaling) and the output's config.json would claim the wrong model.
    """
    try:
        theirs = read_model_args(checkpoint_dir, checkpoint_format)
    except UserError:
        return  # no config to compare with: the weights' shapes are checked when they load
    differences = [
        f"{f.name} {getattr(named, f.name)} vs {getattr(theirs, f.name)}"
        for f in dataclasses.fields(named)
        if f.name not in _NOT_COMPARED and getattr(named, f.name) != getattr(theirs, f.name)
    ]
    if differences:
        raise UserError(
            f"model={name} does not match the checkpoint in {checkpoint_dir} ({'; '.join(differences)}); "
            "set model=auto to use the checkpoint's own architecture"
        )
