"""The parts of a training step every recipe shares: forward to a summed loss, gradient
accumulation normalised over all trained tokens, held-out evaluation, and token counting.

Normalisation: a step's loss is the summed per-token loss of every micro-batch on every rank,
divided by the number of trained (non-ignored) tokens over all of them. So k micro-batches of
b samples give exactly the loss and gradients of one batch of k*b, whatever the padding, and N
ranks give those of one process with N times the batch. FSDP averages gradients over ranks,
which the factor world_size in the backward scale undoes.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from finetune.models.transformer import LivePositions, live_positions
from finetune.training.activations import activation_offloading
from finetune.training.distributed import all_reduce_sum
from finetune.training.loss import chunked_cross_entropy, count_tokens

Batch = dict[str, torch.Tensor]


def loss_sum(model: nn.Module, batch: Batch, *, loss_chunks: int) -> torch.Tensor:
    """Sum of per-token cross-entropy over the batch's trained tokens (fp32 scalar).

    Positions after each row's last trained label (padding, mostly) are not computed at all
    when they are a worthwhile share of the batch (`worth_skipping`).
    """
    labels = batch["labels"]
    live = live_positions(labels)
    if not worth_skipping(live):
        live = None
    hidden = model(
        batch["tokens"],
        position_ids=batch.get("position_ids"),
        document_ids=batch.get("document_ids"),
        live=live,
        return_hidden=True,
    )
    return chunked_cross_entropy(
        hidden,
        model.output,
        labels if live is None else live.pack(labels),
        num_chunks=loss_chunks,
        vocab_size=model.args.vocab_size,
    )


# Below this share of skippable positions, gathering and scattering the attention's rows in every
# layer costs about what the skipped matmuls save.
MIN_SKIPPED_SHARE = 1 / 32


def worth_skipping(live: LivePositions) -> bool:
    total = live.batch * live.seq_len
    return total - live.index.numel() >= MIN_SKIPPED_SHARE * total


def accumulate_gradients(
    model: nn.Module,
    micro_batches: Sequence[Batch],
    *,
    device: torch.device,
    world_size: int,
    loss_chunks: int,
    offload_activations: bool = False,
) -> float:
    """Backpropagate every micro-batch; return the step's mean loss per trained token."""
    local_tokens = sum(count_tokens(b["labels"]) for b in micro_batches)
    global_tokens = all_reduce_sum(torch.as_tensor(local_tokens, device=device).float()).clamp(min=1)
    scale = world_size / global_tokens
    total = torch.zeros((), device=device)
    for batch in micro_batches:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with activation_offloading(offload_activations):
            loss = loss_sum(model, batch, loss_chunks=loss_chunks)
        (loss * scale).backward()
        total += loss.detach()
    return (all_reduce_sum(total) / global_tokens).item()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    *,
    device: torch.device,
    loss_chunks: int,
    max_batches: Optional[int] = None,
) -> float:
    """Mean per-token loss on held-out data, all ranks together; the model is left in train mode."""
    model.eval()
    total = torch.zeros((), device=device)
    tokens = torch.zeros((), device=device)
    for i, batch in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        batch = {k: v.to(device) for k, v in batch.items()}
        total += loss_sum(model, batch, loss_chunks=loss_chunks)
        tokens += count_tokens(batch["labels"])
    model.train()
    return (all_reduce_sum(total) / all_reduce_sum(tokens).clamp(min=1)).item()


def count_non_pad_tokens(micro_batches: Sequence[Batch], pad_id: int, device: torch.device) -> float:
    """Tokens processed this step on all ranks, padding excluded: the tokens/s numerator."""
    local = sum(int((b["tokens"] != pad_id).sum()) for b in micro_batches)
    return all_reduce_sum(torch.tensor(float(local), device=device)).item()
