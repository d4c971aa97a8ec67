"""config.json of the new families: ours loads in transformers with the same shapes, theirs
(transformers 4 and 5 layouts, Gemma 3's image-text wrapper) reads back to the same ModelArgs,
and a registry name that disagrees with a checkpoint is one error line."""

import json

import pytest
import torch

from finetune.checkpointing.model_configs import (
    hf_config_from_model_args,
    model_args_from_hf_config,
    resolve_model_args,
)
from finetune.errors import UserError
from finetune.models import MODEL_NAMES, build_model, model_args, num_params

FAMILY_NAMES = [n for n in MODEL_NAMES if n.startswith(("mistral", "qwen", "gemma"))]


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_our_config_builds_the_same_model_in_transformers(name, tmp_path):
    transformers = pytest.importorskip("transformers")
    args = model_args(name)
    (tmp_path / "config.json").write_text(json.dumps(hf_config_from_model_args(args, torch.bfloat16)))
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    with torch.device("meta"):
        theirs = transformers.AutoModelForCausalLM.from_config(config)
    assert theirs.num_parameters() == num_params(build_model(args, device="meta"))
    assert model_args_from_hf_config(config.to_dict(), tmp_path / "config.json") == args


def test_gemma3_transformers4_and_image_text_configs_read_alike(tmp_path):
    # What Gemma 3 4B's Hub config.json holds: an image-text wrapper whose text_config names only
    # what differs from transformers' defaults, in the transformers 4 layout.
    wrapper = {
        "architectures": ["Gemma3ForConditionalGeneration"],
        "model_type": "gemma3",
        "text_config": {
            "hidden_size": 2560,
            "intermediate_size": 10240,
            "model_type": "gemma3_text",
            "num_hidden_layers": 34,
            "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
            "sliding_window": 1024,
        },
        "vision_config": {"model_type": "siglip_vision_model"},
    }
    assert model_args_from_hf_config(wrapper, tmp_path / "config.json") == model_args("gemma3_4b")
    text_only = {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": 262144,
        "hidden_size": 1152,
        "intermediate_size": 6912,
        "num_hidden_layers": 26,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 256,
        "query_pre_attn_scalar": 256,
        "rope_theta": 1000000,
        "rope_local_base_freq": 10000,
        "rope_scaling": None,
        "sliding_window": 512,
        "sliding_window_pattern": 6,
        "max_position_embeddings": 32768,
    }
    assert model_args_from_hf_config(text_only, tmp_path / "config.json") == model_args("gemma3_1b")


def test_a_name_that_disagrees_with_the_checkpoint_is_one_line(make_family_model, tmp_path):
    make_family_model("qwen3").save_pretrained(tmp_path)
    with pytest.raises(UserError) as caught:
        resolve_model_args("qwen3_0_6b", tmp_path)
    message = str(caught.value)
    assert "\n" not in message and "model=qwen3_0_6b does not match" in message and "model=auto" in message


def test_unsupported_variants_are_refused(tmp_path):
    gemma2_like = {"model_type": "gemma3_text", "final_logit_softcapping": 30.0}
    with pytest.raises(UserError, match="soft-capping"):
        model_args_from_hf_config(gemma2_like, tmp_path / "config.json")
    with pytest.raises(UserError, match="model_type 'phi3' is not supported"):
        model_args_from_hf_config({"model_type": "phi3"}, tmp_path / "config.json")


def test_tune_stops_on_a_disagreeing_name_with_one_error_line(make_family_model, capsys, tmp_path):
    from tests.cli_helpers import error_line, run

    make_family_model("gemma3").save_pretrained(tmp_path / "ckpt")
    code, _, err = run(
        capsys,
        "full_finetune",
        "model=gemma3_1b",
        f"checkpoint_dir={tmp_path / 'ckpt'}",
        "dataset=pkg:data/demo/train.jsonl",
        f"output_dir={tmp_path / 'out'}",
        "device=cpu",
    )
    assert code == 2 and "Traceback" not in err
    assert error_line(err).startswith("error: model=gemma3_1b does not match the checkpoint in")
