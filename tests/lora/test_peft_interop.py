"""PEFT-format adapters and merged checkpoints against transformers + peft, in both directions."""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from finetune.checkpointing import load_model, save_hf_checkpoint
from finetune.checkpointing.peft import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    apply_lora_settings,
    load_peft_adapter,
    peft_tensor_name,
    save_peft_adapter,
)
from finetune.errors import UserError
from finetune.models.lora import adapter_state_dict, apply_lora, load_adapter_state_dict, merged_state_dict
from tests.lora.conftest import randomize_adapters

TOLERANCE = 1e-5
# Raised inside transformers when peft wraps a model; nothing here calls the deprecated API.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
TARGETS = ["q_proj", "k_proj", "v_proj", "output_proj", "w1", "w2", "w3", "output"]


def _adapted(directory, use_dora: bool, seed: int = 0):
    model, args = load_model(directory, "auto")
    apply_lora(model, attn_modules=TARGETS[:4], mlp=True, output=True, rank=4, alpha=12.0, use_dora=use_dora)
    randomize_adapters(model, seed)
    return model.eval(), args


def _peft_logits(hf_model, adapter_dir, tokens):
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # PEFT warns about keys it cannot place
        peft_model = PeftModel.from_pretrained(hf_model, adapter_dir).eval()
    with torch.no_grad():
        return peft_model(tokens).logits


@pytest.mark.parametrize("use_dora", [False, True])
def test_saved_adapter_gives_peft_our_logits(hf_checkpoint, tmp_path, tokens, use_dora):
    hf_model, directory = hf_checkpoint()
    model, _ = _adapted(directory, use_dora)
    with torch.no_grad():
        ours = model(tokens)
        base = hf_model(tokens).logits
    adapter_dir = tmp_path / "adapter"
    save_peft_adapter(
        adapter_state_dict(model),
        adapter_dir,
        rank=4,
        alpha=12.0,
        dropout=0.05,
        target_modules=TARGETS,
        use_dora=use_dora,
        base_model_name_or_path=str(directory),
    )
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    assert config["target_modules"] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    )
    assert (config["peft_type"], config["task_type"], config["r"], config["lora_alpha"], config["use_dora"]) == (
        "LORA",
        "CAUSAL_LM",
        4,
        12.0,
        use_dora,
    )
    keys = load_file(adapter_dir / ADAPTER_WEIGHTS).keys()
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys
    assert "base_model.model.lm_head.lora_A.weight" in keys
    assert ("base_model.model.model.layers.0.self_attn.o_proj.lora_magnitude_vector" in keys) == use_dora
    assert len(keys) == 15 * (3 if use_dora else 2)

    theirs = _peft_logits(hf_model, adapter_dir, tokens)
    assert (ours - base).abs().max().item() > 1e-2  # the adapter really changes the output
    assert (ours - theirs).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("use_dora", [False, True])
def test_merged_checkpoint_loads_in_transformers(hf_checkpoint, tmp_path, tokens, use_dora):
    from transformers import LlamaForCausalLM

    _, directory = hf_checkpoint()
    model, args = _adapted(directory, use_dora)
    with torch.no_grad():
        ours = model(tokens)
    save_hf_checkpoint(merged_state_dict(model), args, tmp_path / "merged")
    merged = LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        theirs = merged(tokens).logits
    assert (ours - theirs).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("use_dora", [False, True])
def test_adapter_trained_by_peft_loads_into_our_model(hf_checkpoint, tmp_path, tokens, use_dora):
    from peft import LoraConfig, get_peft_model

    hf_model, directory = hf_checkpoint()
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "gate_proj", "lm_head"],
        use_dora=use_dora,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(hf_model, config)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "lora_magnitude_vector" in name:
                param.add_(torch.randn_like(param) * 0.1)
    peft_model.save_pretrained(tmp_path / "peft", save_embedding_layers=True)
    assert "base_model.model.lm_head.base_layer.weight" in load_file(
        tmp_path / "peft" / ADAPTER_WEIGHTS
    )  # skipped on load
    with torch.no_grad():
        theirs = peft_model.eval()(tokens).logits

    model, args = load_model(directory, "auto")
    tensors, loaded_config = load_peft_adapter(tmp_path / "peft", args)
    settings = apply_lora_settings(loaded_config)
    assert settings == dict(
        attn_modules=["q_proj", "v_proj"], mlp=True, output=True, rank=4, alpha=8, dropout=0.0, use_dora=use_dora
    )
    assert apply_lora_settings({**loaded_config, "target_modules": ".*proj"}, tensors) == settings
    apply_lora(model, **settings)
    load_adapter_state_dict(model, tensors, strict=False)  # up/down projections keep their no-op init
    with torch.no_grad():
        ours = model.eval()(tokens)
    assert (ours - theirs).abs().max().item() <= TOLERANCE


def test_load_round_trip_is_exact(hf_checkpoint, tmp_path):
    _, directory = hf_checkpoint()
    model, args = _adapted(directory, use_dora=True)
    saved = adapter_state_dict(model)
    save_peft_adapter(saved, tmp_path / "a", rank=4, alpha=12.0, use_dora=True)
    tensors, config = load_peft_adapter(tmp_path / "a", args)
    assert tensors.keys() == saved.keys()
    assert all(torch.equal(tensors[name], saved[name]) for name in saved)
    assert config["target_modules"] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    )
    assert (
        peft_tensor_name("layers.1.attn.output_proj.magnitude")
        == "base_model.model.model.layers.1.self_attn.o_proj.lora_magnitude_vector"
    )


@pytest.fixture
def saved_adapter(hf_checkpoint, tmp_path):
    _, directory = hf_checkpoint()
    model, args = load_model(directory, "auto")
    apply_lora(model, attn_modules=["q_proj", "v_proj"], mlp=False, output=False, rank=4, alpha=8.0)
    save_peft_adapter(
        adapter_state_dict(model), tmp_path / "adapter", rank=4, alpha=8.0, target_modules=["q_proj", "v_proj"]
    )
    return tmp_path / "adapter", args


def _rewrite_weights(adapter_dir, edit) -> None:
    tensors = load_file(adapter_dir / ADAPTER_WEIGHTS)
    edit(tensors)
    save_file(tensors, adapter_dir / ADAPTER_WEIGHTS)


def _rewrite_config(adapter_dir, **changes) -> None:
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    config.update(changes)
    (adapter_dir / ADAPTER_CONFIG).write_text(json.dumps(config))


def test_missing_files_are_user_errors(saved_adapter, tmp_path):
    adapter_dir, _ = saved_adapter
    with pytest.raises(UserError, match="does not exist or is not a directory"):
        load_peft_adapter(tmp_path / "nowhere")
    (adapter_dir / ADAPTER_WEIGHTS).unlink()
    with pytest.raises(UserError, match=f"has no {ADAPTER_WEIGHTS}"):
        load_peft_adapter(adapter_dir)
    (adapter_dir / ADAPTER_CONFIG).write_text("{not json")
    with pytest.raises(UserError, match="is not valid JSON"):
        load_peft_adapter(adapter_dir)
    (adapter_dir / ADAPTER_CONFIG).unlink()
    with pytest.raises(UserError, match=f"has no {ADAPTER_CONFIG}"):
        load_peft_adapter(adapter_dir)


def test_unknown_module_is_a_user_error(saved_adapter):
    adapter_dir, _ = saved_adapter
    q_a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    _rewrite_weights(adapter_dir, lambda t: t.update({q_a.replace("q_proj", "qkv_proj"): t[q_a].clone()}))
    with pytest.raises(
        UserError, match=r"names module model\.layers\.0\.self_attn\.qkv_proj, which is not a linear layer"
    ):
        load_peft_adapter(adapter_dir)


def test_shape_mismatch_names_the_tensor(saved_adapter):
    adapter_dir, args = saved_adapter
    name = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    _rewrite_weights(adapter_dir, lambda t: t.update({name: torch.zeros(64, 4)}))
    load_peft_adapter(adapter_dir)  # self-consistent without a base model to compare with
    with pytest.raises(UserError, match=rf"{name} .* has shape \[64, 4\] but \[32, 4\] is expected"):
        load_peft_adapter(adapter_dir, args)


def test_rank_mismatch_and_missing_half_are_user_errors(saved_adapter):
    adapter_dir, _ = saved_adapter
    _rewrite_config(adapter_dir, r=8)
    with pytest.raises(
        UserError, match=r"q_proj.lora_A.weight .* has shape \[4, 64\] but \[8, 64\] is expected \(r=8\)"
    ):
        load_peft_adapter(adapter_dir)
    _rewrite_config(adapter_dir, r=4)
    _rewrite_weights(adapter_dir, lambda t: t.pop("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"))
    with pytest.raises(UserError, match=r"lacks layers\.0\.attn\.q_proj\.lora_b\.weight"):
        load_peft_adapter(adapter_dir)


def test_unsupported_config_is_a_user_error(saved_adapter):
    adapter_dir, _ = saved_adapter
    _rewrite_config(adapter_dir, use_rslora=True)
    with pytest.raises(UserError, match="sets use_rslora=True"):
        load_peft_adapter(adapter_dir)
    _rewrite_config(adapter_dir, use_rslora=False, peft_type="IA3")
    with pytest.raises(UserError, match="only LoRA adapters"):
        load_peft_adapter(adapter_dir)
    with pytest.raises(UserError, match="is a pattern, not a list"):
        apply_lora_settings({"r": 4, "lora_alpha": 8, "target_modules": ".*proj"})
    _rewrite_config(adapter_dir, peft_type="LORA", use_dora=True)
    with pytest.raises(UserError, match=r"lacks layers\.0\.attn\.q_proj\.magnitude"):
        load_peft_adapter(adapter_dir)


def test_tied_model_refuses_an_output_adapter(hf_checkpoint, tmp_path):
    _, directory = hf_checkpoint()
    model, _ = load_model(directory, "auto")
    apply_lora(model, attn_modules=[], mlp=False, output=True, rank=4, alpha=8.0)
    save_peft_adapter(adapter_state_dict(model), tmp_path / "a", rank=4, alpha=8.0)
    _, tied_dir = hf_checkpoint(seed=1, tie_word_embeddings=True)
    _, tied_args = load_model(tied_dir, "auto")
    with pytest.raises(UserError, match="adapts output, which this model does not have"):
        load_peft_adapter(tmp_path / "a", tied_args)
