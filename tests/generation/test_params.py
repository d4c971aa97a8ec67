"""GenerateParams refuses bad values on construction, with a message naming the key."""

import pytest

from finetune.errors import UserError
from finetune.params import GenerateParams

GOOD = dict(checkpoint_dir="ckpt", prompt="Hi")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(checkpoint_dir=None), "checkpoint_dir is required"),
        (dict(prompt=None), "set exactly one of prompt and prompt_file"),
        (dict(prompt_file="p.txt"), "not both"),
        (dict(max_new_tokens=0), "max_new_tokens=0 must be at least 1"),
        (dict(temperature=-0.1), "temperature=-0.1 must be 0"),
        (dict(top_k=0), "top_k=0 must be at least 1"),
        (dict(top_p=0.0), r"top_p=0.0 must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p=1.5 must be in \(0, 1\]"),
        (dict(batch_size=0), "batch_size=0 must be at least 1"),
        (dict(system_prompt="Be nice."), "set chat=true"),
        (dict(stop_strings=["###", ""]), "stop_strings holds an empty string"),
        (dict(template="alpacca"), "did you mean 'alpaca'"),
        (dict(model="llama9"), "model='llama9' is not allowed"),
    ],
)
def test_bad_values_are_refused(overrides, message):
    with pytest.raises(UserError, match=message):
        GenerateParams(**{**GOOD, **overrides})


def test_good_values_pass_and_round_trip(tmp_path):
    params = GenerateParams(
        **GOOD,
        chat=True,
        system_prompt="Be nice.",
        template="none",
        top_k=1,
        top_p=1.0,
        temperature=0.7,
        stop_strings=["###"],
        seed=None,
    )
    params.to_yaml(tmp_path / "params.yaml")
    assert GenerateParams.from_yaml(tmp_path / "params.yaml") == params
