"""Two gloo processes with FSDP2 against one process on the full batch.

Checks: the same losses, gradient norms and parameters after training steps (tied and untied
output, with and without activation checkpointing and CPU offload); full model and optimizer
state dicts gather and reload bit-exactly; per-rank RNG states gather.
"""

import os
import socket
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from finetune.training.activations import apply_activation_checkpointing
from finetune.training.fsdp import (
    full_model_state_dict,
    full_optimizer_state_dict,
    load_full_model_state_dict,
    load_full_optimizer_state_dict,
    shard_model,
)
from finetune.training.loss import chunked_cross_entropy, count_tokens
from finetune.training.optim import build_optimizer, clip_grad_norm
from tests.training.tiny import TinyDecoder, make_batch

WORLD = 2
STEPS = 2
CONFIGS = [
    {"tied": False, "ac": False, "cpu_offload": False, "reshard": True},
    {"tied": True, "ac": True, "cpu_offload": True, "reshard": False},
]
CPU = torch.device("cpu")


def _build(config: dict, seed: int = 0) -> TinyDecoder:
    torch.manual_seed(seed)
    model = TinyDecoder(tied=config["tied"])
    if config["ac"]:
        apply_activation_checkpointing(model)
    return model


def _train_step(model, opt, step: int, rank: int, world: int, all_reduce) -> tuple[float, float]:
    tokens, labels = make_batch(step, batch=4)
    per_rank = tokens.shape[0] // world
    tokens = tokens[rank * per_rank : (rank + 1) * per_rank]
    labels = labels[rank * per_rank : (rank + 1) * per_rank]
    loss_sum = chunked_cross_entropy(model(tokens, return_hidden=True), model.output, labels, num_chunks=3)
    global_tokens = all_reduce(count_tokens(labels))
    # FSDP averages gradients over ranks; scaling by world makes it the global token mean.
    (loss_sum * world / global_tokens).backward()
    norm = clip_grad_norm(model.parameters(), max_norm=0.5)
    opt.step()
    opt.zero_grad()
    return (all_reduce(loss_sum.detach()) / global_tokens).item(), norm


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    from finetune.checkpointing.recipe_state import capture_rng_state, gather_rng_states
    from finetune.training import distributed

    info = distributed.init_distributed("cpu")
    assert info == distributed.DistInfo(rank=rank, world_size=WORLD, local_rank=rank, is_distributed=True)
    results = {}
    for i, config in enumerate(CONFIGS):

        def sharded(seed: int, config: dict = config):
            model = shard_model(
                _build(config, seed), reshard_after_forward=config["reshard"], cpu_offload=config["cpu_offload"]
            )
            return model, build_optimizer("adamw", model.parameters(), lr=1e-2, weight_decay=0.1, device=CPU)

        model, opt = sharded(seed=0)
        history = [_train_step(model, opt, s, rank, WORLD, distributed.all_reduce_sum) for s in range(STEPS)]
        model_sd = full_model_state_dict(model)
        optim_sd = full_optimizer_state_dict(model, opt)

        # Reload into a differently initialised sharded model; gather again; train one more step.
        model2, opt2 = sharded(seed=1)
        load_full_model_state_dict(model2, model_sd if rank == 0 else {})
        load_full_optimizer_state_dict(model2, opt2, optim_sd if rank == 0 else {})
        reloaded_sd = full_model_state_dict(model2)
        reloaded_optim_sd = full_optimizer_state_dict(model2, opt2)
        next_step = _train_step(model, opt, STEPS, rank, WORLD, distributed.all_reduce_sum)
        next_step2 = _train_step(model2, opt2, STEPS, rank, WORLD, distributed.all_reduce_sum)
        after, after2 = full_model_state_dict(model), full_model_state_dict(model2)
        results[i] = {
            "history": history,
            "model_sd": model_sd,
            "optim_sd": optim_sd,
            "reloaded_sd": reloaded_sd,
            "reloaded_optim_sd": reloaded_optim_sd,
            "next_step": (next_step, next_step2),
            "after": (after, after2),
        }
        assert (model_sd == {}) == (rank != 0)

    torch.manual_seed(100 + rank)
    mine = capture_rng_state()
    results["rng"] = gather_rng_states(WORLD)
    assert torch.equal(results["rng"][rank]["torch"], mine["torch"])
    distributed.barrier()
    if distributed.is_rank_zero():
        torch.save(results, Path(out_dir) / "results.pt")
    distributed.destroy_distributed()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fsdp_results():
    with tempfile.TemporaryDirectory() as out_dir:
        # Forked workers skip re-importing torch (seconds each); spawn where fork is unsafe.
        start_method = "fork" if sys.platform == "linux" and not torch.cuda.is_available() else "spawn"
        context = mp.start_processes(
            _worker, args=(_free_port(), out_dir), nprocs=WORLD, join=False, start_method=start_method
        )
        try:
            for _ in range(240):  # two minutes at most: a hang fails instead of blocking the suite
                if context.join(timeout=0.5):
                    break
            else:
                raise AssertionError("FSDP worker processes did not finish in time")
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
        yield torch.load(Path(out_dir) / "results.pt", weights_only=True)


def _single_process_reference(config: dict):
    model = _build(config)
    opt = build_optimizer("adamw", model.parameters(), lr=1e-2, weight_decay=0.1, device=CPU)
    history = [_train_step(model, opt, s, 0, 1, lambda t: t) for s in range(STEPS)]
    return history, model.state_dict()


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(CONFIGS)))
def test_sharded_training_matches_single_process(fsdp_results, index):
    result = fsdp_results[index]
    history, state = _single_process_reference(CONFIGS[index])
    got_losses, got_norms = zip(*result["history"])
    ref_losses, ref_norms = zip(*history)
    assert got_losses == pytest.approx(ref_losses, rel=1e-6)
    assert got_norms == pytest.approx(ref_norms, rel=1e-5)
    assert min(ref_norms) > 0.5  # clipping was active
    assert set(result["model_sd"]) == set(state)
    for name, value in state.items():
        torch.testing.assert_close(result["model_sd"][name], value, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(CONFIGS)))
def test_full_state_dicts_round_trip_bit_exactly(fsdp_results, index):
    result = fsdp_results[index]
    for name, value in result["model_sd"].items():
        assert value.device.type == "cpu"
        assert torch.equal(result["reloaded_sd"][name], value), name
    state, reloaded = result["optim_sd"]["state"], result["reloaded_optim_sd"]["state"]
    assert set(state) == set(reloaded) and len(state) > 0
    for name in state:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state[name][key], reloaded[name][key]), (name, key)
    (group,), (reloaded_group,) = result["optim_sd"]["param_groups"], result["reloaded_optim_sd"]["param_groups"]
    # The broadcast from rank 0 turns tuples (betas) into lists; the values are what matter.
    assert reloaded_group["betas"] == list(group["betas"])
    assert {k: v for k, v in group.items() if k != "betas"} == {k: v for k, v in reloaded_group.items() if k != "betas"}
    # Training on from the reloaded state is indistinguishable from never having stopped.
    (loss, norm), (loss2, norm2) = result["next_step"]
    assert (loss, norm) == (loss2, norm2)
    after, after2 = result["after"]
    for name in after:
        assert torch.equal(after[name], after2[name]), name


@pytest.mark.slow
def test_rng_states_gathered_per_rank(fsdp_results):
    states = fsdp_results["rng"]
    assert len(states) == WORLD
    for rank, state in enumerate(states):
        torch.manual_seed(100 + rank)
        assert torch.equal(state["torch"], torch.get_rng_state())


def test_unsharded_state_dicts_are_snapshots_and_reload_exactly():
    model = _build(CONFIGS[1])
    opt = build_optimizer("adamw", model.parameters(), lr=1e-2, weight_decay=0.1, device=CPU)
    for step in range(2):
        _train_step(model, opt, step, 0, 1, lambda t: t)
    model_sd = full_model_state_dict(model)
    optim_sd = full_optimizer_state_dict(model, opt)
    frozen_model = {k: v.clone() for k, v in model_sd.items()}
    frozen_steps = {k: v["step"].clone() for k, v in optim_sd["state"].items()}

    model2 = _build(CONFIGS[1], seed=1)
    opt2 = build_optimizer("adamw", model2.parameters(), lr=1e-2, weight_decay=0.1, device=CPU)
    load_full_model_state_dict(model2, model_sd)
    load_full_optimizer_state_dict(model2, opt2, optim_sd)
    assert _train_step(model, opt, 2, 0, 1, lambda t: t) == _train_step(model2, opt2, 2, 0, 1, lambda t: t)
    for (name, p), p2 in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(p, p2), name
    # Training on did not reach into the state dicts taken before.
    for name, value in model_sd.items():
        assert torch.equal(value, frozen_model[name]), name
    for name, state in optim_sd["state"].items():
        assert torch.equal(state["step"], frozen_steps[name])


def test_shard_model_rejects_a_parameter_shared_across_units():
    model = TinyDecoder(n_layers=2)
    model.layers[1].mix.weight = model.layers[0].mix.weight
    with pytest.raises(ValueError, match="layers 0 and 1 share a parameter"):
        shard_model(model)
    model = TinyDecoder(n_layers=2, dim=64, vocab=64)
    model.layers[0].mix.weight = model.output.weight
    with pytest.raises(ValueError, match="shared between model.layers and the rest"):
        shard_model(model)
