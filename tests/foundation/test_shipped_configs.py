"""Every config shipped in configs/ is valid for the recipe `tune validate` picks for it."""

from pathlib import Path

import pytest

from tests.cli_helpers import run

CONFIGS = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_configs_are_found():
    assert {"tiny_full", "tiny_lora", "llama3_1_8b_qlora", "generation"} <= set(CONFIGS)
    for model in ("mistral_7b_v0_3", "qwen2_5_7b", "qwen3_8b", "gemma3_4b"):
        assert {f"{model}_lora", f"{model}_qlora"} <= set(CONFIGS)


@pytest.mark.parametrize("config", CONFIGS)
def test_shipped_config_validates(capsys, config):
    code, out, err = run(capsys, "validate", "--config", config)
    assert code == 0, err
    assert out.strip().endswith("config is valid") or err.strip().endswith("config is valid"), (out, err)
    assert "error:" not in err
