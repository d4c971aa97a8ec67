"""Perplexity of a decoder on tokenized, labelled samples (what `tune quantize` reports)."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from finetune.data import IGNORE_INDEX, collate
from finetune.errors import UserError
from finetune.models import TransformerDecoder

_LOGIT_CHUNK = 1024  # labelled positions projected to the vocabulary at once


@torch.inference_mode()
def perplexity(
    model: TransformerDecoder, samples: Sequence[dict[str, list[int]]], *, batch_size: int, pad_id: int
) -> tuple[float, int]:
    """(exp of the mean next-token loss over labelled tokens, number of those tokens).

    Logits are computed only where there is a label, a chunk at a time: with a 128k vocabulary
    a whole batch of fp32 logits would not fit beside an 8B model.
    """
    device = model.tok_embeddings.weight.device
    total, count = 0.0, 0
    for start in range(0, len(samples), batch_size):
        batch = collate(samples[start : start + batch_size], pad_id=pad_id)
        labels = batch["labels"].to(device)
        hidden = model(batch["tokens"].to(device), return_hidden=True)
        keep = labels != IGNORE_INDEX
        for h, y in zip(hidden[keep].split(_LOGIT_CHUNK), labels[keep].split(_LOGIT_CHUNK)):
            total += F.cross_entropy(model.output(h).float(), y, reduction="sum").item()
        count += int(keep.sum())
    if count == 0:
        raise UserError("the evaluation data has no labelled tokens to measure perplexity on; check eval_dataset")
    return math.exp(total / count), count
