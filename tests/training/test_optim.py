"""Optimizers by name: each steps like its reference; state round-trips; clipping."""

import copy
import io
import math

import pytest
import torch
from torch import nn

from finetune.errors import UserError
from finetune.training.optim import build_optimizer, clip_grad_norm

CPU = torch.device("cpu")


def _model() -> nn.Module:
    torch.manual_seed(0)
    # 64x64 weights reach torchao's minimum quantised size (4096), so low-bit state really is
    # quantised; the biases stay full precision. One shape each keeps torch.compile to 2 graphs.
    return nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64))


def _set_grads(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)


def _reference(name: str, params, lr: float, wd: float) -> torch.optim.Optimizer:
    if name in ("adamw", "adamw8bit", "adamw4bit"):
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd, foreach=False)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd, foreach=False)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd, foreach=False)


# Low-bit moments are quantised, so after 3 steps (each moving a weight by about lr) their
# weights differ from AdamW's by a fraction of lr: (max, mean) allowed |difference| / lr.
# Measured: 8-bit 0.09 / 0.011, 4-bit 1.6 / 0.21.
TOLERANCE = {
    "adamw": (0.0, 0.0),
    "adam": (0.0, 0.0),
    "sgd": (0.0, 0.0),
    "adamw8bit": (0.25, 0.02),
    "adamw4bit": (2.5, 0.3),
}


LR, WEIGHT_DECAY = 1e-2, 0.1  # the same in every test: torch.compile specialises on them


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd", "adamw8bit", "adamw4bit"])
def test_optimizer_steps_like_reference(name):
    lr, wd = LR, WEIGHT_DECAY
    model = _model()
    ref_model = copy.deepcopy(model)
    opt = build_optimizer(name, model.parameters(), lr=lr, weight_decay=wd, device=CPU)
    ref_opt = _reference(name, ref_model.parameters(), lr, wd)
    start = [p.detach().clone() for p in model.parameters()]
    for step in range(3):
        _set_grads(model, step)
        _set_grads(ref_model, step)
        opt.step()
        ref_opt.step()
    if name.endswith("bit"):
        assert type(opt.state[model[0].weight]["exp_avg"]).__name__ == f"OptimState{name[5]}bit"
    max_tol, mean_tol = TOLERANCE[name]
    for p, r, p0 in zip(model.parameters(), ref_model.parameters(), start):
        assert not torch.equal(p, p0)
        err = (p - r).abs() / lr
        assert err.max().item() <= max_tol + 1e-4, (name, err.max().item())
        assert err.mean().item() <= mean_tol + 1e-4, (name, err.mean().item())


@pytest.mark.parametrize("name", ["adamw", "sgd", "adamw8bit"])
def test_optimizer_state_dict_round_trip(name):
    model = _model()
    opt = build_optimizer(name, model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, device=CPU)
    for step in range(2):
        _set_grads(model, step)
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    resumed_model = copy.deepcopy(model)
    resumed = build_optimizer(name, resumed_model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, device=CPU)
    resumed.load_state_dict(state)
    for step in range(2, 4):
        _set_grads(model, step)
        _set_grads(resumed_model, step)
        opt.step()
        resumed.step()
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)


def test_unknown_optimizer_is_a_user_error():
    with pytest.raises(UserError, match="unknown optimizer 'lion'; use one of: adamw, adam, sgd"):
        build_optimizer("lion", _model().parameters(), lr=1e-3, weight_decay=0.0, device=CPU)


def test_clip_grad_norm_returns_norm_before_and_clips():
    model = _model()
    _set_grads(model, 0)
    grads = [p.grad.clone() for p in model.parameters()]
    expected = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
    norm = clip_grad_norm(model.parameters(), max_norm=1.0)
    assert norm == pytest.approx(expected, rel=1e-6)
    after = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in model.parameters()))
    assert after == pytest.approx(1.0, rel=1e-5)
    # Under max_norm, gradients are left alone.
    assert clip_grad_norm(model.parameters(), max_norm=10.0) == pytest.approx(1.0, rel=1e-5)
    assert clip_grad_norm([nn.Parameter(torch.ones(2))], max_norm=1.0) == 0.0
