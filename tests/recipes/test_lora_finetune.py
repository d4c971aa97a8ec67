"""End-to-end tests of the LoRA recipe on the tiny model: only adapters train and the optimizer
state is adapter-sized, outputs load in PEFT and transformers with our logits, DoRA and QLoRA
train, resume is bit-exact after SIGKILL, and 2 processes follow 1."""

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from finetune.checkpointing import save_hf_checkpoint
from finetune.models import model_args
from finetune.params import LoraFinetuneParams, resolve_path
from finetune.recipes.lora_finetune import LoraFinetuneRecipe
from finetune.training.model_setup import initial_state_dict
from tests.recipes.helpers import TINY, as_argv, assert_same_tensors, tensors, train_losses, tune, wait_for

ALL_MODULES = {"lora_attn_modules": ["q_proj", "k_proj", "v_proj", "output_proj"], "apply_lora_to_mlp": True}


def params(tmp_path: Path, **overrides) -> LoraFinetuneParams:
    return LoraFinetuneParams(**{**TINY, "lr": 3e-3, "output_dir": str(tmp_path / "out"), **overrides})


def train(p: LoraFinetuneParams) -> LoraFinetuneRecipe:
    recipe = LoraFinetuneRecipe(p)
    recipe.setup()
    recipe.train()
    recipe.cleanup()
    return recipe


@pytest.mark.parametrize("extra", [{}, {"quantize_base": True, "use_dora": True}], ids=["lora", "qdora"])
def test_bf16_run_keeps_adapters_in_bf16_and_trains(tmp_path, extra):
    """Adapters take the run's dtype: their matmuls share the base's (bf16) input. One batch seen
    six times, so the loss falls whatever the CPU's bf16 rounding (on new batches each step, the
    loss of a random model in bf16 went down or up by the batch)."""
    one_batch = {"split": "train[:4]", "batch_size": 4, "epochs": 6}
    recipe = train(params(tmp_path, dtype="bf16", lr=1e-2, **one_batch, **ALL_MODULES, **extra))
    trainable = [p for p in recipe.model.parameters() if p.requires_grad]
    assert trainable and {p.dtype for p in trainable} == {torch.bfloat16}
    losses = train_losses(tmp_path / "out")
    assert sum(losses[-2:]) < 0.9 * sum(losses[:2]), losses


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory) -> Path:
    """A random tiny base model in HF format, as a user's downloaded checkpoint would be."""
    directory = tmp_path_factory.mktemp("base")
    args = model_args("tiny")
    state = initial_state_dict(args, weights_dir=None, checkpoint_format="auto", dtype=torch.float32, seed=3)
    save_hf_checkpoint(state, args, directory, tokenizer_files=[resolve_path(TINY["tokenizer_path"])])
    return directory


def test_only_adapters_train_and_optimizer_state_is_adapter_sized(tmp_path):
    recipe = LoraFinetuneRecipe(
        params(tmp_path, max_steps_per_epoch=15, batch_size=8, lr=1e-2, apply_lora_to_output=True, **ALL_MODULES)
    )
    recipe.setup()
    before = {name: p.detach().clone() for name, p in recipe.model.named_parameters()}
    trainable = {name for name, p in recipe.model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_a." in n or ".lora_b." in n for n in trainable)
    recipe.train()
    recipe.cleanup()
    for name, param in recipe.model.named_parameters():
        if name in trainable:
            assert not torch.equal(param, before[name]), f"{name} did not train"
        else:
            assert torch.equal(param, before[name]), f"frozen {name} changed"
    adapter_elements = sum(before[name].numel() for name in trainable)
    state_elements = sum(
        t.numel() for s in recipe.loop.optimizer.state.values() for k, t in s.items() if k in ("exp_avg", "exp_avg_sq")
    )
    assert state_elements == 2 * adapter_elements
    assert adapter_elements < 0.05 * sum(t.numel() for t in before.values())
    losses = train_losses(tmp_path / "out")
    assert sum(losses[-3:]) / 3 < 0.85 * sum(losses[:3]) / 3, losses


@pytest.mark.parametrize("use_dora", [False, True])
def test_outputs_load_in_peft_and_transformers_with_our_logits(tmp_path, hf_base, use_dora):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    p = params(
        tmp_path,
        model="auto",
        checkpoint_dir=str(hf_base),
        tokenizer_path=None,
        max_steps_per_epoch=3,
        use_dora=use_dora,
        apply_lora_to_output=True,
        **ALL_MODULES,
    )
    recipe = train(p)
    step_dir = tmp_path / "out" / "step_3"
    tokens = torch.randint(3, 512, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = recipe.model.eval()(tokens)
        base = transformers.AutoModelForCausalLM.from_pretrained(hf_base, dtype=torch.float32)
        with_adapter = peft.PeftModel.from_pretrained(base, step_dir).eval()
        merged = transformers.AutoModelForCausalLM.from_pretrained(step_dir / "merged", dtype=torch.float32).eval()
        assert (with_adapter(tokens).logits - ours).abs().max().item() <= 1e-5
        assert (merged(tokens).logits - ours).abs().max().item() <= 1e-5
        untrained = transformers.AutoModelForCausalLM.from_pretrained(hf_base, dtype=torch.float32).eval()
        assert (untrained(tokens).logits - ours).abs().max().item() > 1e-3  # the adapter did something


def test_qlora_trains_with_a_4_bit_base(tmp_path):
    from finetune import ao

    # Adapters on q and v only: every other projection must be 4-bit as well.
    recipe = LoraFinetuneRecipe(params(tmp_path, max_steps_per_epoch=12, batch_size=8, quantize_base=True))
    recipe.setup()
    bases = [
        w
        for name, w in recipe.model.named_parameters()
        if name.startswith("layers.") and w.dim() == 2 and ".lora_" not in name
    ]
    assert len(bases) == 7 * len(recipe.model.layers) and all(ao.is_nf4(w) for w in bases)
    nf4_bytes = sum(ao.nf4_nbytes(w) for w in bases)
    fp32_bytes = sum(w.numel() * 4 for w in bases)
    assert nf4_bytes / fp32_bytes < 0.135  # 4 bits per weight plus block scales, against 32
    recipe.train()
    recipe.cleanup()
    losses = train_losses(tmp_path / "out")
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, losses


@pytest.mark.slow
@pytest.mark.parametrize("nproc,method", [(1, "dora"), (2, "dora"), (2, "qdora")])
def test_resume_after_sigkill_is_bit_exact(tmp_path, nproc, method):
    launcher = ["--nproc_per_node", str(nproc)] if nproc > 1 else []
    run = as_argv(
        max_steps_per_epoch=4,
        epochs=2,
        save_every_n_steps=2,
        batch_size=2,
        lr=3e-3,
        use_dora="true",
        lora_dropout=0.1,
        quantize_base=str(method == "qdora").lower(),
    )
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    result = tune(*launcher, "lora_finetune", *run, f"output_dir={reference}")
    assert result.returncode == 0, result.stderr[-3000:]
    process = tune(*launcher, "lora_finetune", *run, f"output_dir={interrupted}", wait=False, start_new_session=True)
    wait_for(interrupted / "step_4", process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (interrupted / "step_8").exists(), "the run finished before it was killed"
    result = tune(*launcher, "lora_finetune", *run, f"output_dir={interrupted}", "resume_from_checkpoint=true")
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("adapter_model.safetensors", "merged/model.safetensors"):
        assert_same_tensors(reference / "step_8" / name, interrupted / "step_8" / name)
    assert train_losses(reference)[-1] == train_losses(interrupted)[-1]


def test_a_rank_above_the_smallest_adapted_side_is_refused(tmp_path):
    from finetune.errors import UserError

    with pytest.raises(UserError, match=r"lora_rank=1000000 exceeds 128, the smallest side of an adapted layer"):
        LoraFinetuneRecipe(params(tmp_path, lora_rank=1_000_000)).setup()


def test_resume_refuses_changed_adapter_settings_and_the_other_recipe(tmp_path, capsys):
    from finetune.cli import main

    out = tmp_path / "out"
    run = as_argv(max_steps_per_epoch=2, warmup_steps=1, output_dir=out)
    assert main(["lora_finetune", *run]) == 0
    saved_params = (out / "params.yaml").read_text()
    capsys.readouterr()
    assert main(["lora_finetune", *run, "resume_from_checkpoint=true", "lora_alpha=1.0"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: lora_alpha is 1.0 but {out / 'step_2'} was trained with 16.0; a resumed run keeps its settings: "
        "set lora_alpha=16.0, or start a new run in another output_dir"
    )
    assert main(["finetune_llm", *run, "resume_from_checkpoint=true"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {out / 'step_2'} is a checkpoint of a LoRA run; resume it with the recipe that wrote it "
        "(tune lora_finetune, or tune dpo with use_lora=true), or choose another output_dir"
    )
    assert (out / "params.yaml").read_text() == saved_params


@pytest.mark.slow
def test_a_bad_base_checkpoint_stops_both_processes_with_one_line(tmp_path, hf_base):
    """Rank 0 alone reads the base weights; the other rank must stop with it, not wait or crash."""
    from safetensors.torch import save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    for item in hf_base.iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    weights = tensors(hf_base / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    result = tune(
        "--nproc_per_node",
        "2",
        "lora_finetune",
        *as_argv(
            model="auto", checkpoint_dir=broken, tokenizer_path=None, max_steps_per_epoch=2, output_dir=tmp_path / "out"
        ),
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "[rank" not in result.stderr, result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        f"error: checkpoint {broken} lacks tensors the model needs: model.layers.1.mlp.up_proj.weight; "
        "the checkpoint is incomplete or for a different model"
    ]


@pytest.mark.slow
@pytest.mark.parametrize(
    "nproc,stop_signal",
    [
        (1, signal.SIGINT),
        (2, signal.SIGINT),
        (1, signal.SIGTERM),
        (2, signal.SIGTERM),
    ],
    ids=["1-ctrl_c", "2-ctrl_c", "1-sigterm", "2-sigterm"],
)
def test_a_stop_signal_stops_after_a_step_and_resumes_bit_exact(tmp_path, nproc, stop_signal):
    """With dropout drawing random numbers inside each step, only a stop between steps resumes exactly.
    The signal goes to every process, as a terminal's Ctrl-C or Slurm's preemption does (torchrun then
    passes it on to the workers a second time)."""
    launcher = ["--nproc_per_node", str(nproc)] if nproc > 1 else []
    run = as_argv(max_steps_per_epoch=40, batch_size=2, lr=3e-3, lora_dropout=0.1)
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    result = tune(*launcher, "lora_finetune", *run, f"output_dir={reference}")
    assert result.returncode == 0, result.stderr[-3000:]
    process = tune(*launcher, "lora_finetune", *run, f"output_dir={interrupted}", wait=False, start_new_session=True)
    deadline = time.time() + 300
    while not (interrupted / "metrics.jsonl").exists() or len(train_losses(interrupted)) < 3:
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.02)
    os.killpg(process.pid, stop_signal)
    _, stderr = process.communicate(timeout=120)
    assert "Traceback" not in stderr, stderr[-3000:]
    (saved,) = interrupted.glob("step_*")
    assert saved.name != "step_40", "the run finished before it was interrupted"
    record = json.loads((interrupted / "status.json").read_text())
    assert record["state"] == ("stopped" if stop_signal == signal.SIGINT else "preempted"), record
    assert record["last_checkpoint"] == str(saved)
    result = tune(*launcher, "lora_finetune", *run, f"output_dir={interrupted}", "resume_from_checkpoint=true")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_tensors(
        reference / "step_40" / "adapter_model.safetensors", interrupted / "step_40" / "adapter_model.safetensors"
    )
    assert process.returncode == 128 + stop_signal, stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("quantize_base", ["false", "true"], ids=["lora", "qlora"])
def test_two_processes_follow_one_process(tmp_path, quantize_base):
    """Adapters sharded by FSDP follow one process; under QLoRA every rank holds the same 4-bit
    base (quantized once, broadcast). The merged models agree."""
    run = as_argv(max_steps_per_epoch=4, lr=3e-3, apply_lora_to_mlp="true", quantize_base=quantize_base)
    one = tune("lora_finetune", *run, "batch_size=4", f"output_dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-3000:]
    two = tune("--nproc_per_node", "2", "lora_finetune", *run, "batch_size=2", f"output_dir={tmp_path / 'two'}")
    assert two.returncode == 0, two.stderr[-3000:]
    for a, b in zip(train_losses(tmp_path / "one"), train_losses(tmp_path / "two"), strict=True):
        assert abs(a - b) <= 1e-4
    merged_one = tensors(tmp_path / "one" / "step_4" / "merged" / "model.safetensors")
    merged_two = tensors(tmp_path / "two" / "step_4" / "merged" / "model.safetensors")
    assert merged_one.keys() == merged_two.keys()
    for name in merged_one:
        torch.testing.assert_close(merged_two[name], merged_one[name], rtol=0, atol=1e-5)
