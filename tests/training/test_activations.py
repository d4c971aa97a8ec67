"""Activation checkpointing and offloading must not change gradients."""

import copy

import pytest
import torch
import torch.nn.functional as F

from finetune.training.activations import _OffloadHooks, activation_offloading, apply_activation_checkpointing
from tests.training.tiny import TinyDecoder, make_batch


def _grads(model, tokens, labels, *, seed: int = 0, offload: bool = False, retain: bool = False):
    torch.manual_seed(seed)  # dropout draws
    with activation_offloading(offload):
        logits = model(tokens)
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
    grads = torch.autograd.grad(loss, list(model.parameters()), retain_graph=retain)
    return loss.detach(), grads


def _assert_bit_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def _count_saved(model, tokens) -> int:
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        model(tokens)
    return len(saved)


def test_checkpointing_gives_bit_equal_grads_with_dropout_and_kwargs():
    torch.manual_seed(0)
    model = TinyDecoder(n_layers=4, dropout=0.2)
    ref = copy.deepcopy(model)
    tokens, labels = make_batch(2)
    apply_activation_checkpointing(model)
    assert [type(layer).__name__ for layer in model.layers] == ["CheckpointedTinyLayer"] * 4
    assert list(model.state_dict()) == list(ref.state_dict())
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in ref.named_parameters()]

    ref_loss, ref_grads = _grads(ref, tokens, labels)
    loss, grads = _grads(model, tokens, labels)
    assert torch.equal(loss, ref_loss)
    _assert_bit_equal(grads, ref_grads)
    # Each layer now keeps only its input for backward instead of every intermediate.
    assert _count_saved(model, tokens) < _count_saved(ref, tokens) - 4 * 5


def test_checkpointing_twice_is_harmless_and_deepcopy_keeps_it():
    model = TinyDecoder(n_layers=2)
    apply_activation_checkpointing(model)
    apply_activation_checkpointing(model)
    assert type(model.layers[0]).__mro__[1].__name__ == "TinyLayer"
    clone = copy.deepcopy(model)
    tokens, _ = make_batch(3)
    assert type(clone.layers[1]).__name__ == "CheckpointedTinyLayer"
    assert torch.equal(clone(tokens), model(tokens))


def test_offloading_on_cpu_gives_bit_equal_grads():
    torch.manual_seed(0)
    model = TinyDecoder(n_layers=3, dropout=0.1)
    tokens, labels = make_batch(4)
    ref_loss, ref_grads = _grads(model, tokens, labels)
    loss, grads = _grads(model, tokens, labels, offload=True)
    assert torch.equal(loss, ref_loss)
    _assert_bit_equal(grads, ref_grads)


def test_offload_hooks_copy_out_prefetch_and_restore_exactly():
    # Simulate a device on CPU so that every saved tensor takes the copy-out/copy-back path.
    torch.manual_seed(0)
    model = TinyDecoder(n_layers=3)
    tokens, labels = make_batch(5)
    ref_loss, ref_grads = _grads(model, tokens, labels, retain=True)

    hooks = _OffloadHooks(use_streams=False, min_bytes=256, prefetch=2, device_types=frozenset({"cpu"}))
    kept_as_is = []

    def pack(tensor):
        packed = hooks.pack(tensor)
        if torch.is_tensor(packed):
            kept_as_is.append(packed)
        return packed

    prefetched = []
    start_prefetch = hooks._start_prefetch
    hooks._start_prefetch = lambda holder: prefetched.append(holder.index) or start_prefetch(holder)
    with torch.autograd.graph.saved_tensors_hooks(pack, hooks.unpack):
        logits = model(tokens)
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
    offloaded = [ref() for ref in hooks.saved]
    assert len(offloaded) > 10
    assert all(h is not None and h.cpu.numel() * h.cpu.element_size() >= 256 for h in offloaded)
    # Weights (and the transposed views linear layers save) are not copied out.
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = [t for t in kept_as_is if t.untyped_storage().data_ptr() in weights]
    assert len(kept) >= 3 * 3 + 1  # mix, up, down per layer, and the output head
    grads = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
    assert torch.equal(loss, ref_loss)
    _assert_bit_equal(grads, ref_grads)
    assert len(prefetched) > len(offloaded) // 2
    # A second backward over the retained graph unpacks again from the CPU copies.
    _assert_bit_equal(torch.autograd.grad(loss, list(model.parameters())), ref_grads)


def test_checkpointing_and_offloading_together():
    torch.manual_seed(0)
    model = TinyDecoder(n_layers=3, dropout=0.1, tied=True)
    ref = copy.deepcopy(model)
    tokens, labels = make_batch(6)
    apply_activation_checkpointing(model)
    ref_loss, ref_grads = _grads(ref, tokens, labels)
    loss, grads = _grads(model, tokens, labels, offload=True)
    assert torch.equal(loss, ref_loss)
    _assert_bit_equal(grads, ref_grads)


@pytest.mark.slow
def test_checkpointing_composes_with_torch_compile():
    torch.manual_seed(0)
    model = TinyDecoder(n_layers=2, vocab=32, dim=16)
    ref = copy.deepcopy(model)
    tokens, labels = make_batch(7, batch=2, seq=8, vocab=32)
    apply_activation_checkpointing(model)
    # aot_eager traces the checkpoint region like inductor does (in one graph), minus the slow C++ build.
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    ref_loss, ref_grads = _grads(ref, tokens, labels)
    loss, grads = _grads(compiled, tokens, labels)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_offloading_with_streams_on_cuda_gives_equal_grads():
    torch.manual_seed(0)
    model = TinyDecoder(n_layers=4, dim=256, vocab=512).cuda()
    tokens, labels = (t.cuda() for t in make_batch(8, batch=8, seq=128, vocab=512))
    ref_loss, ref_grads = _grads(model, tokens, labels)
    for streams in (True, False):
        with activation_offloading(True, use_streams=streams):
            logits = model(tokens)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
        grads = torch.autograd.grad(loss, list(model.parameters()))
        torch.cuda.synchronize()
        assert torch.equal(loss, ref_loss)
        _assert_bit_equal(grads, ref_grads)
