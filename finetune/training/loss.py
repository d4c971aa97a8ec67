"""Cross-entropy over the vocabulary in chunks, and the token count that normalises it.

Logits for a whole batch are the largest activation in LLM fine-tuning (batch x seq x vocab,
and 128k vocab for Llama 3). `chunked_cross_entropy` takes the final hidden states and the
output head and computes logits a chunk of tokens at a time, upcast to fp32 one chunk at a time.

The gradient of the loss with respect to the logits, softmax minus one-hot, is computed in the
forward pass (`_CrossEntropySum`) while the chunk's softmax is at hand, and kept in the model's
dtype until backward. That replaces log_softmax's saved output, its backward pass and the
one-hot gradient buffer nll_loss would fill with zeros: one pass of `exp` over the logits
instead of two, and no second vocabulary-wide buffer per chunk.

Only rows whose label is trained reach the output head: prompt tokens (with
`train_on_input=false`) and padding contribute nothing to the loss, so skipping them is exact
and saves the head's matmuls, the largest single matmul of a small model's step.

Normalisation: the function returns the SUM of per-token losses. A step's loss is that sum over
all micro-batches and all ranks divided by the number of non-ignored tokens over the same set
(`count_tokens` summed over micro-batches, then `all_reduce_sum` over ranks), so every token
weighs the same however padding and masking fall across micro-batches. FSDP averages gradients
over ranks, so on each rank backpropagate `loss_sum * world_size / global_tokens` (or backprop
the sums and scale the gradients by that factor once before the optimizer step); the logged
loss is the all-reduced sum divided by `global_tokens`.
"""

from typing import Callable, Optional

import torch
import torch.nn.functional as F


class _CrossEntropySum(torch.autograd.Function):
    """Summed cross-entropy of [rows, vocab] logits against valid labels, computed in fp32.

    Forward computes the softmax once and turns it into the logits' gradient in place; backward
    only scales that by the incoming gradient, in place. The gradient is kept with
    save_for_backward, so saved-tensor hooks (activation offloading) see it, and a second
    backward through a retained graph fails autograd's in-place version check rather than
    reusing scaled values.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = logits.float()
        row_max, row_argmax = x.max(dim=-1)
        probs = torch.softmax(x, dim=-1)
        rows = torch.arange(x.shape[0], device=x.device)
        # log-sum-exp read off the most likely token, whose probability (at least 1/vocab) never
        # underflows, so the loss stays exact where the label's own probability would round to 0.
        log_sum_exp = row_max - probs[rows, row_argmax].log()
        loss = (log_sum_exp - x[rows, labels]).sum()
        probs[rows, labels] -= 1.0
        ctx.save_for_backward(probs.to(logits.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (grad_logits,) = ctx.saved_tensors
        return grad_logits.mul_(grad_loss), None


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed fp32 cross-entropy of [rows, vocab] logits; every label must be a valid class."""
    if torch.is_grad_enabled() and logits.requires_grad:
        return _CrossEntropySum.apply(logits, labels)
    return F.cross_entropy(logits.float(), labels, reduction="sum")


# Above this many bytes of fp32 logits per chunk the loss is split into more chunks.
LOGITS_CHUNK_BYTES = 256 * 2**20


def auto_loss_chunks(rows: int, vocab_size: int) -> int:
    """The fewest chunks that keep each chunk's fp32 logits under LOGITS_CHUNK_BYTES.

    Fewer chunks are faster (one large matmul per direction instead of many, and one gradient
    accumulation into the head's weight); more are only needed when one chunk's logits get large.
    """
    return max(1, -(-rows * vocab_size * 4 // LOGITS_CHUNK_BYTES))


def chunked_cross_entropy(
    hidden: torch.Tensor,
    output: Callable[[torch.Tensor], torch.Tensor],
    labels: torch.Tensor,
    *,
    num_chunks: int = 8,
    vocab_size: Optional[int] = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Sum of cross-entropy over tokens whose label is not `ignore_index` (an fp32 scalar).

    `hidden` is [batch, seq, dim], `output` maps [..., dim] to [..., vocab] (e.g. the model's
    output head), and `labels` is [batch, seq], already shifted so `labels[b, i]` is the target
    for position i. `num_chunks=0` picks the count with `auto_loss_chunks` (needs `vocab_size`).
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree")
    labels = labels.reshape(-1)
    trained = labels != ignore_index
    # Boolean indexing gathers the trained rows (and scatters their gradient back in backward).
    hidden = hidden.reshape(-1, hidden.shape[-1])[trained]
    labels = labels[trained]
    if num_chunks == 0:
        if vocab_size is None:
            raise ValueError("num_chunks=0 (auto) needs vocab_size")
        num_chunks = auto_loss_chunks(labels.numel(), vocab_size)
    num_chunks = max(1, min(num_chunks, labels.numel()))
    total = hidden.new_zeros((), dtype=torch.float32)
    for hidden_chunk, label_chunk in zip(hidden.tensor_split(num_chunks), labels.tensor_split(num_chunks)):
        total = total + cross_entropy_sum(output(hidden_chunk), label_chunk)
    return total


def count_tokens(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Number of labels that count towards the loss, as an int64 tensor on the labels' device."""
    return (labels != ignore_index).sum()
