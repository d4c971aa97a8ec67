"""Loss masks to training labels: shifting, truncation and the ignore index.

Labels are stored already shifted by one: `labels[i]` is the target of the prediction
made at position i, which is `tokens[i + 1]` when that token is trained on. Shifting once
here keeps the loss a plain cross entropy and lets packing concatenate samples without a
document's last prediction reaching into the next document.

Because every label is either the next token or the ignore index, the data cache keeps one
byte a token (`trained_flags`) instead of a second int32 array, and `labels_from_flags`
gives the labels back.
"""

from typing import Optional, Sequence

import numpy as np

IGNORE_INDEX = -100


def shifted_labels(tokens: Sequence[int], mask: Sequence[bool]) -> list[int]:
    """Targets for next-token prediction; `mask[i]` True means `tokens[i]` carries no loss."""
    if len(tokens) != len(mask):
        raise ValueError(f"tokens and mask differ in length: {len(tokens)} != {len(mask)}")
    labels = [IGNORE_INDEX if masked else token for token, masked in zip(tokens[1:], mask[1:])]
    labels.append(IGNORE_INDEX)
    return labels


def truncate(
    tokens: list[int], mask: list[bool], max_seq_len: int, prompt: Optional[Sequence[bool]] = None
) -> tuple[list[int], list[bool]]:
    """Cut a sample to `max_seq_len` tokens, keeping its final (end-of-sequence) token.

    Keeping the closing token means a truncated response still teaches the model to stop,
    and generation from a fine-tuned model does not learn to run on forever. A cut inside the
    prompt masks the closing token too: the model must not learn to end its turn right after
    a half-read prompt. The prompt is what `mask` masks, or `prompt` (True on prompt tokens)
    when the mask trains it as well (train_on_input). A cut right after a turn's own closing
    token keeps that one and adds no second.
    """
    if len(tokens) <= max_seq_len:
        return tokens, mask
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be at least 2, got {max_seq_len}")
    last_kept = max_seq_len - 2
    if tokens[last_kept] == tokens[-1]:
        return tokens[: last_kept + 1], mask[: last_kept + 1]
    in_prompt = mask[last_kept] or (prompt is not None and prompt[last_kept])
    return tokens[: last_kept + 1] + tokens[-1:], mask[: last_kept + 1] + [mask[-1] or in_prompt]


def has_targets(labels: Sequence[int]) -> bool:
    """Whether a sample contributes anything to the loss."""
    return any(label != IGNORE_INDEX for label in labels)


def labels_from_flags(tokens: np.ndarray, trained: np.ndarray) -> np.ndarray:
    """The shifted labels of whole samples laid end to end, from their tokens and flags
    (`trained[i]` nonzero: the label at i is `tokens[i + 1]`). A sample's last position never
    has a target, so no label reaches past the samples given."""
    labels = np.full(len(tokens), IGNORE_INDEX, dtype=tokens.dtype)
    if len(tokens) > 1:
        np.copyto(labels[:-1], tokens[1:], where=trained[:-1].astype(bool))
    return labels


def trained_flags(tokens: np.ndarray, labels: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """One byte a token saying whether it has a target: what `labels_from_flags` turns back
    into exactly these labels, for any span of whole samples. Raises if the labels are not
    the samples' shifted tokens."""
    trained = (labels != IGNORE_INDEX).astype(np.uint8)
    sample_ends = np.cumsum(lengths) - 1
    if trained[sample_ends].any() or not np.array_equal(labels_from_flags(tokens, trained), labels):
        raise ValueError("labels are not the shifted tokens of their samples")
    return trained
