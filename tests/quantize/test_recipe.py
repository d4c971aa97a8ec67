"""`tune quantize` end to end, the quantized directory through `tune generate`, and bad input."""

import json

import pytest

from finetune.checkpointing.quantized import load_quantized_model, weights_size
from tests.cli_helpers import error_line, run


def quantize_args(trained_dir, out, *extra: str) -> list[str]:
    return [
        "quantize",
        f"checkpoint_dir={trained_dir}",
        f"output_dir={out}",
        "template=plain",
        "max_seq_len=64",
        "eval_max_samples=64",
        "device=cpu",
        *extra,
    ]


def test_quantize_reports_size_and_perplexity_then_generate_loads_it(capsys, trained_dir, tmp_path):
    out = tmp_path / "int4"
    code, stdout, _ = run(capsys, *quantize_args(trained_dir, out, "scheme=int4_weight_only", "group_size=32"))
    assert code == 0
    record = json.loads((out / "quantization.json").read_text())
    assert record["scheme"] == "int4_weight_only" and record["group_size"] == 32
    assert record["size_bytes"] == weights_size(out) and record["source_size_bytes"] == weights_size(trained_dir)
    assert record["size_bytes"] < 0.4 * record["source_size_bytes"]
    ppl = record["perplexity"]
    assert ppl["tokens"] > 300 and ppl["before"] < 15
    assert abs(ppl["after"] / ppl["before"] - 1) < 0.03
    assert len(record["quantized_layers"]) == 15
    # The printed report carries the same numbers.
    assert f"{ppl['before']:.4f} -> {ppl['after']:.4f}" in stdout
    assert f"({record['source_size_bytes'] / record['size_bytes']:.2f}x smaller)" in stdout

    code, stdout, _ = run(
        capsys,
        "generate",
        f"checkpoint_dir={out}",
        "template=plain",
        "prompt=Add the two numbers.",
        "max_new_tokens=6",
        "device=cpu",
    )
    assert code == 0
    assert "=== response ===" in stdout


@pytest.mark.parametrize("scheme", ["int8_weight_only", "int8_dynamic"])
def test_int8_outputs_load_in_transformers_with_our_logits(capsys, trained_dir, tmp_path, scheme):
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / scheme
    assert run(capsys, *quantize_args(trained_dir, out, f"scheme={scheme}", "eval_dataset=none"))[0] == 0
    ours, _ = load_quantized_model(out, device=torch.device("cpu"))
    theirs = AutoModelForCausalLM.from_pretrained(out)
    assert (
        type(theirs.model.layers[0].self_attn.q_proj.weight).__name__
        == type(ours.layers[0].attn.q_proj.weight).__name__
    )
    tokens = torch.randint(0, ours.args.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, ours(tokens), rtol=0, atol=1e-5)


def test_a_truncated_quantized_checkpoint_is_one_error_line(capsys, trained_dir, tmp_path):
    out = tmp_path / "int8"
    assert run(capsys, *quantize_args(trained_dir, out, "scheme=int8_weight_only", "eval_dataset=none"))[0] == 0
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, _, err = run(
        capsys, "generate", f"checkpoint_dir={out}", "prompt=Hi", "template=none", "max_new_tokens=4", "device=cpu"
    )
    assert code == 2
    assert error_line(err).startswith(f"error: {weights}: tensor ")
    assert error_line(err).endswith("the file is truncated or corrupt")


def test_gptq_calibrates_on_the_given_data(capsys, trained_dir, tmp_path):
    out = tmp_path / "gptq"
    code, _, err = run(
        capsys,
        *quantize_args(
            trained_dir,
            out,
            "scheme=gptq_int4",
            "group_size=64",
            "calibration_dataset=pkg:data/demo/train.jsonl",
            "calibration_samples=16",
        ),
    )
    assert code == 0, err
    record = json.loads((out / "quantization.json").read_text())
    assert record["calibration"] == {"dataset": "pkg:data/demo/train.jsonl", "samples": 16}
    assert abs(record["perplexity"]["after"] / record["perplexity"]["before"] - 1) < 0.03
    model, _ = load_quantized_model(out)
    assert type(model.output.weight).__name__ == "IntxUnpackedToInt8Tensor"


def test_quantize_without_eval_data_skips_perplexity(capsys, trained_dir, tmp_path):
    out = tmp_path / "int8"
    code, stdout, _ = run(capsys, *quantize_args(trained_dir, out, "eval_dataset=none"))
    assert code == 0
    assert json.loads((out / "quantization.json").read_text())["perplexity"] is None
    assert "perplexity" not in stdout and "size on disk" in stdout


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["scheme=int3_weight_only"], "scheme='int3_weight_only'"),
        (["scheme=gptq_int4"], "set calibration_dataset"),
        (["scheme=int4_weight_only", "group_size=256"], "group_size=256 does not divide"),
        (["group_size=48"], "group_size=48 is not allowed"),
    ],
)
def test_bad_input_is_one_error_line(capsys, trained_dir, tmp_path, extra, expected):
    code, _, err = run(capsys, *quantize_args(trained_dir, tmp_path / "out", *extra))
    assert code == 2
    assert expected in error_line(err)
    assert not (tmp_path / "out").exists()


def test_unknown_scheme_suggests_the_close_one(capsys, trained_dir, tmp_path):
    code, _, err = run(capsys, *quantize_args(trained_dir, tmp_path / "out", "scheme=int8_weightonly"))
    assert code == 2
    line = error_line(err)
    assert "int8_weight_only" in line and "gptq_int4" in line


def test_output_dir_that_holds_other_files_is_refused(capsys, trained_dir, tmp_path):
    taken = tmp_path / "run"
    taken.mkdir()
    (taken / "metrics.jsonl").write_text("{}\n")
    code, _, err = run(capsys, *quantize_args(trained_dir, taken))
    assert code == 2
    assert "is not a quantized checkpoint" in error_line(err)
    assert (taken / "metrics.jsonl").read_text() == "{}\n"


def test_quantizing_a_quantized_checkpoint_is_refused(capsys, trained_dir, tmp_path):
    first = tmp_path / "q"
    assert run(capsys, *quantize_args(trained_dir, first, "eval_dataset=none"))[0] == 0
    code, _, err = run(capsys, *quantize_args(first, tmp_path / "again"))
    assert code == 2
    assert "already quantized (int8_weight_only)" in error_line(err)


def test_requantizing_into_the_same_output_dir_replaces_it(capsys, trained_dir, tmp_path):
    out = tmp_path / "q"
    assert run(capsys, *quantize_args(trained_dir, out, "eval_dataset=none"))[0] == 0
    assert run(capsys, *quantize_args(trained_dir, out, "eval_dataset=none", "scheme=int8_dynamic"))[0] == 0
    assert json.loads((out / "quantization.json").read_text())["scheme"] == "int8_dynamic"
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "quantization.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    assert not list(tmp_path.glob(".q.*"))  # no temporary or moved-aside directory left behind
