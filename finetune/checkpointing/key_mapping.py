"""Names of modules and tensors in our model, in Hugging Face checkpoints and in Meta checkpoints,
and the q/k row permutation between Meta's interleaved rotary layout and ours.

Names map by their longest known module prefix and keep any suffix, so the same functions
name parameters (`layers.0.attn.q_proj.weight`) and adapter modules (`layers.0.attn.q_proj`).

One Hugging Face name means two things: Llama's `post_attention_layernorm` is the norm before
the MLP, Gemma 3's is the norm after attention (its pre-MLP norm is `pre_feedforward_layernorm`).
The HF functions take `sandwich_norms` (ModelArgs') to say which layout is meant.
"""

import re
from typing import Optional

import torch

_LAYER = re.compile(r"^layers\.(\d+)(?:\.(.*))?$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)(?:\.(.*))?$")
_META_LAYER = re.compile(r"^layers\.(\d+)(?:\.(.*))?$")

# Module paths inside one layer: ours -> theirs. Longer paths come first so prefixes match greedily.
_HF_IN_LAYER = {
    "attn.q_proj": "self_attn.q_proj",
    "attn.k_proj": "self_attn.k_proj",
    "attn.v_proj": "self_attn.v_proj",
    "attn.output_proj": "self_attn.o_proj",
    "mlp.w1": "mlp.gate_proj",
    "mlp.w2": "mlp.down_proj",
    "mlp.w3": "mlp.up_proj",
    "attn.q_norm": "self_attn.q_norm",
    "attn.k_norm": "self_attn.k_norm",
    "sa_norm": "input_layernorm",
    "mlp_norm": "post_attention_layernorm",
    "attn": "self_attn",
    "mlp": "mlp",
}
# Gemma 3: norms on both sides of attention and of the MLP.
_HF_IN_SANDWICH_LAYER = {
    **{ours: theirs for ours, theirs in _HF_IN_LAYER.items() if ours != "mlp_norm"},
    "post_attn_norm": "post_attention_layernorm",
    "mlp_norm": "pre_feedforward_layernorm",
    "post_mlp_norm": "post_feedforward_layernorm",
}
_HF_TOP = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}

_META_IN_LAYER = {
    "attn.q_proj": "attention.wq",
    "attn.k_proj": "attention.wk",
    "attn.v_proj": "attention.wv",
    "attn.output_proj": "attention.wo",
    "mlp.w1": "feed_forward.w1",
    "mlp.w2": "feed_forward.w2",
    "mlp.w3": "feed_forward.w3",
    "sa_norm": "attention_norm",
    "mlp_norm": "ffn_norm",
    "attn": "attention",
    "mlp": "feed_forward",
}
_META_TOP = {"tok_embeddings": "tok_embeddings", "norm": "norm", "output": "output"}

# Tensors some checkpoints carry that are derived, not learned: safe to drop on load.
HF_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
# Gemma 3 image-text checkpoints also hold a vision tower, which the text model does not use.
GEMMA3_VISION = re.compile(r"^(model\.)?(vision_tower|multi_modal_projector)\.")
# Their text model sits under another prefix (transformers 4 and 5 layouts); it maps as a causal LM's.
_HF_TEXT_MODEL_PREFIXES = (
    ("language_model.model.", "model."),
    ("model.language_model.", "model."),
    ("language_model.lm_head.", "lm_head."),
)
META_IGNORED = re.compile(r"^rope\.freqs$")


def _map_by_prefix(name: str, table: dict[str, str]) -> Optional[str]:
    for ours, theirs in table.items():
        if name == ours:
            return theirs
        if name.startswith(ours + "."):
            return theirs + name[len(ours) :]
    return None


def _translate(
    name: str, layer_pattern: re.Pattern, layer_prefix: str, in_layer: dict[str, str], top: dict[str, str]
) -> Optional[str]:
    match = layer_pattern.match(name)
    if match is None:
        return _map_by_prefix(name, top)
    index, rest = match.groups()
    if rest is None:
        return f"{layer_prefix}{index}"
    mapped = _map_by_prefix(rest, in_layer)
    return None if mapped is None else f"{layer_prefix}{index}.{mapped}"


def _inverse(table: dict[str, str]) -> dict[str, str]:
    inverse = {theirs: ours for ours, theirs in table.items()}
    # Keep longest-first order for greedy prefix matching.
    return dict(sorted(inverse.items(), key=lambda item: -len(item[0])))


_HF_IN_LAYER_INV, _HF_TOP_INV = _inverse(_HF_IN_LAYER), _inverse(_HF_TOP)
_HF_IN_SANDWICH_LAYER_INV = _inverse(_HF_IN_SANDWICH_LAYER)
_META_IN_LAYER_INV, _META_TOP_INV = _inverse(_META_IN_LAYER), _inverse(_META_TOP)


def to_hf_name(name: str, sandwich_norms: bool = False) -> Optional[str]:
    """Our dotted name -> Hugging Face's, or None when it is not a model name."""
    in_layer = _HF_IN_SANDWICH_LAYER if sandwich_norms else _HF_IN_LAYER
    return _translate(name, _LAYER, "model.layers.", in_layer, _HF_TOP)


def from_hf_name(name: str, sandwich_norms: bool = False) -> Optional[str]:
    """Hugging Face dotted name -> ours, or None when it is not a name of our decoder."""
    for prefix, causal_lm_prefix in _HF_TEXT_MODEL_PREFIXES:
        if name.startswith(prefix):
            name = causal_lm_prefix + name[len(prefix) :]
            break
    in_layer = _HF_IN_SANDWICH_LAYER_INV if sandwich_norms else _HF_IN_LAYER_INV
    return _translate(name, _HF_LAYER, "layers.", in_layer, _HF_TOP_INV)


def to_meta_name(name: str) -> Optional[str]:
    return _translate(name, _LAYER, "layers.", _META_IN_LAYER, _META_TOP)


def from_meta_name(name: str) -> Optional[str]:
    return _translate(name, _META_LAYER, "layers.", _META_IN_LAYER_INV, _META_TOP_INV)


def hf_module_name(our_module_name: str) -> str:
    """e.g. "layers.0.attn.q_proj" -> "model.layers.0.self_attn.q_proj" (a trailing ".weight" is kept)."""
    mapped = to_hf_name(our_module_name)
    if mapped is None:
        raise ValueError(f"{our_module_name!r} is not a module name of TransformerDecoder")
    return mapped


def our_module_name(hf_module_name: str) -> str:
    """Inverse of `hf_module_name`: "model.layers.0.mlp.gate_proj" -> "layers.0.mlp.w1"."""
    mapped = from_hf_name(hf_module_name)
    if mapped is None:
        raise ValueError(f"{hf_module_name!r} is not a Llama module name in Hugging Face layout")
    return mapped


def is_rotary_projection(our_name: str) -> bool:
    """q and k projections are the weights whose rows follow the rotary layout."""
    return our_name.endswith(("attn.q_proj.weight", "attn.k_proj.weight"))


def meta_to_rotate_half(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's rows from Meta's interleaved pairs (0,1),(2,3).. to halves (0,d/2),(1,d/2+1).."""
    rows, cols = weight.shape
    head_dim = rows // n_heads
    return weight.view(n_heads, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def rotate_half_to_meta(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `meta_to_rotate_half`."""
    rows, cols = weight.shape
    head_dim = rows // n_heads
    return weight.view(n_heads, 2, head_dim // 2, cols).transpose(1, 2).reshape(rows, cols)
