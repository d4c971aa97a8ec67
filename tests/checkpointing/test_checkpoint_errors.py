"""Every user-fixable checkpoint problem is one UserError line naming what, where and what to do."""

import json
import os

import pytest
import torch

from finetune.checkpointing import (
    load_model,
    load_state_dict,
    model_args_from_checkpoint,
    save_hf_checkpoint,
    save_meta_checkpoint,
)
from finetune.checkpointing.safetensors_io import load_safetensors, save_safetensors
from finetune.errors import UserError
from finetune.models import ModelArgs, build_model


class PickledPayload:
    """Unpickling this would call a function: exactly what weights_only loading must refuse."""

    def __reduce__(self):
        return (os.getcwd, ())


def _args(**overrides) -> ModelArgs:
    values = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, max_seq_len=64)
    values.update(overrides)
    return ModelArgs(**values)


@pytest.fixture
def hf_dir(tmp_path):
    torch.manual_seed(0)
    model = build_model(_args())
    save_hf_checkpoint(model.state_dict(), model.args, tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _raises(match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(UserError, match=match) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and not message.lower().startswith("error")
    return message


def test_missing_directory(tmp_path):
    message = _raises("does not exist", load_model, tmp_path / "nope")
    assert str(tmp_path / "nope") in message


def test_path_is_a_file(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    _raises("is not a directory", load_model, tmp_path / "model.safetensors")


def test_directory_without_known_format_lists_contents(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "weights.npz").write_bytes(b"")
    message = _raises("no checkpoint found", load_model, tmp_path)
    assert "notes.txt" in message and "weights.npz" in message


def test_hf_weights_without_config_need_a_model_name(hf_dir):
    (hf_dir / "config.json").unlink()
    _raises("no config.json", load_model, hf_dir, "auto")
    model, _ = load_model(hf_dir, _args())  # a given architecture needs no config
    assert model.layers[1].mlp.w3.weight.shape == (96, 32)


def test_missing_shard_listed_in_index(tmp_path):
    model = build_model(_args())
    save_hf_checkpoint(model.state_dict(), model.args, tmp_path, max_shard_bytes=20_000)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    _raises(f"shard {shard.name} listed in .*index.json is missing", load_model, tmp_path)


def test_shape_mismatch_names_tensor_and_shapes(hf_dir):
    message = _raises("has shape", load_model, hf_dir, _args(hidden_dim=128))
    assert "model.layers.0.mlp.gate_proj.weight" in message and "[96, 32]" in message and "[128, 32]" in message


def test_missing_tensors_are_named(hf_dir):
    tensors = load_safetensors(hf_dir / "model.safetensors")
    for layer in range(2):
        for proj in ("q", "k"):
            del tensors[f"model.layers.{layer}.self_attn.{proj}_proj.weight"]
    save_safetensors(tensors, hf_dir / "model.safetensors")
    message = _raises("lacks tensors", load_model, hf_dir)
    assert "model.layers.0.self_attn.k_proj.weight" in message and "and 1 more" in message


def test_unexpected_tensors_are_named(hf_dir):
    tensors = load_safetensors(hf_dir / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32)
    tensors["model.vision_tower.weight"] = torch.zeros(2)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(4)  # derived: ignored
    save_safetensors(tensors, hf_dir / "model.safetensors")
    message = _raises("does not know", load_model, hf_dir)
    assert "model.layers.0.self_attn.q_proj.bias" in message and "model.vision_tower.weight" in message
    assert "inv_freq" not in message


def test_too_many_layers_in_checkpoint(hf_dir):
    _raises("does not know: model.layers.1", load_state_dict, hf_dir, _args(n_layers=1))


def test_bin_with_pickled_code_is_refused(tmp_path):
    model = build_model(_args())
    state = {k: v for k, v in model.state_dict().items()}
    state["payload"] = PickledPayload()
    torch.save(state, tmp_path / "pytorch_model.bin")
    message = _raises("refusing to load .*arbitrary pickled code", load_state_dict, tmp_path, _args())
    assert "pytorch_model.bin" in message and "getcwd" in message


def test_corrupt_bin_is_reported(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a checkpoint at all")
    _raises("not a readable PyTorch checkpoint", load_state_dict, tmp_path, _args())


def test_truncated_safetensors_is_reported(hf_dir):
    path = hf_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    _raises("truncated or corrupt", load_model, hf_dir)


def test_malformed_config_json(hf_dir):
    (hf_dir / "config.json").write_text('{"hidden_size": 32,,}')
    message = _raises("is not valid JSON", model_args_from_checkpoint, hf_dir)
    assert "config.json" in message and "line 1" in message


def test_config_json_missing_a_field(hf_dir):
    config = json.loads((hf_dir / "config.json").read_text())
    del config["intermediate_size"]
    (hf_dir / "config.json").write_text(json.dumps(config))
    _raises("config.json has no 'intermediate_size'", model_args_from_checkpoint, hf_dir)


def test_config_json_with_bad_value(hf_dir):
    config = json.loads((hf_dir / "config.json").read_text())
    config["num_key_value_heads"] = 3
    (hf_dir / "config.json").write_text(json.dumps(config))
    _raises(
        "config.json: model argument n_heads=4 is not a multiple of n_kv_heads=3", model_args_from_checkpoint, hf_dir
    )


def test_unsupported_rope_type(hf_dir):
    config = json.loads((hf_dir / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (hf_dir / "config.json").write_text(json.dumps(config))
    _raises("rope type 'yarn' is not supported", model_args_from_checkpoint, hf_dir)


def test_malformed_params_json(tmp_path):
    model = build_model(_args())
    save_meta_checkpoint(model.state_dict(), model.args, tmp_path)
    (tmp_path / "params.json").write_text("[1, 2]")
    _raises("params.json must hold a JSON object", load_model, tmp_path)
    (tmp_path / "params.json").write_text('{"dim": 32, "n_heads": 4}')
    _raises("params.json has no 'n_layers'", load_model, tmp_path)


def test_tied_model_rejects_a_different_output_layer(hf_dir):
    _raises("different from the embeddings", load_model, hf_dir, _args(tie_embeddings=True))


def test_unknown_checkpoint_format_name(hf_dir):
    _raises("checkpoint_format 'gguf' is unknown", load_model, hf_dir, checkpoint_format="gguf")


def test_missing_tokenizer_file_on_save(tmp_path):
    model = build_model(_args())
    _raises(
        "tokenizer file .* does not exist",
        save_hf_checkpoint,
        model.state_dict(),
        model.args,
        tmp_path,
        tokenizer_files=[tmp_path / "tokenizer.model"],
    )


def test_a_lora_output_as_checkpoint_dir_points_at_merged_and_adapter_dir(tmp_path):
    step = tmp_path / "step_3"
    (step / "merged").mkdir(parents=True)
    (step / "adapter_config.json").write_text("{}")
    (step / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(UserError) as info:
        load_model(step, "auto")
    assert str(info.value) == (
        f"{step} holds a LoRA adapter, not a model: point checkpoint_dir at {step / 'merged'} (the merged model) "
        f"or the base model; generate and eleuther_eval apply the adapter with adapter_dir={step}"
    )
