"""Preference optimisation blocks: response log-probs, the DPO / IPO / SimPO losses and their
metrics, the reference a loss compares against, and the objective the training loop calls.

A batch holds 2B rows, the B chosen sequences then the B rejected ones (`collate_pairs`), so one
forward scores both sides of every pair. A side's log-prob is the sum of its response tokens'
log-probabilities (labels already shifted and the prompt masked, as for supervised data).

Normalisation: a step's loss is the mean per-pair loss over every pair of every micro-batch on
every rank. Each micro-batch backpropagates its summed pair losses times world_size / all the
step's pairs: FSDP averages gradients over ranks, which the factor world_size undoes, so N ranks
follow one process with N times the batch (as the supervised loss does with tokens).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from finetune.data.preference import PreferenceDataset, collate_pairs
from finetune.models.transformer import live_positions
from finetune.training.activations import activation_offloading
from finetune.training.distributed import DistInfo, all_reduce_sum
from finetune.training.loss import auto_loss_chunks
from finetune.training.steps import worth_skipping

Batch = dict[str, torch.Tensor]
LOSS_TYPES = ("sigmoid", "ipo", "simpo")
REFERENCE_FREE = ("simpo",)
# The per-step metrics besides the loss, each a mean over the step's pairs.
PAIR_METRICS = (
    "rewards_chosen",
    "rewards_rejected",
    "reward_accuracy",
    "reward_margin",
    "logps_chosen",
    "logps_rejected",
)


# ----------------------------------------------------------------------------------------------
# Log-probs
# ----------------------------------------------------------------------------------------------


def sequence_logps(model: nn.Module, batch: Batch, *, loss_chunks: int = 0) -> torch.Tensor:
    """Summed log-probability of each row's trained labels (fp32, [rows]).

    Only positions up to a row's last trained label run through the decoder (when that skips
    enough), and only trained positions reach the output head, in chunks that keep each
    chunk's fp32 logits bounded (`loss_chunks`, 0 = auto).
    """
    labels = batch["labels"]
    rows, seq_len = labels.shape
    live = live_positions(labels)
    if not worth_skipping(live):
        live = None
    hidden = model(batch["tokens"], live=live, return_hidden=True)
    flat_labels = labels.reshape(-1) if live is None else live.pack(labels)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    trained = flat_labels != -100
    positions = torch.arange(rows * seq_len, device=labels.device)
    positions = positions[trained] if live is None else live.index[trained]
    row_of = positions // seq_len
    hidden, targets = hidden[trained], flat_labels[trained]
    num_chunks = loss_chunks or auto_loss_chunks(targets.numel(), model.args.vocab_size)
    num_chunks = max(1, min(num_chunks, targets.numel()))
    token_logps = torch.cat(
        [
            -F.cross_entropy(model.output(h).float(), t, reduction="none")
            for h, t in zip(hidden.tensor_split(num_chunks), targets.tensor_split(num_chunks))
        ]
    )
    return torch.zeros(rows, device=labels.device).index_add(0, row_of, token_logps)


def response_lengths(labels: torch.Tensor) -> torch.Tensor:
    """Trained tokens per row, as fp32 (the divisor of length-normalised losses)."""
    return (labels != -100).sum(dim=1).float()


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreferenceLoss:
    """Which loss, and its settings (the names and defaults follow TRL's DPO and CPO configs).

    sigmoid: DPO, -log sigmoid(beta * h) with h the policy's log-ratio margin over the
        reference; label_smoothing eps mixes in the flipped preference (conservative DPO):
        -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h).
    ipo: (h' - 1 / (2 beta))^2 with h' the margin of the length-averaged log-ratios.
    simpo: reference-free, on length-averaged log-probs a: -log sigmoid(beta (a_c - a_r) - gamma),
        with label smoothing as for sigmoid.
    Rewards are beta * (policy - reference) summed log-probs, or beta * a for SimPO.
    """

    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5

    @property
    def needs_reference(self) -> bool:
        return self.loss_type not in REFERENCE_FREE

    def __call__(
        self, logps: torch.Tensor, lengths: torch.Tensor, reference_logps: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(per-pair losses [B], chosen rewards [B], rejected rewards [B]) from [2B] log-probs."""
        chosen, rejected = logps.chunk(2)
        chosen_len, rejected_len = lengths.chunk(2)
        beta, eps = self.beta, self.label_smoothing
        if self.loss_type == "simpo":
            chosen_avg, rejected_avg = chosen / chosen_len.clamp(min=1), rejected / rejected_len.clamp(min=1)
            z = beta * (chosen_avg - rejected_avg) - self.simpo_gamma
            losses = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
            return losses, beta * chosen_avg.detach(), beta * rejected_avg.detach()
        assert reference_logps is not None, f"loss_type={self.loss_type} needs reference log-probs"
        ref_chosen, ref_rejected = reference_logps.chunk(2)
        chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
        if self.loss_type == "sigmoid":
            z = beta * (chosen_ratio - rejected_ratio)
            losses = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
        elif self.loss_type == "ipo":
            margin = chosen_ratio / chosen_len.clamp(min=1) - rejected_ratio / rejected_len.clamp(min=1)
            losses = (margin - 1 / (2 * beta)) ** 2
        else:
            raise ValueError(f"unknown loss_type {self.loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
        return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def pair_metric_sums(
    losses: torch.Tensor, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, logps: torch.Tensor
) -> torch.Tensor:
    """[1 + len(PAIR_METRICS)] sums over the pairs: loss, then PAIR_METRICS in order."""
    chosen_logps, rejected_logps = logps.detach().chunk(2)
    columns = (
        losses.detach(),
        chosen_rewards,
        rejected_rewards,
        (chosen_rewards > rejected_rewards).float(),
        chosen_rewards - rejected_rewards,
        chosen_logps,
        rejected_logps,
    )
    return torch.stack([c.float().sum() for c in columns])


def metrics_from_sums(sums: torch.Tensor, pairs: torch.Tensor, prefix: str = "") -> dict[str, float]:
    means = (sums / pairs.clamp(min=1)).tolist()
    return {f"{prefix}{name}": value for name, value in zip(("loss", *PAIR_METRICS), means)}


# ----------------------------------------------------------------------------------------------
# The reference
# ----------------------------------------------------------------------------------------------

ReferenceFn = Callable[[Batch], Optional[torch.Tensor]]


def reference_from_model(
    model: nn.Module, *, loss_chunks: int, context: Callable[[], ContextManager] = nullcontext
) -> ReferenceFn:
    """Reference log-probs from `model` (a frozen copy, or the policy itself inside `context`,
    e.g. with its adapters turned off), computed without gradients."""

    def reference(batch: Batch) -> torch.Tensor:
        with torch.no_grad(), context():
            return sequence_logps(model, batch, loss_chunks=loss_chunks)

    return reference


def reference_from_table(table: torch.Tensor) -> ReferenceFn:
    """Reference log-probs looked up by pair: `table` is [pairs, 2] (chosen, rejected)."""

    def reference(batch: Batch) -> torch.Tensor:
        rows = table[batch["pair_index"].cpu()].to(batch["labels"].device)
        return torch.cat([rows[:, 0], rows[:, 1]])

    return reference


@torch.no_grad()
def precompute_reference_logps(
    reference: ReferenceFn,
    dataset: PreferenceDataset,
    *,
    batch_size: int,
    pad_id: int,
    dist: DistInfo,
    device: torch.device,
    desc: str,
) -> torch.Tensor:
    """[pairs, 2] reference log-probs of every pair of `dataset`, the same table on every rank.

    Ranks split the pairs (and run the same number of batches, as FSDP's collectives need);
    each pair is written by one rank alone and the tables summed, so every value is exact.
    """
    world, n = dist.world_size, len(dataset)
    positions = list(range(dist.rank, -(-n // (world * batch_size)) * world * batch_size, world))
    table = torch.zeros(n, 2, dtype=torch.float32, device=device)
    for start in tqdm(range(0, len(positions), batch_size), desc=desc, disable=dist.rank != 0):
        chunk = positions[start : start + batch_size]
        batch = collate_pairs([dataset[p % n] for p in chunk], pad_id=pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        chosen, rejected = reference(batch).float().chunk(2)
        keep = torch.tensor([p < n for p in chunk], device=device)
        index = batch["pair_index"][keep]
        table[index, 0] = chosen[keep]
        table[index, 1] = rejected[keep]
    return all_reduce_sum(table).cpu()


# ----------------------------------------------------------------------------------------------
# A step and an evaluation
# ----------------------------------------------------------------------------------------------


class PreferenceObjective:
    """What the training loop calls for a preference run's steps and held-out evaluation."""

    def __init__(
        self,
        model: nn.Module,
        loss: PreferenceLoss,
        *,
        train_reference: Optional[ReferenceFn],
        eval_reference: Optional[ReferenceFn],
        device: torch.device,
        world_size: int,
        loss_chunks: int = 0,
        offload_activations: bool = False,
        eval_max_batches: Optional[int] = None,
    ) -> None:
        self.model, self.loss = model, loss
        self.train_reference, self.eval_reference = train_reference, eval_reference
        self.device, self.world_size = device, world_size
        self.loss_chunks, self.offload_activations = loss_chunks, offload_activations
        self.eval_max_batches = eval_max_batches

    def _pair_losses(self, batch: Batch, reference: Optional[ReferenceFn]) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-pair losses, metric sums) of one micro-batch already on the device."""
        # The reference first: with adapters turned off inside it, the policy's saved activations
        # (and their recomputation under activation checkpointing) all come from the adapted model.
        reference_logps = reference(batch) if reference is not None and self.loss.needs_reference else None
        with activation_offloading(self.offload_activations):
            logps = sequence_logps(self.model, batch, loss_chunks=self.loss_chunks)
        losses, chosen_rewards, rejected_rewards = self.loss(logps, response_lengths(batch["labels"]), reference_logps)
        return losses, pair_metric_sums(losses, chosen_rewards, rejected_rewards, logps)

    def accumulate_gradients(self, micro_batches: Sequence[Batch]) -> dict[str, float]:
        """Backpropagate every micro-batch; the step's loss and PAIR_METRICS, means over all pairs."""
        local_pairs = sum(len(b["pair_index"]) for b in micro_batches)
        pairs = all_reduce_sum(torch.tensor(float(local_pairs), device=self.device))
        scale = self.world_size / pairs.clamp(min=1)
        sums = torch.zeros(1 + len(PAIR_METRICS), device=self.device)
        for batch in micro_batches:
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            losses, batch_sums = self._pair_losses(batch, self.train_reference)
            (losses.sum() * scale).backward()
            sums += batch_sums
        return metrics_from_sums(all_reduce_sum(sums), pairs)

    @torch.no_grad()
    def evaluate(self, loader: torch.utils.data.DataLoader) -> dict[str, float]:
        """eval_loss and eval_<metric> over the held-out pairs, all ranks together."""
        self.model.eval()
        sums = torch.zeros(1 + len(PAIR_METRICS), device=self.device)
        pairs = torch.zeros((), device=self.device)
        for i, batch in enumerate(loader):
            if self.eval_max_batches and i >= self.eval_max_batches:
                break
            batch = {k: v.to(self.device) for k, v in batch.items()}
            sums += self._pair_losses(batch, self.eval_reference)[1]
            pairs += len(batch["pair_index"])
        self.model.train()
        return metrics_from_sums(all_reduce_sum(sums), all_reduce_sum(pairs), prefix="eval_")
