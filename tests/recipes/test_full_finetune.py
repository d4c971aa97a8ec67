"""End-to-end tests of the full fine-tune recipe on the tiny model and the shipped demo data:
loss falls, accumulation equals a big batch, memory features keep gradients, FSDP follows one
process, resume is bit-exact after SIGKILL, checkpoints load in `transformers`, and the job
monitor tells the truth."""

import json
import math
import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch

from finetune.checkpointing.output_lock import LOCK_FILE
from finetune.cli import main
from finetune.params import FullFinetuneParams, resolve_path
from finetune.recipes.full_finetune import FullFinetuneRecipe
from finetune.training.loop import TrainingLoop
from tests.recipes.helpers import TINY, as_argv, assert_same_tensors, metrics, tensors, train_losses, tune, wait_for


def params(tmp_path: Path, **overrides) -> FullFinetuneParams:
    return FullFinetuneParams(**{**TINY, "output_dir": str(tmp_path / "out"), **overrides})


def run_in_process(p: FullFinetuneParams) -> FullFinetuneRecipe:
    recipe = FullFinetuneRecipe(p)
    recipe.setup()
    recipe.train()
    recipe.cleanup()
    return recipe


def test_loss_falls_and_outputs_are_written(tmp_path):
    p = params(tmp_path, max_steps_per_epoch=25, batch_size=8)
    run_in_process(p)
    losses = train_losses(tmp_path / "out")
    assert len(losses) == 25
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
    step_dir = tmp_path / "out" / "step_25"
    for name in ("model.safetensors", "config.json", "tokenizer.model", "params.yaml", "recipe_state.pt"):
        assert (step_dir / name).is_file(), name
    assert FullFinetuneParams.from_yaml(step_dir / "params.yaml") == p
    record = metrics(tmp_path / "out")[-1]
    assert record["tokens_per_second"] > 0 and record["grad_norm"] > 0 and record["peak_memory_gb"] > 0


def test_eval_split_holds_out_the_rest_of_the_training_file(tmp_path):
    recipe = FullFinetuneRecipe(
        params(tmp_path, split="train[:90%]", eval_dataset=TINY["dataset"], eval_split="train[90%:]", max_seq_len=128)
    )  # no sample is cut
    recipe.setup()
    train, held_out = recipe.loop.train_loader.dataset, recipe.loop.eval_loader.dataset
    records = [line for line in resolve_path(TINY["dataset"]).read_text().splitlines() if line.strip()]
    assert (len(train), len(held_out)) == (round(0.9 * len(records)), len(records) - round(0.9 * len(records)))
    assert held_out[0]["tokens"] != train[0]["tokens"]
    recipe.cleanup()


def gradients(recipe: FullFinetuneRecipe, micro_batches) -> tuple[float, dict[str, torch.Tensor]]:
    loss = recipe.loop.accumulate_gradients(micro_batches)
    grads = {name: p.grad.clone() for name, p in recipe.model.named_parameters()}
    recipe.loop.optimizer.zero_grad(set_to_none=True)
    return loss, grads


def first_samples(recipe: FullFinetuneRecipe, n: int) -> list[dict]:
    dataset = recipe.loop.train_loader.dataset
    # Samples of different lengths, so padding differs between the two batchings.
    return [dataset[i] for i in range(n)]


def collate(recipe, samples):
    from finetune.data import collate as pad

    return pad(samples, pad_id=recipe.tokenizer.pad_id)


def test_accumulation_k_micro_batches_equal_one_big_batch(tmp_path):
    recipe = FullFinetuneRecipe(params(tmp_path))
    recipe.setup()
    samples = first_samples(recipe, 8)
    big_loss, big = gradients(recipe, [collate(recipe, samples)])
    micro = [collate(recipe, samples[i : i + 2]) for i in range(0, 8, 2)]
    acc_loss, acc = gradients(recipe, micro)
    recipe.cleanup()
    assert acc_loss == pytest.approx(big_loss, abs=1e-5)
    for name in big:
        torch.testing.assert_close(acc[name], big[name], atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("feature", ["enable_activation_checkpointing", "enable_activation_offloading"])
def test_memory_features_keep_gradients(tmp_path, feature):
    plain = FullFinetuneRecipe(params(tmp_path / "a"))
    plain.setup()
    batch = collate(plain, first_samples(plain, 4))
    loss, expected = gradients(plain, [batch])
    featured = FullFinetuneRecipe(params(tmp_path / "b", **{feature: True}))
    featured.setup()
    loss_featured, got = gradients(featured, [batch])
    assert loss_featured == pytest.approx(loss, abs=1e-6)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5, msg=name)


def test_output_loads_in_transformers_with_equal_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    recipe = run_in_process(params(tmp_path, max_steps_per_epoch=2))
    step_dir = tmp_path / "out" / "step_2"
    hf = transformers.AutoModelForCausalLM.from_pretrained(step_dir, dtype=torch.float32).eval()
    tokens = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = recipe.model.eval()(tokens)
        theirs = hf(tokens).logits
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_status_goes_starting_running_done(tmp_path, monkeypatch):
    from finetune.training import monitor

    seen: list[str] = ["starting"]  # written by the constructor
    original = monitor.JobMonitor._set

    def record(self, **fields):
        # State changes come only from the recipe's thread; the heartbeat never sets one.
        if "state" in fields and fields["state"] != seen[-1]:
            seen.append(fields["state"])
        original(self, **fields)

    monkeypatch.setattr(monitor.JobMonitor, "_set", record)
    assert (
        main(["finetune_llm", *as_argv(output_dir=tmp_path / "out", max_steps_per_epoch=2, save_every_n_steps=1)]) == 0
    )
    assert seen == ["starting", "running", "checkpointing", "running", "checkpointing", "running", "done"]
    status = json.loads((tmp_path / "out" / "status.json").read_text())
    assert status["state"] == "done" and status["step"] == 2
    assert status["last_checkpoint"] == str(tmp_path / "out" / "step_2")


def test_a_fresh_run_refuses_an_earlier_runs_checkpoints_and_keeps_them(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["finetune_llm", *as_argv(output_dir=out, max_steps_per_epoch=3, warmup_steps=1)]) == 0
    before = (out / "step_3" / "model.safetensors").read_bytes()
    lines_before = (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    code = main(
        ["finetune_llm", *as_argv(output_dir=out, max_steps_per_epoch=2, warmup_steps=1, keep_last_n_checkpoints=1)]
    )
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (
        f"error: output_dir {out} already holds checkpoints of an earlier run (step_3); "
        "set resume_from_checkpoint=true to continue it, or choose another output_dir"
    )
    assert (out / "step_3" / "model.safetensors").read_bytes() == before
    assert (out / "metrics.jsonl").read_text() == lines_before


def test_an_output_dir_that_is_a_file_is_one_error_line(tmp_path, capsys):
    (tmp_path / "taken").write_text("mine")
    assert main(["finetune_llm", *as_argv(output_dir=tmp_path / "taken", max_steps_per_epoch=2)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: output_dir {tmp_path / 'taken'} is a file, not a directory; choose another output_dir"
    assert (tmp_path / "taken").read_text() == "mine"


def test_cleanup_after_a_failed_setup_ends_the_job_status(tmp_path):
    from finetune.errors import UserError

    recipe = FullFinetuneRecipe(params(tmp_path, dataset=str(tmp_path / "missing.jsonl")))
    with pytest.raises(UserError, match="missing.jsonl"):
        recipe.setup()
    recipe.cleanup()
    heartbeat = recipe.run.monitor._thread
    assert heartbeat is not None and not heartbeat.is_alive()
    status = json.loads((tmp_path / "out" / "status.json").read_text())
    assert status["state"] == "failed" and status["error"] == "closed before training finished"


def test_a_full_disk_at_a_save_is_one_line_and_keeps_the_earlier_checkpoint(tmp_path, monkeypatch, capsys):
    import errno

    import finetune.checkpointing.writers as writers

    real_save, saves = writers.save_safetensors, []

    def fills_the_disk_on_the_second_save(tensors, path, *args, **kwargs):
        saves.append(path)
        if len(saves) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(writers, "save_safetensors", fills_the_disk_on_the_second_save)
    out = tmp_path / "out"
    code = main(["finetune_llm", *as_argv(output_dir=out, max_steps_per_epoch=4, save_every_n_steps=2, warmup_steps=1)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (
        f"error: cannot write {out / 'step_4'} (No space left on device); free space or fix permissions "
        "there, or choose another output_dir, then run again: nothing saved before was changed"
    )
    leftovers = [p.name for p in out.iterdir() if p.name.startswith((".", "step_")) and p.name != LOCK_FILE]
    assert sorted(leftovers) == ["step_2"]
    assert json.loads((out / "status.json").read_text())["state"] == "failed"
    monkeypatch.setattr(writers, "save_safetensors", real_save)
    resumed = main(
        [
            "finetune_llm",
            *as_argv(
                output_dir=out, max_steps_per_epoch=4, save_every_n_steps=2, warmup_steps=1, resume_from_checkpoint=True
            ),
        ]
    )
    assert resumed == 0 and (out / "step_4").is_dir()


def test_nan_loss_fails_naming_the_step_and_keeps_the_checkpoint(tmp_path, monkeypatch, capsys):
    original = TrainingLoop.accumulate_gradients

    def poisoned(self, micro_batches):
        loss = original(self, micro_batches)
        return math.nan if self.global_step == 2 else loss

    monkeypatch.setattr(TrainingLoop, "accumulate_gradients", poisoned)
    out = tmp_path / "out"
    code = main(["finetune_llm", *as_argv(output_dir=out, max_steps_per_epoch=5, save_every_n_steps=2)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: loss is nan at step 3") and str(out / "step_2") in err
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "failed" and "step 3" in status["error"]
    assert status["last_checkpoint"] == str(out / "step_2")
    assert sorted(p.name for p in out.glob("step_*")) == ["step_2"]


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_resume_after_sigkill_is_bit_exact(tmp_path, nproc):
    launcher = ["--nproc_per_node", str(nproc)] if nproc > 1 else []
    run = as_argv(max_steps_per_epoch=4, epochs=2, save_every_n_steps=2, batch_size=2, lr=3e-3)
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    result = tune(*launcher, "finetune_llm", *run, f"output_dir={reference}")
    assert result.returncode == 0, result.stderr[-3000:]

    process = tune(*launcher, "finetune_llm", *run, f"output_dir={interrupted}", wait=False, start_new_session=True)
    wait_for(interrupted / "step_4", process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (interrupted / "step_8").exists(), "the run finished before it was killed"
    result = tune(*launcher, "finetune_llm", *run, f"output_dir={interrupted}", "resume_from_checkpoint=true")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_tensors(reference / "step_8" / "model.safetensors", interrupted / "step_8" / "model.safetensors")
    assert train_losses(reference)[-1] == train_losses(interrupted)[-1]


@pytest.mark.slow
def test_two_processes_follow_one_process(tmp_path):
    run = as_argv(max_steps_per_epoch=4, lr=3e-3)
    one = tune("finetune_llm", *run, "batch_size=4", f"output_dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-3000:]
    two = tune("--nproc_per_node", "2", "finetune_llm", *run, "batch_size=2", f"output_dir={tmp_path / 'two'}")
    assert two.returncode == 0, two.stderr[-3000:]
    for a, b in zip(train_losses(tmp_path / "one"), train_losses(tmp_path / "two"), strict=True):
        assert abs(a - b) <= 1e-4
    counts = [re.search(r"model tiny: ([\d,]+) parameters", r.stderr).group(1) for r in (one, two)]
    assert counts[0] == counts[1], counts  # sharded parameters count their full size once
    wa, wb = (tensors(tmp_path / run / "step_4" / "model.safetensors") for run in ("one", "two"))
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.slow
def test_two_nodes_on_loopback(tmp_path):
    run = [*as_argv(max_steps_per_epoch=2, batch_size=2), f"output_dir={tmp_path / 'out'}"]
    port = 29500 + os.getpid() % 1000
    nodes = [
        tune(
            "--nnodes",
            "2",
            "--node_rank",
            str(rank),
            "--nproc_per_node",
            "1",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(port),
            "finetune_llm",
            *run,
            wait=False,
        )
        for rank in (0, 1)
    ]
    for node in nodes:
        _, stderr = node.communicate(timeout=600)
        assert node.returncode == 0, stderr[-3000:]
    assert (tmp_path / "out" / "step_2" / "model.safetensors").is_file()
    assert len(train_losses(tmp_path / "out")) == 2


def test_sigterm_during_setup_ends_the_run_as_preempted(tmp_path, monkeypatch, capsys):
    """Before the loop there is no step to finish and nothing to save: SIGTERM ends the run at once."""
    import finetune.recipes.full_finetune as recipe_module

    real = recipe_module.load_model_source

    def preempted_while_loading(params):
        assert signal.getsignal(signal.SIGTERM) != signal.SIG_DFL, "SIGTERM would kill the test session"
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)  # the handler runs here
        return real(params)

    monkeypatch.setattr(recipe_module, "load_model_source", preempted_while_loading)
    handler = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "out"
    assert main(["finetune_llm", *as_argv(output_dir=out, max_steps_per_epoch=2)]) == 143
    assert signal.getsignal(signal.SIGTERM) == handler
    assert "Traceback" not in capsys.readouterr().err
    status = json.loads((out / "status.json").read_text())
    assert (status["state"], status["error"], status["step"]) == ("preempted", None, 0)
    assert not list(out.glob("step_*")) and not (out / "metrics.jsonl").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "stop_signal,status,state",
    [
        (signal.SIGINT, 130, "stopped"),
        (signal.SIGTERM, 143, "preempted"),
    ],
    ids=["ctrl_c", "sigterm"],
)
def test_a_stop_signal_saves_a_checkpoint_and_records_why(tmp_path, stop_signal, status, state):
    """Ctrl-C is a stop a person asked for and SIGTERM a scheduler's preemption: neither is a failure."""
    out = tmp_path / "out"
    process = tune("finetune_llm", *as_argv(max_steps_per_epoch=400, batch_size=2), f"output_dir={out}", wait=False)
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").exists() or len(train_losses(out)) < 2:
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.05)
    process.send_signal(stop_signal)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == status and "Traceback" not in stderr, stderr[-3000:]
    saved = list(out.glob("step_*"))
    assert len(saved) == 1 and (saved[0] / "model.safetensors").is_file()
    record = json.loads((out / "status.json").read_text())
    assert (record["state"], record["error"]) == (state, None)
    assert record["last_checkpoint"] == str(saved[0]) and record["step"] == int(saved[0].name.split("_")[1])


@pytest.mark.slow
def test_compile_profile_and_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    recipe = run_in_process(
        params(
            tmp_path,
            max_steps_per_epoch=3,
            compile=True,
            profile=True,
            profile_wait_steps=0,
            profile_active_steps=1,
            metric_logger_type="tensorboard",
        )
    )
    assert all(layer._compiled_call_impl is not None for layer in recipe.model.layers)
    assert len(train_losses(tmp_path / "out")) == 3
    traces = list((tmp_path / "out" / "profile").glob("*.json"))
    assert traces and "traceEvents" in traces[0].read_text()[:2000]
    assert list((tmp_path / "out" / "tensorboard").glob("events.out.tfevents.*"))


def test_out_of_memory_names_the_knobs(tmp_path, monkeypatch, capsys):
    def no_memory(self, micro_batches):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(TrainingLoop, "accumulate_gradients", no_memory)
    code = main(["finetune_llm", *as_argv(output_dir=tmp_path / "out", max_steps_per_epoch=2)])
    assert code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: out of memory on cpu at the first step")
    for knob in ("batch_size", "enable_activation_checkpointing=true", "enable_activation_offloading=true"):
        assert knob in line


SLOW_SAVE = """
import sys, time
import finetune.checkpointing.writers as writers
original = writers.save_hf_checkpoint
def slow(*args, **kwargs):
    paths = original(*args, **kwargs)
    time.sleep(30)  # the model is written, the rest of the checkpoint is not yet
    return paths
writers.save_hf_checkpoint = slow
import finetune.checkpointing
finetune.checkpointing.save_hf_checkpoint = slow
from finetune.checkpointing.output_lock import LOCK_FILE
from finetune.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_kill_during_save_keeps_the_previous_checkpoint(tmp_path):
    import subprocess
    import sys

    from tests.recipes.helpers import REPO

    script = tmp_path / "slow_save.py"
    script.write_text(SLOW_SAVE)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    first = subprocess.run(
        [sys.executable, "-m", "finetune.cli", "finetune_llm", *as_argv(output_dir=out, max_steps_per_epoch=2)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert first.returncode == 0, first.stderr[-2000:]
    before = tensors(out / "step_2" / "model.safetensors")
    process = subprocess.Popen(
        [
            sys.executable,
            str(script),
            "finetune_llm",
            *as_argv(output_dir=out, max_steps_per_epoch=2, resume_from_checkpoint="true", epochs=2),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while not list(out.glob(".step_4.tmp-*/model.safetensors")):
        assert process.poll() is None and time.time() < deadline, process.stderr.read()[-2000:]
        time.sleep(0.05)
    process.kill()
    process.wait()
    assert sorted(p.name for p in out.glob("step_*")) == ["step_2"]
    after = tensors(out / "step_2" / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    # The half-written checkpoint is ignored; the run resumes from step 2.
    again = subprocess.run(
        [
            sys.executable,
            "-m",
            "finetune.cli",
            "finetune_llm",
            *as_argv(output_dir=out, max_steps_per_epoch=2, resume_from_checkpoint="true", epochs=2),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming from" in again.stderr and str(out / "step_2") in again.stderr
    assert (out / "step_4" / "model.safetensors").is_file()
