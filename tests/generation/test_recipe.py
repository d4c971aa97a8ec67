"""The generate recipe end to end through `tune generate`, on tiny random models saved in
Hugging Face format with real trained tokenizers: what it prints and writes equals the
generation block's tokens, batching changes nothing, adapters equal their merged model, and
bad input is one `error:` line with exit status 2."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from finetune.checkpointing import load_model, save_hf_checkpoint
from finetune.checkpointing.peft import save_peft_adapter
from finetune.cli import main
from finetune.data import get_template
from finetune.models import ModelArgs, TransformerDecoder, build_model
from finetune.models.generation import generate
from finetune.models.lora import adapter_params, adapter_state_dict, apply_lora, merged_state_dict
from finetune.tokenizers import load_tokenizer
from tests.tokenizer_fixtures import train_sentencepiece, write_llama3_ranks

COMMON = ["device=cpu", "dtype=fp32", "max_new_tokens=16"]


def random_model(vocab_size: int, family: str = "llama2", dim: int = 64, seed: int = 0) -> TransformerDecoder:
    args = ModelArgs(
        vocab_size=vocab_size,
        dim=dim,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        hidden_dim=128,
        max_seq_len=256,
        family=family,
    )
    torch.manual_seed(seed)
    model = build_model(args)
    model.reset_parameters(std=0.15)  # sharper than the training init, so text varies
    return model.eval()


def save_checkpoint(model: TransformerDecoder, directory: Path, tokenizer_file: Path) -> Path:
    tokenizer = load_tokenizer(tokenizer_file)
    save_hf_checkpoint(
        model.state_dict(),
        model.args,
        directory,
        tokenizer_files=[tokenizer_file],
        bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id,
    )
    return directory


@pytest.fixture(scope="module")
def llama2_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("llama2")
    tokenizer_file = train_sentencepiece(root / "tokenizer.model")
    model = random_model(load_tokenizer(tokenizer_file).vocab_size)
    return save_checkpoint(model, root / "checkpoint", tokenizer_file)


def tune_generate(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["generate", *COMMON, *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read_results(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_one_error_line(code: int, err: str, *fragments: str) -> None:
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


# ----- behaviour -----


def test_recipe_prints_and_writes_what_generate_gives(llama2_dir, capsys, tmp_path):
    out_file = tmp_path / "results.jsonl"
    code, out, err = tune_generate(
        capsys, f"checkpoint_dir={llama2_dir}", "prompt=The quick brown fox", "template=none", f"output_file={out_file}"
    )
    assert code == 0, err

    tokenizer = load_tokenizer(llama2_dir)
    model, _ = load_model(llama2_dir)
    prompt = tokenizer.encode("The quick brown fox", add_bos=True, add_eos=False)
    tokens = generate(
        model.eval(), [prompt], max_new_tokens=16, stop_tokens=tokenizer.stop_tokens, pad_id=tokenizer.pad_id
    )[0]
    expected = tokenizer.decode(tokens)
    assert len(expected) > 10

    [result] = read_results(out_file)
    assert result["response"] == expected
    assert result["generated_tokens"] == len(tokens) and result["prompt_tokens"] == len(prompt)
    assert result["stop_reason"] == ("stop_token" if tokens[-1] == tokenizer.eos_id else "max_new_tokens")
    assert out == f"=== prompt 1 of 1 ===\n<s>The quick brown fox\n=== response ===\n{expected}\n"
    assert "prompt format: none (raw text)" in err
    assert "tokens/s" in err and "time to first token" in err


def test_prompt_file_in_batches_equals_one_prompt_at_a_time(llama2_dir, capsys, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "Hello world\n\nWrite a short poem about the sea, the sky and the wind\nWhat is the capital of France?\n"
    )
    runs = {}
    for batch_size in (1, 2):
        out_file = tmp_path / f"batch{batch_size}.jsonl"
        code, out, err = tune_generate(
            capsys,
            f"checkpoint_dir={llama2_dir}",
            f"prompt_file={prompts}",
            f"batch_size={batch_size}",
            f"output_file={out_file}",
        )
        assert code == 0, err
        runs[batch_size] = read_results(out_file)
    assert [r["instruction"] for r in runs[1]] == [
        "Hello world",
        "Write a short poem about the sea, the sky and the wind",
        "What is the capital of France?",
    ]
    assert runs[2] == runs[1]
    assert len({r["response"] for r in runs[1]}) == 3
    # The default template is alpaca, and the batched run printed every prompt and response.
    assert out.count("### Instruction:\n") == 3 and out.count("=== response ===") == 3


def test_jsonl_records_use_the_template_with_input(llama2_dir, capsys, tmp_path):
    records = tmp_path / "records.jsonl"
    records.write_text(json.dumps({"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}) + "\n")
    out_file = tmp_path / "out.jsonl"
    code, out, err = tune_generate(
        capsys, f"checkpoint_dir={llama2_dir}", f"prompt_file={records}", f"output_file={out_file}"
    )
    assert code == 0, err
    formatted = get_template("alpaca").format("Add the numbers.", "2 and 3")
    assert f"<s>{formatted}\n=== response ===" in out
    [result] = read_results(out_file)
    assert (result["input"], result["reference"]) == ("2 and 3", "5")
    assert result["prompt_tokens"] == len(load_tokenizer(llama2_dir).encode(formatted, add_eos=False))


def test_stop_string_ends_the_response_before_it(llama2_dir, capsys, tmp_path):
    argv = [f"checkpoint_dir={llama2_dir}", "prompt=Hello world", "template=none", "max_new_tokens=24"]
    code, _, _ = tune_generate(capsys, *argv, f"output_file={tmp_path / 'free.jsonl'}")
    full = read_results(tmp_path / "free.jsonl")[0]["response"]
    start = next(i for i in range(2, len(full) - 3) if full.find(full[i : i + 3]) == i and full[i : i + 3].strip())
    stop = full[start : start + 3]

    code, out, err = tune_generate(
        capsys, *argv, f"stop_strings=[{json.dumps(stop)}]", f"output_file={tmp_path / 'stopped.jsonl'}"
    )
    assert code == 0, err
    [result] = read_results(tmp_path / "stopped.jsonl")
    assert result["response"] == full[:start] and result["stop_reason"] == "stop_string"
    assert result["generated_tokens"] < 24
    assert out.endswith(f"=== response ===\n{full[:start]}\n")


def test_llama2_chat_format(llama2_dir, capsys):
    code, out, err = tune_generate(
        capsys, f"checkpoint_dir={llama2_dir}", "prompt=Hello there", "chat=true", "system_prompt=Be brief."
    )
    assert code == 0, err
    assert "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHello there [/INST]\n=== response ===" in out
    assert "prompt format: llama2 chat format with a system prompt" in err


def test_llama3_chat_stops_at_eot(tmp_path, capsys):
    tokenizer_file = write_llama3_ranks(tmp_path / "tokenizer.model")
    tokenizer = load_tokenizer(tokenizer_file)
    model = random_model(tokenizer.vocab_size, family="llama3")
    # Make <|eot_id|> the likeliest token everywhere, so the answer must end at once on it: a
    # large first coordinate in every embedding dominates the residual stream, and only
    # <|eot_id|> reads it.
    with torch.no_grad():
        model.tok_embeddings.weight[:, 0] = 100.0
        model.output.weight[tokenizer.eot_id] = 0.0
        model.output.weight[tokenizer.eot_id, 0] = 10.0
    directory = save_checkpoint(model, tmp_path / "checkpoint", tokenizer_file)
    out_file = tmp_path / "out.jsonl"
    code, out, err = tune_generate(
        capsys, f"checkpoint_dir={directory}", "prompt=Hello", "chat=true", f"output_file={out_file}"
    )
    assert code == 0, err
    assert (
        "<|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n\n"
        in out
    )
    [result] = read_results(out_file)
    assert (result["stop_reason"], result["generated_tokens"], result["response"]) == ("stop_token", 1, "")


def test_adapter_generates_like_the_merged_model(llama2_dir, capsys, tmp_path):
    tokenizer_file = llama2_dir / "tokenizer.model"
    model, _ = load_model(llama2_dir)
    apply_lora(model, attn_modules=["q_proj", "v_proj"], mlp=True, output=False, rank=4, alpha=8.0)
    torch.manual_seed(1)
    with torch.no_grad():
        for param in adapter_params(model).values():
            param.normal_(std=0.2)  # B = 0 would make the adapter a no-op and the test blind
    save_peft_adapter(adapter_state_dict(model), tmp_path / "adapter", rank=4, alpha=8.0)
    merged_dir = tmp_path / "merged"
    save_hf_checkpoint(merged_state_dict(model), model.args, merged_dir, tokenizer_files=[tokenizer_file])
    # PEFT also writes target_modules as a regular expression (LoraConfig(target_modules=r"...")).
    shutil.copytree(tmp_path / "adapter", tmp_path / "pattern")
    config = json.loads((tmp_path / "pattern" / "adapter_config.json").read_text())
    config["target_modules"] = r".*\.(q_proj|v_proj|gate_proj|up_proj|down_proj)"
    (tmp_path / "pattern" / "adapter_config.json").write_text(json.dumps(config))

    responses = {}
    for name, argv in {
        "adapter": [f"checkpoint_dir={llama2_dir}", f"adapter_dir={tmp_path / 'adapter'}"],
        "pattern": [f"checkpoint_dir={llama2_dir}", f"adapter_dir={tmp_path / 'pattern'}"],
        "merged": [f"checkpoint_dir={merged_dir}", f"tokenizer_path={tokenizer_file}"],
        "base": [f"checkpoint_dir={llama2_dir}"],
    }.items():
        out_file = tmp_path / f"{name}.jsonl"
        code, _, err = tune_generate(
            capsys, *argv, "prompt=Hello world", "template=none", "max_new_tokens=20", f"output_file={out_file}"
        )
        assert code == 0, err
        responses[name] = read_results(out_file)[0]
    assert responses["adapter"] == responses["merged"] == responses["pattern"]
    assert responses["adapter"]["response"] != responses["base"]["response"]


# ----- bad input: one line, exit status 2 -----


def test_prompt_longer_than_the_context(llama2_dir, capsys, tmp_path):
    text = "Hello world, how are you today?"
    n = len(load_tokenizer(llama2_dir).encode(text, add_bos=True, add_eos=False))
    code, _, err = tune_generate(
        capsys, f"checkpoint_dir={llama2_dir}", f"prompt={text}", "template=none", f"max_new_tokens={257 - n}"
    )
    assert_one_error_line(
        code,
        err,
        f"the prompt has {n} tokens and max_new_tokens={257 - n}: 257 in all",
        "context of 256 tokens",
        "shorten the prompt or lower max_new_tokens",
    )
    code, _, err = tune_generate(
        capsys, f"checkpoint_dir={llama2_dir}", f"prompt={text}", "template=none", f"max_new_tokens={256 - n}"
    )  # fits exactly
    assert code == 0, err
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hi\n" + "the lazy dog " * 100 + "\n")
    code, _, err = tune_generate(capsys, f"checkpoint_dir={llama2_dir}", f"prompt_file={prompts}")
    assert_one_error_line(code, err, f"the prompt at line 2 of {prompts} has", "context of 256 tokens")


def test_missing_checkpoint(capsys, tmp_path):
    code, _, err = tune_generate(capsys, f"checkpoint_dir={tmp_path / 'nowhere'}", "prompt=Hi")
    assert_one_error_line(code, err, f"checkpoint directory {tmp_path / 'nowhere'} does not exist")


def test_output_file_never_writes_over_an_input_and_replaces_results_only_when_done(llama2_dir, capsys, tmp_path):
    weights = llama2_dir / "model.safetensors"
    before = weights.read_bytes()
    code, _, err = tune_generate(capsys, f"checkpoint_dir={llama2_dir}", "prompt=Hi", f"output_file={weights}")
    assert_one_error_line(code, err, f"output_file {weights} must end in .jsonl")
    assert weights.read_bytes() == before
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"instruction": "Say hi."}\n')
    code, _, err = tune_generate(
        capsys, f"checkpoint_dir={llama2_dir}", f"prompt_file={prompts}", f"output_file={prompts}"
    )
    assert_one_error_line(code, err, f"output_file {prompts} is the prompt_file")
    # A run that fails (here: a bad adapter_dir) leaves the earlier results as they were.
    results = tmp_path / "results.jsonl"
    code, _, err = tune_generate(
        capsys, f"checkpoint_dir={llama2_dir}", f"prompt_file={prompts}", "max_new_tokens=4", f"output_file={results}"
    )
    assert code == 0, err
    earlier = results.read_text()
    assert len(read_results(results)) == 1
    code, _, err = tune_generate(
        capsys,
        f"checkpoint_dir={llama2_dir}",
        f"prompt_file={prompts}",
        "max_new_tokens=4",
        f"output_file={results}",
        f"adapter_dir={tmp_path / 'no_adapter'}",
    )
    assert code == 2
    assert results.read_text() == earlier


def test_adapter_on_its_own_merged_model_is_refused(llama2_dir, capsys, tmp_path):
    # The LoRA recipe writes step_N/ (adapter) and step_N/merged/ (base + adapter): the two together
    # would apply the adapter twice.
    model, _ = load_model(llama2_dir)
    apply_lora(model, attn_modules=["q_proj", "v_proj"], mlp=False, output=False, rank=4, alpha=8.0)
    step = tmp_path / "step_5"
    save_peft_adapter(adapter_state_dict(model), step, rank=4, alpha=8.0, base_model_name_or_path=llama2_dir)
    save_hf_checkpoint(
        merged_state_dict(model), model.args, step / "merged", tokenizer_files=[llama2_dir / "tokenizer.model"]
    )
    code, _, err = tune_generate(capsys, f"checkpoint_dir={step / 'merged'}", f"adapter_dir={step}", "prompt=Hi")
    assert_one_error_line(
        code,
        err,
        f"checkpoint_dir {step / 'merged'} is the merged model of adapter_dir {step}",
        f"set checkpoint_dir to the base model ({llama2_dir})",
    )


def test_adapter_for_another_base_model(llama2_dir, capsys, tmp_path):
    other = random_model(load_tokenizer(llama2_dir).vocab_size, dim=32)
    apply_lora(other, attn_modules=["q_proj", "v_proj"], mlp=False, output=False, rank=4, alpha=8.0)
    save_peft_adapter(adapter_state_dict(other), tmp_path / "adapter", rank=4, alpha=8.0)
    code, _, err = tune_generate(
        capsys, f"checkpoint_dir={llama2_dir}", f"adapter_dir={tmp_path / 'adapter'}", "prompt=Hi"
    )
    assert_one_error_line(code, err, "q_proj.lora_A.weight", "shape [4, 32] but [4, 64] is expected")


@pytest.mark.parametrize("suffix", [".json", ".csv"])
def test_a_prompt_file_of_records_in_any_data_format(llama2_dir, capsys, tmp_path, suffix):
    path = tmp_path / f"prompts{suffix}"
    if suffix == ".json":
        path.write_text(
            json.dumps([{"instruction": "Say hi.", "output": "hi"}, {"instruction": "Count.", "input": "1"}])
        )
    else:
        path.write_text("instruction,input,output\nSay hi.,,hi\nCount.,1,\n")
    out_file = tmp_path / "out.jsonl"
    code, _, err = tune_generate(
        capsys, f"checkpoint_dir={llama2_dir}", f"prompt_file={path}", "max_new_tokens=3", f"output_file={out_file}"
    )
    assert code == 0, err
    results = read_results(out_file)
    assert [r["instruction"] for r in results] == ["Say hi.", "Count."]
    assert [r["input"] for r in results] == ["", "1"]


def test_sampling_options_at_temperature_zero_are_noted_and_do_sample_points_to_temperature(llama2_dir, capsys):
    code, _, err = tune_generate(capsys, f"checkpoint_dir={llama2_dir}", "prompt=Hi", "max_new_tokens=2", "top_p=0.5")
    assert code == 0, err
    assert "note: top_k and top_p shape sampling, which needs temperature > 0" in err
    code, _, err = tune_generate(capsys, f"checkpoint_dir={llama2_dir}", "prompt=Hi", "do_sample=true")
    assert_one_error_line(
        code, err, "unknown key 'do_sample'", "did you mean 'temperature'? (sampling is on when temperature > 0)"
    )


@pytest.mark.parametrize(
    "line, fragment",
    [
        ("{not json", "records.jsonl line 2 column 2 is not valid JSON"),
        ('{"input": "no instruction"}', "records.jsonl line 2 has no 'instruction' text"),
    ],
)
def test_bad_prompt_records(llama2_dir, capsys, tmp_path, line, fragment):
    records = tmp_path / "records.jsonl"
    records.write_text('{"instruction": "Hi"}\n' + line + "\n")
    code, _, err = tune_generate(capsys, f"checkpoint_dir={llama2_dir}", f"prompt_file={records}")
    assert_one_error_line(code, err, fragment)


def test_prompt_and_prompt_file_together(llama2_dir, capsys, tmp_path):
    code, _, err = tune_generate(
        capsys, f"checkpoint_dir={llama2_dir}", "prompt=Hi", f"prompt_file={tmp_path / 'p.txt'}"
    )
    assert_one_error_line(code, err, "set exactly one of prompt and prompt_file", "prompt=none")


def test_generation_configs_are_valid(capsys):
    for config in ("generation", "llama2_7b_generation", "llama3_1_8b_generation"):
        assert main(["validate", "--recipe", "generate", "--config", config]) == 0
    assert "config is valid" in capsys.readouterr().out
