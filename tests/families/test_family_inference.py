"""generate, quantize and eleuther_eval on each new family, from a Hub-like snapshot: greedy chat
generation equals transformers' from the chat template's prompt, int8 outputs load in transformers
with our logits, and the harness scores local tasks as designed."""

import json
import shutil

import pytest
import torch

from finetune.checkpointing import load_model
from finetune.checkpointing.quantized import load_quantized_model
from finetune.tokenizers.loader import load_tokenizer_for_model
from tests.cli_helpers import run
from tests.families.conftest import build_family_model
from tests.families.hub_tokenizers import make_hub_tokenizer

FAMILY_MODELS = {"mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3"}
PROMPT = "Name a colour, then count: 1 2 3"


@pytest.fixture(scope="module", params=tuple(FAMILY_MODELS))
def snapshot(request, tmp_path_factory):
    """(family, folder laid out like a Hub download, transformers' model, transformers' tokenizer)."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    tokenizer_dir, hf_tokenizer = make_hub_tokenizer(family, root / "tokenizer")
    hf_model = build_family_model(FAMILY_MODELS[family], vocab_size=512)
    with torch.no_grad():  # weights larger than the init, so greedy choices are clear-cut
        for name, param in hf_model.named_parameters():
            if name.endswith("proj.weight") or name.endswith("embed_tokens.weight"):
                param.normal_(0.0, 0.15)
    model_dir = root / "snapshot"
    hf_model.save_pretrained(model_dir)
    for file in tokenizer_dir.iterdir():
        shutil.copy(file, model_dir / file.name)
    return family, model_dir, hf_model, hf_tokenizer


def test_chat_generation_equals_transformers_generate(snapshot, capsys, tmp_path):
    family, model_dir, hf_model, hf_tokenizer = snapshot
    out_file = tmp_path / "out.jsonl"
    code, _, err = run(
        capsys,
        "generate",
        f"checkpoint_dir={model_dir}",
        "chat=true",
        f"prompt={PROMPT}",
        "max_new_tokens=12",
        "device=cpu",
        "dtype=fp32",
        f"output_file={out_file}",
    )
    assert code == 0, err
    [result] = [json.loads(line) for line in out_file.read_text().splitlines()]

    prompt = hf_tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert result["prompt_tokens"] == len(prompt)
    stops = load_tokenizer_for_model(model_dir, family, 512).stop_tokens
    with torch.no_grad():
        generated = hf_model.generate(
            torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=stops, pad_token_id=stops[0]
        )[0, len(prompt) :]
    assert result["generated_tokens"] == len(generated) == 12  # no stop token: the whole length compared
    assert result["response"] == hf_tokenizer.decode(generated, skip_special_tokens=True)


def test_int8_quantized_output_loads_in_transformers_with_our_logits(snapshot, capsys, tmp_path):
    from transformers import AutoModelForCausalLM

    family, model_dir, _, _ = snapshot
    out = tmp_path / "int8"
    code, _, err = run(
        capsys,
        "quantize",
        f"checkpoint_dir={model_dir}",
        f"output_dir={out}",
        "scheme=int8_weight_only",
        "eval_dataset=none",
        "device=cpu",
    )
    assert code == 0, err
    ours, _ = load_quantized_model(out, device=torch.device("cpu"))
    theirs = AutoModelForCausalLM.from_pretrained(out)
    tokens = torch.randint(3, 400, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, ours(tokens), rtol=0, atol=1e-5)
    assert (out / "tokenizer.json").is_file()


def test_eleuther_eval_scores_local_tasks_as_designed(snapshot, capsys, tmp_path):
    pytest.importorskip("lm_eval")
    from tests.eval.test_recipe import write_tasks

    family, model_dir, _, _ = snapshot
    model, args = load_model(model_dir)
    tokenizer = load_tokenizer_for_model(model_dir, family, args.vocab_size)
    write_tasks(tmp_path / "tasks", model.eval(), tokenizer)
    output = tmp_path / "eval.json"
    code, _, err = run(
        capsys,
        "eleuther_eval",
        f"checkpoint_dir={model_dir}",
        f"include_path={tmp_path / 'tasks'}",
        f"output_path={output}",
        "tasks=[local_gen,local_mc]",
        "device=cpu",
        "batch_size=4",
    )
    assert code == 0, err
    results = json.loads(output.read_text())["results"]
    assert results["local_gen"]["exact_match,none"] == pytest.approx(0.5)
    assert results["local_mc"]["acc,none"] == pytest.approx(0.5)
