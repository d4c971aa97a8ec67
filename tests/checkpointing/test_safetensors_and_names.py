"""Our safetensors reader/writer against the reference library, and the name mappings."""

import pytest
import safetensors.torch
import torch

from finetune.checkpointing import hf_module_name, our_module_name
from finetune.checkpointing.key_mapping import from_hf_name, from_meta_name, to_hf_name, to_meta_name
from finetune.checkpointing.safetensors_io import load_safetensors, save_safetensors
from finetune.models import ModelArgs, build_model


def _mixed_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 5, generator=generator),
        "bf16": torch.randn(7, generator=generator).to(torch.bfloat16),
        "f16": torch.randn(2, 2, 2, generator=generator).half(),
        "i64": torch.arange(-4, 4),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "strided": torch.randn(4, 6, generator=generator).t(),
    }


def test_our_files_load_in_the_safetensors_library(tmp_path):
    tensors = _mixed_tensors()
    save_safetensors(tensors, tmp_path / "a.safetensors")
    loaded = safetensors.torch.load_file(tmp_path / "a.safetensors")
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name


def test_library_files_load_with_our_reader(tmp_path):
    tensors = {k: v.contiguous() for k, v in _mixed_tensors().items()}
    safetensors.torch.save_file(tensors, tmp_path / "b.safetensors")
    loaded = load_safetensors(tmp_path / "b.safetensors")
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name


@pytest.mark.parametrize(
    "ours, theirs",
    [
        ("tok_embeddings.weight", "model.embed_tokens.weight"),
        ("layers.0.attn.q_proj", "model.layers.0.self_attn.q_proj"),
        ("layers.11.attn.output_proj.weight", "model.layers.11.self_attn.o_proj.weight"),
        ("layers.3.mlp.w1", "model.layers.3.mlp.gate_proj"),
        ("layers.3.mlp.w2", "model.layers.3.mlp.down_proj"),
        ("layers.3.mlp.w3", "model.layers.3.mlp.up_proj"),
        ("layers.2.sa_norm.weight", "model.layers.2.input_layernorm.weight"),
        ("layers.2.mlp_norm.weight", "model.layers.2.post_attention_layernorm.weight"),
        ("layers.5", "model.layers.5"),
        ("layers.5.attn", "model.layers.5.self_attn"),
        ("norm.weight", "model.norm.weight"),
        ("output.weight", "lm_head.weight"),
    ],
)
def test_hf_module_names_map_both_ways(ours, theirs):
    assert hf_module_name(ours) == theirs
    assert our_module_name(theirs) == ours


def test_unknown_names_are_rejected():
    with pytest.raises(ValueError):
        hf_module_name("transformer.h.0.attn")
    with pytest.raises(ValueError):
        our_module_name("layers.0.attn.q_proj")  # ours, not HF's
    assert from_hf_name("model.layers.0.attention.wq.weight") is None


def test_every_parameter_name_round_trips():
    model = build_model(
        ModelArgs(vocab_size=32, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, hidden_dim=48), device="meta"
    )
    expected_meta = {
        "layers.1.attn.k_proj.weight": "layers.1.attention.wk.weight",
        "layers.1.mlp.w2.weight": "layers.1.feed_forward.w2.weight",
        "layers.1.sa_norm.weight": "layers.1.attention_norm.weight",
        "layers.1.mlp_norm.weight": "layers.1.ffn_norm.weight",
    }
    for name in model.state_dict():
        assert from_hf_name(to_hf_name(name)) == name
        assert from_meta_name(to_meta_name(name)) == name
        if name in expected_meta:
            assert to_meta_name(name) == expected_meta[name]
