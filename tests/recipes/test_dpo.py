"""End-to-end tests of the dpo recipe on the tiny model and the shipped demo pairs: the reward
accuracy rises, outputs load in transformers and PEFT, the adapters-off and precomputed references
give the frozen copy's numbers, 2 processes follow 1, and resume is bit-exact after SIGKILL."""

import os
import signal
from pathlib import Path

import pytest
import torch

from finetune.params import DpoParams
from finetune.recipes.dpo import REFERENCE_FILE, DpoRecipe
from tests.recipes.helpers import TINY, as_argv, assert_same_tensors, metrics, tensors, train_losses, tune, wait_for

PAIRS = {
    "dataset": "pkg:data/demo/preference_train.jsonl",
    "split": "train[:64]",  # a precomputed reference scores every pair before the first step
    "template": "plain",
    "lr": 1e-3,
}
HELD_OUT = {"eval_dataset": "pkg:data/demo/preference_heldout.jsonl", "eval_split": "train[:16]"}
LORA = {"use_lora": True, "lora_attn_modules": ["q_proj", "v_proj", "output_proj"], "apply_lora_to_mlp": True}


def params(tmp_path: Path, **overrides) -> DpoParams:
    return DpoParams(**{**TINY, **PAIRS, "output_dir": str(tmp_path / "out"), **overrides})


def train(p: DpoParams) -> DpoRecipe:
    recipe = DpoRecipe(p)
    recipe.setup()
    recipe.train()
    recipe.cleanup()
    return recipe


def evaluations(output_dir: Path) -> list[dict]:
    return [m for m in metrics(output_dir) if "eval_loss" in m]


def test_the_chosen_answers_win_on_the_pairs_it_trains_on(tmp_path):
    """A random-init model learns to rank 32 pairs: reward accuracy from 0 (policy = reference) to most."""
    few = {"split": "train[:32]", "eval_dataset": PAIRS["dataset"], "eval_split": "train[:32]"}
    train(params(tmp_path, batch_size=8, epochs=6, eval_every_n_steps=24, beta=0.5, **few))
    first, last = evaluations(tmp_path / "out")[0], evaluations(tmp_path / "out")[-1]
    assert first["eval_reward_accuracy"] == 0 and first["eval_loss"] == pytest.approx(0.6931, abs=1e-4)
    assert last["eval_reward_accuracy"] >= 0.9 and last["eval_loss"] < 0.4, last
    assert last["eval_reward_margin"] > 0 and last["eval_rewards_chosen"] > last["eval_rewards_rejected"]
    step = metrics(tmp_path / "out")[1]
    for key in ("loss", "rewards_chosen", "rewards_rejected", "reward_accuracy", "reward_margin", "logps_chosen"):
        assert key in step, key
    for name in ("model.safetensors", "config.json", "tokenizer.model", "params.yaml", "recipe_state.pt"):
        assert (tmp_path / "out" / "step_24" / name).is_file(), name


def test_full_output_loads_in_transformers_with_our_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    recipe = train(params(tmp_path, max_steps_per_epoch=2))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "step_2", dtype=torch.float32).eval()
    tokens = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (recipe.model.eval()(tokens) - hf(tokens).logits).abs().max().item() <= 1e-5
    assert recipe.reference_model is not None and all(not p.requires_grad for p in recipe.reference_model.parameters())


def test_lora_reference_is_the_base_with_adapters_off_and_outputs_are_peft(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    recipe = DpoRecipe(params(tmp_path, max_steps_per_epoch=3, lr=1e-2, **LORA, **HELD_OUT))
    recipe.setup()
    assert recipe.reference_model is None  # no second copy of the weights
    recipe.train()
    recipe.cleanup()
    first, last = evaluations(tmp_path / "out")[0], evaluations(tmp_path / "out")[-1]
    assert first["eval_rewards_chosen"] == 0 and first["eval_rewards_rejected"] == 0  # adapters start as no-ops
    assert last["eval_rewards_chosen"] != 0  # the adapters moved the policy away from its reference
    step_dir = tmp_path / "out" / "step_3"
    tokens = torch.randint(3, 512, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = recipe.model.eval()(tokens)
        merged = transformers.AutoModelForCausalLM.from_pretrained(step_dir / "merged", dtype=torch.float32).eval()
        assert (merged(tokens).logits - ours).abs().max().item() <= 1e-5
    assert peft.PeftConfig.from_pretrained(step_dir).r == 8


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_precomputed_reference_gives_the_live_references_losses(tmp_path, lora):
    extra = {**(LORA if lora else {}), "max_steps_per_epoch": 3, **HELD_OUT}
    train(params(tmp_path / "live", **extra))
    train(params(tmp_path / "table", precompute_reference_logps=True, **extra))
    live, table = metrics(tmp_path / "live" / "out"), metrics(tmp_path / "table" / "out")
    for a, b in zip(live, table, strict=True):
        for key in ("loss", "eval_loss", "reward_margin", "eval_reward_margin"):
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-5), key
    assert (tmp_path / "table" / "out" / "step_3" / REFERENCE_FILE).is_file()


def test_simpo_runs_without_a_reference(tmp_path):
    recipe = train(params(tmp_path, loss_type="simpo", beta=2.0, max_steps_per_epoch=3))
    assert recipe.reference_model is None and recipe.reference_tables is None
    assert len(train_losses(tmp_path / "out")) == 3


def test_bad_pairs_stop_with_one_line_naming_the_line(tmp_path, capsys):
    from finetune.recipes.dpo import main

    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": "a"}\n')
    argv = as_argv(dataset=str(data), output_dir=tmp_path / "out")
    assert main(argv) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .splitlines()[-1]
        .startswith(f"error: column 'rejected' is missing from {data} line 2;")
    )


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora"])
def test_two_processes_follow_one_process(tmp_path, method):
    extra = ["use_lora=true", "lr=1e-2"] if method == "lora" else []
    run = [*as_argv(**PAIRS, max_steps_per_epoch=3), *extra]
    one = tune("dpo", *run, "batch_size=4", f"output_dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-3000:]
    two = tune("--nproc_per_node", "2", "dpo", *run, "batch_size=2", f"output_dir={tmp_path / 'two'}")
    assert two.returncode == 0, two.stderr[-3000:]
    for a, b in zip(metrics(tmp_path / "one"), metrics(tmp_path / "two"), strict=True):
        for key in ("loss", "reward_margin", "rewards_chosen", "logps_chosen"):
            assert abs(a[key] - b[key]) <= 1e-4 * max(1, abs(a[key])), (key, a[key], b[key])
        assert a["reward_accuracy"] == b["reward_accuracy"]
    weights = "model.safetensors" if method == "full" else "adapter_model.safetensors"
    wa, wb = (tensors(tmp_path / run / "step_3" / weights) for run in ("one", "two"))
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize(
    "nproc,extra",
    [(1, []), (2, ["use_lora=true", "lr=1e-2", "precompute_reference_logps=true"])],
    ids=["full-1", "lora-precomputed-2"],
)
def test_resume_after_sigkill_is_bit_exact(tmp_path, nproc, extra):
    launcher = ["--nproc_per_node", str(nproc)] if nproc > 1 else []
    run = [*as_argv(**PAIRS, max_steps_per_epoch=4, epochs=2, save_every_n_steps=2, batch_size=2), *extra]
    weights = "adapter_model.safetensors" if extra else "model.safetensors"
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    result = tune(*launcher, "dpo", *run, f"output_dir={reference}")
    assert result.returncode == 0, result.stderr[-3000:]

    process = tune(*launcher, "dpo", *run, f"output_dir={interrupted}", wait=False, start_new_session=True)
    wait_for(interrupted / "step_4", process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (interrupted / "step_8").exists(), "the run finished before it was killed"
    result = tune(*launcher, "dpo", *run, f"output_dir={interrupted}", "resume_from_checkpoint=true")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_tensors(reference / "step_8" / weights, interrupted / "step_8" / weights)
    assert train_losses(reference)[-1] == train_losses(interrupted)[-1]
