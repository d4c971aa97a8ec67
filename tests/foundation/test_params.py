"""Params: defaults, precedence CLI > config > defaults for every field type, YAML round trip,
validation of values and combinations, notebook construction."""

import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from finetune.cli import TuneArgumentParser
from finetune.errors import UserError
from finetune.params import FullFinetuneParams, LoraFinetuneParams

NEEDED = {"tokenizer_path": "tok.model"}


def parse(cls, argv, tmp_path=None, config=None):
    args = []
    if config is not None:
        path = tmp_path / "cfg.yaml"
        path.write_text(yaml.safe_dump(config))
        args = ["--config", str(path)]
    return TuneArgumentParser(cls).parse_args([*args, *argv])


# One field of every annotation kind: (field, config value, CLI string, CLI value).
PRECEDENCE_CASES = [
    ("train_on_input", True, "false", False),  # bool
    ("batch_size", 4, "8", 8),  # int
    ("lr", 0.001, "1e-4", 1e-4),  # float
    ("template", "plain", "alpaca", "alpaca"),  # str
    ("max_steps_per_epoch", 7, "none", None),  # Optional[int]
    ("clip_grad_norm", None, "0.5", 0.5),  # Optional[float]
    ("checkpoint_dir", "/a", "/b", "/b"),  # Optional[str]
    ("optimizer", "sgd", "adam", "adam"),  # Literal
    (
        "column_map",
        {"output": "answer"},
        "instruction:prompt,output:reply",
        {"instruction": "prompt", "output": "reply"},
    ),  # Optional[dict]
]


@pytest.mark.parametrize("name,config_value,cli_text,cli_value", PRECEDENCE_CASES)
def test_precedence_cli_over_config_over_default(tmp_path, name, config_value, cli_text, cli_value):
    default = getattr(FullFinetuneParams(**NEEDED), name)
    assert parse(FullFinetuneParams, ["tokenizer_path=t"]).__dict__[name] == default
    from_config = parse(FullFinetuneParams, [], tmp_path, {**NEEDED, name: config_value})
    assert getattr(from_config, name) == config_value
    from_cli = parse(FullFinetuneParams, ["--override", f"{name}={cli_text}"], tmp_path, {**NEEDED, name: config_value})
    assert getattr(from_cli, name) == cli_value
    bare = parse(FullFinetuneParams, [f"{name}={cli_text}"], tmp_path, {**NEEDED, name: config_value})
    assert getattr(bare, name) == cli_value


def test_list_field_from_comma_list_and_yaml_list(tmp_path):
    params = parse(LoraFinetuneParams, ["lora_attn_modules=q_proj,k_proj,output_proj"], tmp_path, NEEDED)
    assert params.lora_attn_modules == ["q_proj", "k_proj", "output_proj"]
    params = parse(LoraFinetuneParams, ["lora_attn_modules=[v_proj]"], tmp_path, NEEDED)
    assert params.lora_attn_modules == ["v_proj"]
    params = parse(LoraFinetuneParams, [], tmp_path, {**NEEDED, "lora_attn_modules": ["k_proj"]})
    assert params.lora_attn_modules == ["k_proj"]


def test_yaml_float_without_dot_is_read_as_float(tmp_path):
    # PyYAML reads `1e-5` as a string; the parser must still see a float.
    path = tmp_path / "c.yaml"
    path.write_text("tokenizer_path: t\nlr: 1e-5\n")
    assert parse(FullFinetuneParams, ["--config", str(path)]).lr == 1e-5


@pytest.mark.parametrize("cls", [FullFinetuneParams, LoraFinetuneParams])
def test_yaml_round_trip_is_exact(tmp_path, cls):
    params = cls(
        tokenizer_path="tok.model",
        lr=3.5e-4,
        column_map={"output": "y"},
        max_steps_per_epoch=3,
        clip_grad_norm=None,
        dtype="fp32",
    )
    path = tmp_path / "params.yaml"
    params.to_yaml(path)
    again = cls.from_yaml(path)
    assert again == params
    assert cls.from_yaml(path, overrides=["lr=0.1"]).lr == 0.1


def test_every_field_has_type_and_help():
    for cls in (FullFinetuneParams, LoraFinetuneParams):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            assert f.name in hints
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"


def test_notebook_construction_is_validated_like_the_cli():
    params = LoraFinetuneParams(tokenizer_path="t", lora_rank=4, apply_lora_to_mlp=True)
    assert params.lora_rank == 4 and params.lr == 3e-4
    with pytest.raises(UserError, match="lora_rank=0 must be at least 1"):
        LoraFinetuneParams(tokenizer_path="t", lora_rank=0)
    with pytest.raises(UserError, match="batch_size='2' has the wrong type; expected int"):
        FullFinetuneParams(tokenizer_path="t", batch_size="2")
    with pytest.raises(UserError, match="optimizer='adamx' is not allowed.*did you mean 'adam"):
        FullFinetuneParams(tokenizer_path="t", optimizer="adamx")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"model": "auto"}, "model=auto reads the architecture from the checkpoint, so set checkpoint_dir"),
        ({"tokenizer_path": None}, "tokenizer_path is required when checkpoint_dir is not set"),
        ({"enable_activation_offloading": True, "compile": True}, "cannot be combined"),
        ({"eval_every_n_steps": 5}, "eval_every_n_steps is set but eval_dataset is not"),
        ({"lr": 0.0}, "lr=0.0 must be positive"),
        ({"save_every_n_steps": 0}, "save_every_n_steps=0 must be at least 1"),
        ({"model": "llama9"}, "model='llama9' is not allowed"),
    ],
)
def test_invalid_values_and_combinations(kwargs, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        FullFinetuneParams(**{**NEEDED, **kwargs})


def test_lora_needs_some_module():
    with pytest.raises(UserError, match="no module gets an adapter"):
        LoraFinetuneParams(tokenizer_path="t", lora_attn_modules=[])


def test_notebook_paths_become_strings_and_changed_fields_are_checked_again(tmp_path):
    from finetune.recipes.full_finetune import FullFinetuneRecipe

    params = FullFinetuneParams(model="tiny", tokenizer_path=Path("tok.model"), output_dir=tmp_path / "out")
    assert (params.tokenizer_path, params.output_dir) == ("tok.model", str(tmp_path / "out"))
    params.lr = float("inf")
    with pytest.raises(UserError, match="lr=inf must be positive and finite"):
        params.check()
    params.lr, params.batch_size = 1e-4, "8"
    with pytest.raises(UserError, match="batch_size='8' has the wrong type; expected int"):
        FullFinetuneRecipe(params).setup()
    assert not (tmp_path / "out").exists()
