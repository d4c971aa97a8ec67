"""chunked_cross_entropy against F.cross_entropy on full logits: values, grads, memory."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from finetune.training.loss import chunked_cross_entropy, count_tokens
from tests.training.tiny import TinyDecoder, make_batch


def _reference_and_chunked(model: nn.Module, tokens, labels, num_chunks: int):
    hidden = model(tokens, return_hidden=True)
    ref = F.cross_entropy(model.output(hidden).flatten(0, 1), labels.flatten(), reduction="sum")
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    hidden = model(tokens, return_hidden=True)
    got = chunked_cross_entropy(hidden, model.output, labels, num_chunks=num_chunks)
    got_grads = torch.autograd.grad(got, list(model.parameters()))
    return ref, ref_grads, got, got_grads


@pytest.mark.parametrize("num_chunks", [1, 3, 8, 1000])
@pytest.mark.parametrize("tied", [False, True])
def test_matches_full_cross_entropy_values_and_grads(num_chunks, tied):
    torch.manual_seed(0)
    model = TinyDecoder(tied=tied)
    tokens, labels = make_batch(1)
    ref, ref_grads, got, got_grads = _reference_and_chunked(model, tokens, labels, num_chunks)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-5)
    assert len(got_grads) == len(ref_grads) == (24 if tied else 25)
    for g, r in zip(got_grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_ignored_labels_do_not_count_and_all_ignored_gives_zero():
    torch.manual_seed(0)
    output = nn.Linear(8, 11, bias=False)
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    labels = torch.randint(0, 11, (2, 5))
    labels[1] = -100
    got = chunked_cross_entropy(hidden, output, labels, num_chunks=4)
    ref = F.cross_entropy(output(hidden[0]), labels[0], reduction="sum")
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    got.backward()
    assert torch.count_nonzero(hidden.grad[1]) == 0
    assert count_tokens(labels).item() == 5

    none = chunked_cross_entropy(hidden, output, torch.full((2, 5), -100), num_chunks=3)
    assert none.item() == 0.0


def test_custom_ignore_index():
    torch.manual_seed(0)
    output = nn.Linear(8, 11, bias=False)
    hidden = torch.randn(1, 6, 8)
    labels = torch.tensor([[1, 2, 0, 0, 3, 4]])
    got = chunked_cross_entropy(hidden, output, labels, num_chunks=2, ignore_index=0)
    ref = F.cross_entropy(output(hidden[0]), labels[0], reduction="sum", ignore_index=0)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    assert count_tokens(labels, ignore_index=0).item() == 4


def test_bf16_upcasts_per_chunk_and_keeps_no_fp32_logits():
    torch.manual_seed(0)
    vocab, n_chunks = 96, 4
    output = nn.Linear(16, vocab, bias=False).to(torch.bfloat16)
    hidden = torch.randn(2, 8, 16, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, vocab, (2, 8))
    labels[0, :3] = -100

    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        got = chunked_cross_entropy(hidden, output, labels, num_chunks=n_chunks)
    # Until backward, the graph keeps one bf16 logits gradient per chunk and no fp32 vocab-wide
    # tensor: those exist only while a chunk's forward runs.
    assert not [t for t in saved if t.dtype == torch.float32 and t.shape[-1] == vocab]
    kept = [t for t in saved if t.shape[-1] == vocab and t.shape[0] != 16]  # not the head's W^T [16, vocab]
    assert [(t.dtype, t.shape[-1]) for t in kept] == [(torch.bfloat16, vocab)] * n_chunks
    assert sum(t.shape[0] for t in kept) == int((labels != -100).sum())
    got.backward()

    ref_hidden = hidden.detach().clone().requires_grad_()
    logits = torch.cat([output(c) for c in ref_hidden.flatten(0, 1).tensor_split(n_chunks)])
    ref = F.cross_entropy(logits.float(), labels.flatten(), reduction="sum")
    ref.backward()
    assert got.dtype == torch.float32
    # fp32 math per chunk on both sides; the logits gradient is rounded to bf16 on both sides
    # (softmax minus one-hot here, log_softmax's backward there), so the hidden grads agree to
    # bf16 rounding.
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(hidden.grad, ref_hidden.grad, rtol=1e-2, atol=1e-3)


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="disagree"):
        chunked_cross_entropy(torch.zeros(2, 3, 4), nn.Linear(4, 5), torch.zeros(2, 4, dtype=torch.long))


def test_auto_chunk_count_keeps_each_chunk_under_the_budget():
    from finetune.training.loss import LOGITS_CHUNK_BYTES, auto_loss_chunks

    assert auto_loss_chunks(1024, 32_000) == 1  # 131 MB of fp32 logits: one chunk
    chunks = auto_loss_chunks(2 * 2048, 128_256)  # Llama 3 vocabulary, 2 x 2048 tokens: 2.1 GB
    assert chunks == 8 and 2 * 2048 * 128_256 * 4 / chunks <= LOGITS_CHUNK_BYTES
    assert auto_loss_chunks(0, 128_256) == 1


def test_head_sees_only_trained_rows_and_auto_chunks_match_reference():
    """Prompt and padding rows never reach the output head (its input has only trained rows),
    and num_chunks=0 (auto) gives the full cross-entropy's value and gradients."""
    torch.manual_seed(0)
    output = nn.Linear(8, 11, bias=False)
    seen = []
    output.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    hidden = torch.randn(3, 7, 8, requires_grad=True)
    labels = torch.randint(0, 11, (3, 7))
    labels[:, :3] = -100  # a masked prompt
    labels[2, 5:] = -100  # padding
    got = chunked_cross_entropy(hidden, output, labels, num_chunks=0, vocab_size=11)
    assert seen == [int((labels != -100).sum())]
    (got_grad,) = torch.autograd.grad(got, hidden)
    ref = F.cross_entropy(output(hidden).flatten(0, 1), labels.flatten(), reduction="sum")
    (ref_grad,) = torch.autograd.grad(ref, hidden)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_grad, ref_grad, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="vocab_size"):
        chunked_cross_entropy(hidden, output, labels, num_chunks=0)


def test_loss_stays_exact_when_the_label_probability_underflows():
    from finetune.training.loss import cross_entropy_sum

    torch.manual_seed(0)
    logits = (torch.randn(16, 50) * 60).requires_grad_()  # gaps of hundreds: softmax entries hit 0
    labels = torch.randint(0, 50, (16,))
    got = cross_entropy_sum(logits, labels)
    (got * 0.25).backward()
    ref_logits = logits.detach().clone().requires_grad_()
    ref = F.cross_entropy(ref_logits, labels, reduction="sum")
    (ref * 0.25).backward()
    assert torch.isfinite(got) and ref.item() > 1000
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=0, atol=1e-6)


def test_second_backward_through_the_same_loss_raises_and_no_grad_needs_no_graph():
    from finetune.training.loss import cross_entropy_sum

    logits = torch.randn(4, 7, requires_grad=True)
    labels = torch.tensor([0, 3, 6, 2])
    loss = cross_entropy_sum(logits, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    with torch.no_grad():
        evaluated = cross_entropy_sum(logits, labels)
    assert evaluated.grad_fn is None
    torch.testing.assert_close(evaluated, loss.detach())
