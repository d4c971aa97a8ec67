"""config.json of the families beside Llama (Mistral, Qwen 2 / 2.5, Qwen 3, Gemma 3 text) <-> the
`ModelArgs` values that differ from Llama's.

Reading accepts transformers 4 (`rope_theta`, `rope_scaling`, `sliding_window_pattern`) and 5
(`rope_parameters`, `layer_types`) layouts; writing gives both, as transformers 5 writes them.
"""

from pathlib import Path
from typing import Any, Optional

from finetune.errors import UserError
from finetune.models.args import FULL_ATTENTION, SLIDING_ATTENTION, ModelArgs, RopeScaling
from finetune.models.families import gemma3_layer_types

# model_type -> (family, architecture written back)
MODEL_TYPES = {
    "mistral": ("mistral", "MistralForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "gemma3_text": ("gemma3", "Gemma3ForCausalLM"),
}
ARCHITECTURES = {family: (model_type, arch) for model_type, (family, arch) in MODEL_TYPES.items()}

# What transformers assumes for keys a Gemma 3 config.json leaves out (the 4B+ checkpoints' text
# configs name only a few).
_GEMMA3_DEFAULTS = {
    "vocab_size": 262_208,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 131_072,
    "hidden_activation": "gelu_pytorch_tanh",
    "tie_word_embeddings": True,
}
_GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh")


def _scaling(values: dict[str, Any], path: Path) -> Optional[RopeScaling]:
    """A rope scaling entry: None (default), linear, or Llama 3.1's."""
    kind = values.get("rope_type", values.get("type", "default"))
    try:
        if kind == "default":
            return None
        if kind == "linear":
            return RopeScaling(factor=float(values["factor"]), kind="linear")
        if kind == "llama3":
            return RopeScaling(
                factor=float(values["factor"]),
                low_freq_factor=float(values["low_freq_factor"]),
                high_freq_factor=float(values["high_freq_factor"]),
                original_max_position_embeddings=int(values["original_max_position_embeddings"]),
            )
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: {kind} rope scaling lacks or mangles {e}; fix the file") from None
    raise UserError(f"{path}: rope type {kind!r} is not supported; the default, 'linear' and 'llama3' are")


def _object(config: dict[str, Any], key: str, path: Path) -> dict[str, Any]:
    value = config.get(key) or {}
    if not isinstance(value, dict):
        raise UserError(f"{path}: {key} must be a JSON object; fix the file")
    return value


def _flat_rope(config: dict[str, Any], path: Path) -> tuple[float, Optional[RopeScaling]]:
    params = {**_object(config, "rope_scaling", path), **_object(config, "rope_parameters", path)}
    theta = params.get("rope_theta", config.get("rope_theta", 10_000.0))
    return float(theta), _scaling(params, path)


def _gemma3_rope(config: dict[str, Any], path: Path) -> dict[str, Any]:
    """Gemma 3's two rotary setups: global layers (scaled) and sliding layers (plain, own base)."""
    params = _object(config, "rope_parameters", path)
    if FULL_ATTENTION in params or SLIDING_ATTENTION in params:
        full, local = params.get(FULL_ATTENTION) or {}, params.get(SLIDING_ATTENTION) or {}
        if _scaling(local, path) is not None:
            raise UserError(f"{path}: scaled rope on sliding-attention layers is not supported")
        return dict(
            rope_theta=float(full.get("rope_theta", 1_000_000.0)),
            rope_scaling=_scaling(full, path),
            local_rope_theta=float(local.get("rope_theta", 10_000.0)),
        )
    return dict(
        rope_theta=float(config.get("rope_theta", 1_000_000.0)),
        rope_scaling=_scaling(_object(config, "rope_scaling", path), path),
        local_rope_theta=float(config.get("rope_local_base_freq", 10_000.0)),
    )


def _layer_types(config: dict[str, Any], n_layers: Any, default: Optional[list[str]]) -> Optional[list[str]]:
    """Per-layer attention kinds, or None when every layer attends to everything."""
    types = config.get("layer_types") or default
    if not types or SLIDING_ATTENTION not in types:
        return None
    return list(types)


def family_values(model_type: str, config: dict[str, Any], path: Path) -> dict[str, Any]:
    """The `ModelArgs` values (besides the shapes every family shares) of a non-Llama config.json."""
    family, _ = MODEL_TYPES[model_type]
    n_layers = config.get("num_hidden_layers")
    values: dict[str, Any] = {"family": family}
    if family == "gemma3":
        if config.get("final_logit_softcapping") or config.get("attn_logit_softcapping"):
            raise UserError(f"{path}: logit soft-capping (Gemma 2) is not supported; Gemma 3 has none")
        if config.get("hidden_activation", config.get("hidden_act")) not in _GELU_TANH:
            raise UserError(f"{path}: hidden_activation must be gelu_pytorch_tanh for Gemma 3")
        pattern = config.get("sliding_window_pattern", config.get("_sliding_window_pattern", 6))
        default_types = gemma3_layer_types(n_layers, pattern) if isinstance(n_layers, int) else None
        values.update(
            _gemma3_rope(config, path),
            qk_norm=True,
            norm_plus_one=True,
            sandwich_norms=True,
            mlp_activation="gelu_tanh",
            scale_embeddings=True,
            query_pre_attn_scalar=float(config["query_pre_attn_scalar"]),
            layer_types=_layer_types(config, n_layers, default_types),
            sliding_window=config.get("sliding_window"),
        )
        return values
    if config.get("hidden_act", "silu") != "silu":
        raise UserError(f"{path}: hidden_act {config['hidden_act']!r} is not supported; {family} uses 'silu'")
    values["rope_theta"], values["rope_scaling"] = _flat_rope(config, path)
    if family == "qwen2":
        values["qkv_bias"] = True  # Qwen 2 always has them; its config has no switch
    if family == "qwen3":
        if config.get("attention_bias"):
            raise UserError(f"{path}: attention_bias=true is not supported for Qwen 3")
        values["qk_norm"] = True
    window = config.get("sliding_window")
    if family == "mistral" and window is not None:
        values.update(sliding_window=window, layer_types=[SLIDING_ATTENTION] * n_layers)
    elif family in ("qwen2", "qwen3") and config.get("use_sliding_window"):
        first_sliding = config.get("max_window_layers", 0)
        default_types = [SLIDING_ATTENTION if i >= first_sliding else FULL_ATTENTION for i in range(n_layers)]
        values.update(sliding_window=window, layer_types=_layer_types(config, n_layers, default_types))
    return values


def with_gemma3_defaults(config: dict[str, Any]) -> dict[str, Any]:
    return {**_GEMMA3_DEFAULTS, **{k: v for k, v in config.items() if v is not None or k not in _GEMMA3_DEFAULTS}}


def _rope_entry(theta: float, scaling: Optional[RopeScaling]) -> dict[str, Any]:
    if scaling is None:
        return {"rope_type": "default", "rope_theta": theta}
    if scaling.kind == "linear":
        return {"rope_type": "linear", "factor": scaling.factor, "rope_theta": theta}
    return {
        "rope_type": "llama3",
        "factor": scaling.factor,
        "low_freq_factor": scaling.low_freq_factor,
        "high_freq_factor": scaling.high_freq_factor,
        "original_max_position_embeddings": scaling.original_max_position_embeddings,
        "rope_theta": theta,
    }


def _whole(value: Optional[float]) -> Optional[float]:
    """transformers 5 checks config types strictly and wants a whole number as an int."""
    return int(value) if value is not None and float(value).is_integer() else value


def family_hf_config(args: ModelArgs, common: dict[str, Any]) -> dict[str, Any]:
    """config.json for a non-Llama family: `common` (the keys every family shares) plus its own."""
    model_type, architecture = ARCHITECTURES[args.family]
    config = {"architectures": [architecture], "model_type": model_type, **common}
    layer_types = args.layer_types or [FULL_ATTENTION] * args.n_layers
    rope = _rope_entry(args.rope_theta, args.rope_scaling)
    legacy_scaling = None if args.rope_scaling is None else {k: v for k, v in rope.items() if k != "rope_theta"}
    if args.family == "gemma3":
        config.pop("hidden_act")
        config.update(
            hidden_activation="gelu_pytorch_tanh",
            query_pre_attn_scalar=_whole(args.query_pre_attn_scalar),
            sliding_window=args.sliding_window,
            layer_types=layer_types,
            rope_theta=args.rope_theta,
            rope_local_base_freq=args.local_rope_theta,
            rope_scaling=legacy_scaling,
            rope_parameters={
                FULL_ATTENTION: rope,
                SLIDING_ATTENTION: _rope_entry(args.local_rope_theta or 10_000.0, None),
            },
            attention_bias=False,
            final_logit_softcapping=None,
            attn_logit_softcapping=None,
        )
        return config
    config.update(rope_theta=args.rope_theta, rope_scaling=legacy_scaling, rope_parameters=rope)
    if args.family == "mistral":
        config["sliding_window"] = args.sliding_window if args.layer_types is not None else None
        return config
    sliding = args.layer_types is not None
    first_sliding = layer_types.index(SLIDING_ATTENTION) if sliding else args.n_layers
    config.update(
        use_sliding_window=sliding,
        sliding_window=args.sliding_window if sliding else None,
        max_window_layers=first_sliding,
        layer_types=layer_types,
    )
    if args.family == "qwen3":
        config["attention_bias"] = False
    return config
