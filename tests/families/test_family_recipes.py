"""Each family through the recipes, from a Hub-like snapshot (transformers' weights and config,
the family's tokenizer files): a full fine-tune at a vanishing learning rate writes back the
source's tensors, and a LoRA run through `tune` trains and its outputs load in transformers and
PEFT with our logits."""

import json
import shutil

import pytest
import torch

from finetune.checkpointing import load_model
from finetune.params import FullFinetuneParams
from finetune.recipes.full_finetune import FullFinetuneRecipe
from tests.families.hub_tokenizers import make_hub_tokenizer
from tests.recipes.helpers import tensors, train_losses, tune

# One model config per family (see conftest.py): Qwen 2.5 and Gemma 3 tied, Qwen 3 untied.
FAMILY_MODELS = {"mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3_untied", "gemma3": "gemma3"}
VOCAB = 512  # above every test tokenizer's size


@pytest.fixture(params=tuple(FAMILY_MODELS))
def snapshot(request, tmp_path, make_family_model):
    """A folder laid out like a Hub download: weights, config.json and the tokenizer files."""
    family = request.param
    tokenizer_dir, _ = make_hub_tokenizer(family, tmp_path / "tokenizer")
    model_dir = tmp_path / "snapshot"
    hf_model = make_family_model(FAMILY_MODELS[family], vocab_size=VOCAB)
    with torch.no_grad():
        # transformers zeroes Gemma's pad row; an exact zero would move by the vanishing step below.
        hf_model.get_input_embeddings().weight[0].normal_(0.0, 0.02)
    hf_model.save_pretrained(model_dir)
    for file in tokenizer_dir.iterdir():
        shutil.copy(file, model_dir / file.name)
    return family, model_dir


def _chat_data(path, n: int = 96):
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            a, b = i % 7, (3 * i) % 5
            messages = [
                {"role": "user", "content": f"Add {a} and {b}."},
                {"role": "assistant", "content": f"The sum is {a + b}."},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def test_full_finetune_round_trip_writes_the_source_tensors(snapshot, tmp_path):
    family, model_dir = snapshot
    params = FullFinetuneParams(
        model="auto",
        checkpoint_dir=str(model_dir),
        dataset=str(_chat_data(tmp_path / "chat.jsonl")),
        dataset_type="chat",
        max_seq_len=48,
        batch_size=2,
        max_steps_per_epoch=1,
        epochs=1,
        lr=1e-30,  # a step that moves no fp32 weight
        weight_decay=0.0,
        device="cpu",
        dtype="fp32",
        output_dir=str(tmp_path / "out"),
    )
    recipe = FullFinetuneRecipe(params)
    recipe.setup()
    recipe.train()
    recipe.cleanup()
    out = tmp_path / "out" / "step_1"
    source, written = tensors(model_dir / "model.safetensors"), tensors(out / "model.safetensors")
    assert source.keys() == written.keys()
    for name in source:
        assert torch.equal(source[name], written[name]), name
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == json.loads((model_dir / "config.json").read_text())["architectures"]
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (model_dir / name).read_bytes()


@pytest.mark.slow
def test_lora_run_through_tune_trains_and_loads_in_transformers_and_peft(snapshot, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    family, model_dir = snapshot
    out = tmp_path / "out"
    result = tune(
        "lora_finetune",
        "model=auto",
        f"checkpoint_dir={model_dir}",
        f"dataset={_chat_data(tmp_path / 'chat.jsonl', 320)}",
        "dataset_type=chat",
        "max_seq_len=48",
        "batch_size=8",
        "epochs=1",
        "max_steps_per_epoch=40",
        "lr=2e-2",
        "lora_attn_modules=[q_proj,k_proj,v_proj,output_proj]",
        "apply_lora_to_mlp=true",
        "device=cpu",
        "dtype=fp32",
        f"output_dir={out}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    losses = train_losses(out)
    # A tiny random base learns slowly through adapters; each family falls by 0.6-0.9 nats here.
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.4, losses

    step_dir = out / "step_40"
    merged, _ = load_model(step_dir / "merged")
    tokens = torch.randint(3, 400, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = merged.eval()(tokens)
        base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        with_adapter = peft.PeftModel.from_pretrained(base, step_dir).eval()
        theirs_merged = transformers.AutoModelForCausalLM.from_pretrained(step_dir / "merged", dtype=torch.float32)
        assert (with_adapter(tokens).logits - ours).abs().max().item() <= 1e-5
        assert (theirs_merged.eval()(tokens).logits - ours).abs().max().item() <= 1e-5
    tokenizer = transformers.AutoTokenizer.from_pretrained(step_dir / "merged")
    assert tokenizer.chat_template is not None


@pytest.mark.parametrize("variant", [{"use_dora": True}, {"quantize_base": True}], ids=["dora", "qlora"])
def test_dora_and_qlora_outputs_load_with_our_logits(snapshot, tmp_path, variant):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from finetune import ao
    from finetune.params import LoraFinetuneParams
    from finetune.recipes.lora_finetune import LoraFinetuneRecipe

    family, model_dir = snapshot
    params = LoraFinetuneParams(
        model="auto",
        checkpoint_dir=str(model_dir),
        dataset=str(_chat_data(tmp_path / "chat.jsonl")),
        dataset_type="chat",
        max_seq_len=48,
        batch_size=4,
        max_steps_per_epoch=4,
        lr=1e-2,
        lora_attn_modules=["q_proj", "k_proj", "v_proj", "output_proj"],
        apply_lora_to_mlp=True,
        device="cpu",
        dtype="fp32",
        output_dir=str(tmp_path / "out"),
        **variant,
    )
    recipe = LoraFinetuneRecipe(params)
    recipe.setup()
    recipe.train()
    recipe.cleanup()
    model = recipe.model.eval()
    if variant.get("quantize_base"):
        bases = ("proj.weight", "w1.weight", "w2.weight", "w3.weight")
        projections = [w for n, w in model.named_parameters() if n.startswith("layers.") and n.endswith(bases)]
        assert len(projections) == 7 * len(model.layers) and all(ao.is_nf4(w) for w in projections)
    step_dir = tmp_path / "out" / "step_4"
    tokens = torch.randint(3, 400, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(tokens)
        merged = transformers.AutoModelForCausalLM.from_pretrained(step_dir / "merged", dtype=torch.float32).eval()
        assert (merged(tokens).logits - ours).abs().max().item() <= 1e-5
        if not variant.get("quantize_base"):  # PEFT puts the adapter on the full-precision base
            base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            with_adapter = peft.PeftModel.from_pretrained(base, step_dir).eval()
            assert (with_adapter(tokens).logits - ours).abs().max().item() <= 1e-5
        source = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        assert (source(tokens).logits - ours).abs().max().item() > 1e-3  # the adapters did something
