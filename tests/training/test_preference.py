"""The preference losses against TRL on the same weights and pairs, in fp32.

Our side runs the tiny Llama through `PreferenceObjective` (log-probs, loss, metrics) exactly as a
training step does. TRL's side runs its own code on a transformers model loaded from our HF export
of the same weights: `DPOTrainer._compute_loss` for sigmoid DPO and IPO, and `CPOTrainer`'s
log-prob and loss functions for SimPO and for DPO with label smoothing (TRL's DPO trainer keeps
label smoothing for its robust and EXO losses; CPO's sigmoid loss is the label-smoothed DPO loss
when handed the policy-over-reference log-ratios).
"""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from finetune.checkpointing import save_hf_checkpoint
from finetune.data.demo import demo_path
from finetune.data.preference import build_preference_dataset, collate_pairs
from finetune.models import model_args
from finetune.tokenizers import load_tokenizer
from finetune.training.model_setup import build_on_cpu, initial_state_dict
from finetune.training.preference import PreferenceLoss, PreferenceObjective, reference_from_model, sequence_logps

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")

PAIRS = [
    {"prompt": "Add the two numbers.\n3 and 4\n", "chosen": "7", "rejected": "8"},
    {"prompt": "Which number is larger?\n12 or 40\n", "chosen": "40", "rejected": "12 or maybe 40"},
    {"prompt": "Reverse the order of the words.\ncat dog sun\n", "chosen": "sun dog cat", "rejected": "cat sun dog"},
    {"prompt": "Count from 3 to 6.\n", "chosen": "3 4 5 6", "rejected": "3 5 6"},
    {"prompt": "Convert meters to centimeters.\n2 m\n", "chosen": "200 cm", "rejected": "20 cm"},
]
ATOL = 1e-5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Our policy and reference (different weights), their HF exports, and one batch of pairs."""
    root = tmp_path_factory.mktemp("pairs")
    args = model_args("tiny")
    models, exports = [], []
    # Seeds whose models rank some pairs each way with the demo tokenizer: a batch that tells the losses apart.
    for name, seed in (("policy", 1), ("reference", 3)):
        state = initial_state_dict(args, weights_dir=None, checkpoint_format="auto", dtype=torch.float32, seed=seed)
        save_hf_checkpoint(state, args, root / name, tokenizer_files=[demo_path("tokenizer.model")])
        models.append(build_on_cpu(args, state).eval())
        exports.append(root / name)
    data = root / "pairs.jsonl"
    data.write_text("".join(f"{__import__('json').dumps(p)}\n" for p in PAIRS))
    tokenizer = load_tokenizer(demo_path("tokenizer.model"))
    dataset = build_preference_dataset(str(data), chat=False, tokenizer=tokenizer, max_seq_len=64)
    batch = collate_pairs([dataset[i] for i in range(len(dataset))], pad_id=tokenizer.pad_id)
    rows = [dataset[i]["chosen"] for i in range(len(dataset))] + [dataset[i]["rejected"] for i in range(len(dataset))]
    lengths = torch.tensor([len(r["tokens"]) for r in rows])
    return SimpleNamespace(policy=models[0], reference=models[1], exports=exports, batch=batch, lengths=lengths)


def ours(setup, loss: PreferenceLoss) -> dict[str, float]:
    objective = PreferenceObjective(
        setup.policy,
        loss,
        train_reference=reference_from_model(setup.reference, loss_chunks=0),
        eval_reference=None,
        device=torch.device("cpu"),
        world_size=1,
    )
    metrics = objective.accumulate_gradients([setup.batch])
    setup.policy.zero_grad(set_to_none=True)
    return metrics


def hf_model(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def trl_inputs(setup) -> dict[str, torch.Tensor]:
    """The batch as TRL's DPO collator lays it out: completion_mask marks response tokens."""
    tokens, labels = setup.batch["tokens"], setup.batch["labels"]
    attention_mask = (torch.arange(tokens.shape[1])[None] < setup.lengths[:, None]).long()
    completion_mask = torch.zeros_like(tokens)
    completion_mask[:, 1:] = (labels[:, :-1] != -100).long()  # our labels are shifted: label i is token i+1
    return {"input_ids": tokens, "attention_mask": attention_mask, "completion_mask": completion_mask}


def unshifted_labels(setup) -> torch.Tensor:
    """Labels as TRL's CPO trainer takes them (label i is token i, -100 off the responses)."""
    labels = torch.full_like(setup.batch["labels"], -100)
    labels[:, 1:] = setup.batch["labels"][:, :-1]
    return labels


def test_our_log_probs_equal_trls_from_a_transformers_model(setup):
    from trl.experimental.cpo import CPOTrainer

    with torch.no_grad():
        logits = hf_model(setup.exports[0])(
            setup.batch["tokens"], attention_mask=trl_inputs(setup)["attention_mask"]
        ).logits
        theirs = CPOTrainer.get_batch_logps(logits, unshifted_labels(setup))
        mine = sequence_logps(setup.policy, setup.batch)
    assert mine.shape == (2 * len(PAIRS),)
    # Sums of up to ~80 in fp32: equal to a few units in the last place.
    torch.testing.assert_close(mine, theirs, atol=ATOL, rtol=1e-6)


@pytest.mark.parametrize("loss_type,beta", [("sigmoid", 0.1), ("sigmoid", 0.5), ("ipo", 0.1)])
def test_dpo_and_ipo_equal_trls_dpo_trainer(setup, tmp_path, loss_type, beta):
    from datasets import Dataset

    tokenizer = transformers.AutoTokenizer.from_pretrained(setup.exports[0])
    tokenizer.pad_token = tokenizer.eos_token
    # bf16=False: TRL's config turns bf16 autocast on by default, which the reference model's
    # forward would then run under.
    config = trl.DPOConfig(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, beta=beta, loss_type=[loss_type]
    )
    trainer = trl.DPOTrainer(
        model=hf_model(setup.exports[0]),
        ref_model=hf_model(setup.exports[1]),
        args=config,
        train_dataset=Dataset.from_list(PAIRS),
        processing_class=tokenizer,
    )
    trainer.model.train()
    loss = trainer._compute_loss(trainer.model, trl_inputs(setup), False).item()
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    mine = ours(setup, PreferenceLoss(loss_type, beta=beta))
    assert mine["loss"] == pytest.approx(loss, abs=ATOL)
    assert mine["rewards_chosen"] == pytest.approx(logged["rewards/chosen"], abs=ATOL)
    assert mine["rewards_rejected"] == pytest.approx(logged["rewards/rejected"], abs=ATOL)
    assert mine["reward_margin"] == pytest.approx(logged["rewards/margins"], abs=ATOL)
    assert mine["reward_accuracy"] == logged["rewards/accuracies"]
    assert mine["logps_chosen"] == pytest.approx(logged["logps/chosen"], abs=1e-4)
    assert mine["logps_rejected"] == pytest.approx(logged["logps/rejected"], abs=1e-4)
    assert 0 < mine["reward_accuracy"] < 1 and abs(mine["reward_margin"]) > 1e-3  # a batch that tells losses apart


def cpo_loss(loss_type: str, beta: float, label_smoothing: float, gamma: float = 0.5):
    """TRL's CPO loss function, bound to the settings it reads."""
    from trl.experimental.cpo import CPOTrainer

    settings = SimpleNamespace(
        alpha=0.0,
        beta=beta,
        label_smoothing=label_smoothing,
        simpo_gamma=gamma,
        loss_type=loss_type,
        accelerator=SimpleNamespace(device=torch.device("cpu")),
    )
    return lambda chosen, rejected: CPOTrainer.cpo_loss(settings, chosen, rejected)


def trl_logps(setup, which: int, average: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from trl.experimental.cpo import CPOTrainer

    with torch.no_grad():
        logits = hf_model(setup.exports[which])(
            setup.batch["tokens"], attention_mask=trl_inputs(setup)["attention_mask"]
        ).logits
    return CPOTrainer.get_batch_logps(logits, unshifted_labels(setup), average_log_prob=average).chunk(2)


def assert_matches(mine: dict[str, float], losses, chosen_rewards, rejected_rewards) -> None:
    assert mine["loss"] == pytest.approx(losses.mean().item(), abs=ATOL)
    assert mine["rewards_chosen"] == pytest.approx(chosen_rewards.mean().item(), abs=ATOL)
    assert mine["rewards_rejected"] == pytest.approx(rejected_rewards.mean().item(), abs=ATOL)
    assert mine["reward_margin"] == pytest.approx((chosen_rewards - rejected_rewards).mean().item(), abs=ATOL)
    assert mine["reward_accuracy"] == (chosen_rewards > rejected_rewards).float().mean().item()


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_simpo_equals_trls_cpo_simpo(setup, label_smoothing):
    chosen, rejected = trl_logps(setup, 0, average=True)
    losses, chosen_rewards, rejected_rewards = cpo_loss("simpo", 2.0, label_smoothing, gamma=0.7)(chosen, rejected)
    mine = ours(setup, PreferenceLoss("simpo", beta=2.0, label_smoothing=label_smoothing, simpo_gamma=0.7))
    assert_matches(mine, losses, chosen_rewards, rejected_rewards)


def test_label_smoothed_dpo_equals_trls_conservative_sigmoid(setup):
    policy_chosen, policy_rejected = trl_logps(setup, 0, average=False)
    ref_chosen, ref_rejected = trl_logps(setup, 1, average=False)
    losses, chosen_rewards, rejected_rewards = cpo_loss("sigmoid", 0.3, 0.25)(
        policy_chosen - ref_chosen, policy_rejected - ref_rejected
    )
    mine = ours(setup, PreferenceLoss("sigmoid", beta=0.3, label_smoothing=0.25))
    assert_matches(mine, losses, chosen_rewards, rejected_rewards)


def test_the_step_gradient_is_the_mean_pair_losss_over_micro_batches(setup):
    """Two micro-batches of pairs give the loss and gradients of one batch holding them all."""
    loss = PreferenceLoss("sigmoid", beta=0.1)

    def step(micro_batches):
        objective = PreferenceObjective(
            setup.policy,
            loss,
            train_reference=reference_from_model(setup.reference, loss_chunks=0),
            eval_reference=None,
            device=torch.device("cpu"),
            world_size=1,
            loss_chunks=3,
        )
        metrics = objective.accumulate_gradients(micro_batches)
        grads = {n: p.grad.clone() for n, p in setup.policy.named_parameters()}
        setup.policy.zero_grad(set_to_none=True)
        return metrics, grads

    whole, whole_grads = step([setup.batch])
    pairs = [{"chosen": c, "rejected": r, "index": i} for i, (c, r) in enumerate(_rows(setup))]
    halves = [collate_pairs(pairs[:2]), collate_pairs(pairs[2:])]
    split, split_grads = step(halves)
    for name in whole:
        assert split[name] == pytest.approx(whole[name], abs=1e-6), name
    for name in whole_grads:
        torch.testing.assert_close(split_grads[name], whole_grads[name], atol=1e-6, rtol=1e-5, msg=name)


def _rows(setup):
    """(chosen, rejected) samples of the batch, unpadded."""
    tokens, labels, lengths = setup.batch["tokens"], setup.batch["labels"], setup.lengths
    samples = [
        {"tokens": tokens[i, :n].tolist(), "labels": labels[i, :n].tolist()} for i, n in enumerate(lengths.tolist())
    ]
    n = len(samples) // 2
    return list(zip(samples[:n], samples[n:]))
