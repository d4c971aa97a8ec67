"""Recipe state: RNG capture/restore reproduces draws; save/load round trip under weights_only."""

import math
import random

import numpy as np
import pytest
import torch

from finetune.checkpointing.recipe_state import (
    RECIPE_STATE_VERSION,
    capture_rng_state,
    gather_rng_states,
    load_recipe_state,
    restore_rng_state,
    rng_state_for_rank,
    save_recipe_state,
)
from finetune.errors import UserError
from finetune.training.lr_schedule import build_lr_scheduler


def _draws() -> tuple:
    return (
        [random.random() for _ in range(3)],
        np.random.rand(3).tolist(),
        np.random.randn(1).tolist(),  # exercises numpy's cached Gaussian
        torch.rand(4).tolist(),
        torch.randint(0, 1000, (3,)).tolist(),
    )


def test_restore_reproduces_draws():
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    np.random.randn(1)  # leave a cached Gaussian in the state
    state = capture_rng_state()
    first = _draws()
    _draws()
    restore_rng_state(state)
    assert _draws() == first


def test_save_load_round_trip_with_optimizer_scheduler_and_rng(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = build_lr_scheduler("cosine", opt, warmup_steps=1, total_steps=10)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    sched.step()
    state = {
        "optimizer": opt.state_dict(),
        "lr_scheduler": sched.state_dict(),
        "step": 1,
        "epoch": 0,
        "sampler": {"epoch": 0, "position": 8},
        "rng": gather_rng_states(world_size=1),
    }
    path = tmp_path / "ckpt" / "recipe_state.pt"
    save_recipe_state(path, state)
    save_recipe_state(path, state)  # overwriting is atomic too
    assert [p.name for p in path.parent.iterdir()] == ["recipe_state.pt"]

    expected = _draws()
    loaded = load_recipe_state(path)
    assert loaded["format_version"] == RECIPE_STATE_VERSION
    assert (loaded["step"], loaded["epoch"], loaded["sampler"]) == (1, 0, {"epoch": 0, "position": 8})
    assert loaded["lr_scheduler"] == sched.state_dict()
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(loaded["optimizer"]["state"][0][key], opt.state_dict()["state"][0][key])
    assert loaded["optimizer"]["param_groups"] == opt.state_dict()["param_groups"]
    restore_rng_state(rng_state_for_rank(loaded["rng"], rank=0))
    assert _draws() == expected


def test_rng_state_for_rank_on_a_different_world_size(caplog):
    states = [{"id": 0}, {"id": 1}]
    assert rng_state_for_rank(states, 1) == {"id": 1}
    assert rng_state_for_rank(states, 3) == {"id": 1}
    assert "RNG states for 2 ranks" in caplog.text
    with pytest.raises(UserError, match="no RNG states"):
        rng_state_for_rank([], 0)


def test_bad_recipe_state_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_recipe_state(tmp_path / "nope.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(UserError) as info:
        load_recipe_state(garbage)
    assert "\n" not in str(info.value) and "cannot read recipe state" in str(info.value)
    old = tmp_path / "old.pt"
    torch.save({"format_version": 0, "step": 1}, old)
    with pytest.raises(UserError, match="format version 0"):
        load_recipe_state(old)


def _trained(lr: float, total_steps: int, steps: int = 3):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = build_lr_scheduler("cosine", opt, warmup_steps=1, total_steps=total_steps)
    for _ in range(steps):
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        sched.step()
    return model, opt, sched


def _reloaded(state_opt, state_sched, lr: float, total_steps: int):
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = build_lr_scheduler("cosine", opt, warmup_steps=1, total_steps=total_steps)
    opt.load_state_dict(state_opt)
    sched.load_state_dict(state_sched)
    return opt, sched


def test_a_new_lr_weight_decay_and_length_hold_from_the_next_step_and_nothing_else_moves():
    from types import SimpleNamespace

    from finetune.training.resume import steer_optimizer

    _, opt, sched = _trained(lr=1e-3, total_steps=10)
    saved = {"lr": 1e-3, "weight_decay": 0.01, "epochs": 1, "lr_scheduler": "cosine", "warmup_steps": 1}
    notes: list[str] = []
    # Nothing changed: the loaded lr (the one the saved run's next step would use) is kept as it is.
    same, same_sched = _reloaded(opt.state_dict(), sched.state_dict(), lr=1e-3, total_steps=10)
    steer_optimizer(same, same_sched, SimpleNamespace(**saved), saved, notes.append)
    assert same.param_groups[0]["lr"] == opt.param_groups[0]["lr"] and notes == []
    # lr doubled, weight decay raised, twice the steps: the multiplier after 3 steps of a 20-step cosine.
    changed = {**saved, "lr": 2e-3, "weight_decay": 0.1, "epochs": 2}
    new, new_sched = _reloaded(opt.state_dict(), sched.state_dict(), lr=2e-3, total_steps=20)
    steer_optimizer(new, new_sched, SimpleNamespace(**changed), saved, notes.append)
    expected = 2e-3 * 0.5 * (1 + math.cos(math.pi * (3 - 1) / (20 - 1)))
    assert new.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12)
    assert new.param_groups[0]["weight_decay"] == 0.1 and new.param_groups[0]["initial_lr"] == 2e-3
    assert new_sched.get_last_lr() == [new.param_groups[0]["lr"]]
    new_sched.step()  # the step after follows the new schedule too
    assert new.param_groups[0]["lr"] == pytest.approx(2e-3 * 0.5 * (1 + math.cos(math.pi * 3 / 19)), rel=1e-12)
    assert len(notes) == 1 and notes[0].startswith("note: the next step's lr is")
