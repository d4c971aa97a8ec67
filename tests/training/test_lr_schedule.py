"""LR schedules: values at chosen steps, and resuming from a state dict."""

import math

import pytest
import torch

from finetune.errors import UserError
from finetune.training.lr_schedule import SCHEDULES, build_lr_scheduler


def _lrs(name: str, warmup: int, total: int, steps: int, base_lr: float = 0.1) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base_lr)
    sched = build_lr_scheduler(name, opt, warmup_steps=warmup, total_steps=total)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_cosine_values():
    lrs = _lrs("cosine", warmup=4, total=14, steps=16)
    expected_warmup = [0.1 * (s + 1) / 5 for s in range(4)]
    assert lrs[:4] == pytest.approx(expected_warmup, rel=1e-12)
    assert lrs[4] == pytest.approx(0.1)
    assert lrs[9] == pytest.approx(0.05)  # half way through the 10 decay steps
    assert lrs[6] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 0.2)))
    assert lrs[14] == pytest.approx(0.0, abs=1e-15)
    assert lrs[15] == pytest.approx(0.0, abs=1e-15)  # stays at 0 past the end


def test_linear_values():
    lrs = _lrs("linear", warmup=2, total=6, steps=7)
    assert lrs == pytest.approx([0.1 / 3, 0.2 / 3, 0.1, 0.075, 0.05, 0.025, 0.0], rel=1e-12, abs=1e-15)


def test_constant_values_and_no_warmup():
    assert _lrs("constant", warmup=2, total=0, steps=5) == pytest.approx([0.1 / 3, 0.2 / 3, 0.1, 0.1, 0.1])
    assert _lrs("cosine", warmup=0, total=4, steps=2)[0] == pytest.approx(0.1)


def test_state_dict_round_trip_continues_the_schedule():
    params = [torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD(params, lr=0.1)
    sched = build_lr_scheduler("cosine", opt, warmup_steps=3, total_steps=20)
    for _ in range(7):
        opt.step()
        sched.step()
    state = sched.state_dict()
    expected = []
    for _ in range(5):
        opt.step()
        sched.step()
        expected.append(opt.param_groups[0]["lr"])

    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched2 = build_lr_scheduler("cosine", opt2, warmup_steps=3, total_steps=20)
    sched2.load_state_dict(state)
    assert sched2.last_epoch == 7
    got = []
    for _ in range(5):
        opt2.step()
        sched2.step()
        got.append(opt2.param_groups[0]["lr"])
    assert got == expected


@pytest.mark.parametrize("name", SCHEDULES)
def test_a_run_within_its_warmup_only_warms_up(name):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    said: list[str] = []
    sched = build_lr_scheduler(name, opt, warmup_steps=10, total_steps=3, log=said.append)
    lrs = []
    for _ in range(3):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.1 * k / 11 for k in (1, 2, 3)])
    assert said == ["the run (3 steps) ends within warmup_steps (10): the lr only warms up"]


def test_bad_schedule_settings_are_user_errors():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(UserError, match="unknown lr_scheduler 'step'"):
        build_lr_scheduler("step", opt, warmup_steps=0, total_steps=10)
    with pytest.raises(UserError, match="warmup_steps must be >= 0"):
        build_lr_scheduler("linear", opt, warmup_steps=-1, total_steps=10)
