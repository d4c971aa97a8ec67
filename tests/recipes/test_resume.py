"""Resuming never goes on silently wrong: a changed setting that fixes the data order, the model or
the optimizer state is refused with one line and writes nothing; a new lr, more epochs or an
earlier step are honoured exactly; metrics.jsonl reads as one run; a damaged recipe state, a
finished run and a full disk are one line each, with every earlier record left as it was."""

import json
import resource
import shutil
import signal
from pathlib import Path

import pytest
import torch

from finetune.checkpointing.output_lock import LOCK_FILE
from finetune.cli import main
from tests.cli_helpers import error_line
from tests.recipes.helpers import as_argv, assert_same_tensors, metrics, tune

RUN = {"max_steps_per_epoch": 4, "save_every_n_steps": 2, "warmup_steps": 1}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A full fine-tune of 4 steps that saved step_2 and step_4 and ended `done`."""
    out = tmp_path_factory.mktemp("finished") / "out"
    assert main(["finetune_llm", *as_argv(output_dir=out, **RUN)]) == 0
    return out


@pytest.fixture
def run_dir(finished, tmp_path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` but the lock (whose holder a refused run also writes) with its bytes."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != LOCK_FILE
    }


def resume(capsys, out: Path, *extra: str, recipe: str = "finetune_llm", **values) -> tuple[int, str]:
    capsys.readouterr()
    code = main([recipe, *as_argv(output_dir=out, **{**RUN, **values}), "resume_from_checkpoint=true", *extra])
    return code, capsys.readouterr().err


CHANGED = [  # key, the new value, the saved value as the line shows it, the setting that restores it
    ("batch_size", "16", "4", "batch_size=4"),
    ("gradient_accumulation_steps", "2", "1", "gradient_accumulation_steps=1"),
    ("seed", "7", "42", "seed=42"),
    ("shuffle", "false", "True", "shuffle=true"),
    ("split", "train[:50%]", "'train'", "split=train"),
    ("max_seq_len", "32", "64", "max_seq_len=64"),
    ("dataset", "pkg:data/demo/heldout.jsonl", "'pkg:data/demo/train.jsonl'", "dataset=pkg:data/demo/train.jsonl"),
    ("optimizer", "sgd", "'adamw'", "optimizer=adamw"),
    ("max_steps_per_epoch", "10", "4", "max_steps_per_epoch=4"),
]


@pytest.mark.parametrize("key,new,saved,fix", CHANGED, ids=[c[0] for c in CHANGED])
def test_a_changed_data_model_or_optimizer_setting_is_refused_and_writes_nothing(capsys, run_dir, key, new, saved, fix):
    before = snapshot(run_dir)
    code, err = resume(capsys, run_dir, f"{key}={new}")
    assert code == 2
    line = error_line(err)
    assert line.startswith(f"error: {key} is ") and f"{run_dir / 'step_4'} was trained with {saved};" in line, line
    assert f"set {fix}, or start a new run" in line
    assert "Traceback" not in err
    assert snapshot(run_dir) == before


def test_resuming_a_finished_run_says_so_and_changes_nothing(capsys, run_dir):
    before = snapshot(run_dir)
    code, err = resume(capsys, run_dir)
    assert code == 2
    assert error_line(err) == (
        f"error: the run in {run_dir} is finished: step_4 ends its 1 epoch(s), so there is nothing to resume and "
        "nothing was changed; to train further set epochs=2 (or more) with resume_from_checkpoint=true, or start "
        "a new run in another output_dir"
    )
    assert snapshot(run_dir) == before
    assert json.loads((run_dir / "status.json").read_text())["state"] == "done"


def test_a_lora_resume_refused_on_a_full_runs_folder_leaves_its_record(capsys, run_dir):
    before = snapshot(run_dir)
    code, err = resume(capsys, run_dir, recipe="lora_finetune")
    assert code == 2
    assert "is a checkpoint of a full fine-tune run" in error_line(err)
    assert snapshot(run_dir) == before  # status.json still says done; events.jsonl has no new run


def test_a_resume_on_another_number_of_processes_is_refused(capsys, run_dir):
    state_file = run_dir / "step_4" / "recipe_state.pt"
    state = torch.load(state_file, weights_only=True)
    state["rng_states"] = state["rng_states"] * 2  # as a 2-process run saves it
    torch.save(state, state_file)
    code, err = resume(capsys, run_dir, "epochs=2")
    assert code == 2
    assert error_line(err).startswith(
        f"error: this run has 1 process(es) but {run_dir / 'step_4'} was trained with 2; each process reads its own "
        "share of every step's samples"
    )


class _RunsCode:
    def __reduce__(self):
        return (print, ("unpickled",))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:1000])


def _craft_code(path: Path) -> None:
    torch.save({"format_version": 1, "optimizer": _RunsCode()}, path)


def _craft_step(path: Path) -> None:
    state = torch.load(path, weights_only=True)
    torch.save({**state, "global_step": 40}, path)


def _craft_types(path: Path) -> None:
    state = torch.load(path, weights_only=True)
    torch.save({**state, "epoch": "first"}, path)


@pytest.mark.parametrize(
    "damage,reason",
    [
        (_truncate, "(it is truncated or damaged)"),
        (_craft_code, "(it holds objects other than tensors and plain values"),
        (_craft_step, "says step 40 in step_4, so it was not written by finetune or was altered"),
        (_craft_types, "holds epoch='first', so it was not written by finetune or was altered"),
    ],
    ids=["truncated", "pickled-code", "wrong-step", "wrong-type"],
)
def test_a_damaged_or_crafted_recipe_state_is_one_line_naming_an_earlier_step(capsys, run_dir, damage, reason):
    damage(run_dir / "step_4" / "recipe_state.pt")
    before = snapshot(run_dir)
    code, err = resume(capsys, run_dir, "epochs=2")
    assert code == 2
    line = error_line(err)
    assert str(run_dir / "step_4" / "recipe_state.pt") in line and reason in line, line
    assert "resume_from_checkpoint=step_2" in line
    assert "weights_only" not in err and "Traceback" not in err and "unpickled" not in err
    assert snapshot(run_dir) == before


def test_resume_from_an_earlier_step_is_bit_identical_and_metrics_read_as_one_run(capsys, run_dir, finished):
    code, err = resume(capsys, run_dir, "resume_from_checkpoint=step_2")
    assert code == 2
    assert error_line(err) == (
        f"error: resume_from_checkpoint=step_2: {run_dir} also holds the newer step_4, which a later "
        "resume_from_checkpoint=true would continue instead; move them out of output_dir (or delete them), then "
        "run again"
    )
    shutil.move(run_dir / "step_4", run_dir.parent / "step_4_aside")
    code, err = resume(capsys, run_dir, "resume_from_checkpoint=step_2")
    assert code == 0, err
    assert_same_tensors(finished / "step_4" / "model.safetensors", run_dir / "step_4" / "model.safetensors")
    records = metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # steps 3 and 4 were logged twice before
    assert [r["loss"] for r in records] == [r["loss"] for r in metrics(finished)]


def test_more_epochs_continue_and_a_new_lr_holds_from_the_next_step(capsys, run_dir):
    code, err = resume(capsys, run_dir, "epochs=2", "lr=2e-3")
    assert code == 0, err
    assert "note: lr is 0.002 (was 0.001 up to step_4)" in err
    assert "note: epochs is 2 (was 1 up to step_4)" in err
    records = metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, 9))
    # Cosine over 8 steps with 1 warm-up step: step 5 runs at the multiplier for 4 steps taken.
    decay = 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 3 / 7))).item()
    assert records[4]["lr"] == pytest.approx(2e-3 * decay, rel=1e-6)
    assert sorted(p.name for p in run_dir.glob("step_*")) == ["step_2", "step_4", "step_6", "step_8"]


def test_changed_data_is_refused_before_training(capsys, tmp_path):
    data = tmp_path / "train.jsonl"
    records = [{"instruction": f"say {i}", "output": f"{i} {i}"} for i in range(64)]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out"
    assert main(["finetune_llm", *as_argv(output_dir=out, dataset=data, **RUN)]) == 0
    names = ("status.json", "events.jsonl", "params.yaml", "metrics.jsonl")
    record = {name: (out / name).read_bytes() for name in names}
    data.write_text("".join(json.dumps(r) + "\n" for r in records[:60]))
    code, err = resume(capsys, out, f"dataset={data}", "epochs=2")
    assert code == 2
    assert error_line(err).startswith(
        f"error: the training data has 60 samples but {out / 'step_4'} was trained on 64: it changed since"
    )
    # The check needs the built data, so it comes after the run began its record; the record is put back.
    assert {name: (out / name).read_bytes() for name in record} == record
    assert json.loads(record["status.json"])["state"] == "done"


def _file_size_limit(limit: int):
    def apply() -> None:
        # With SIGXFSZ ignored, a write past the limit fails with EFBIG, as one past a full disk fails with ENOSPC.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_failed_write_inside_torch_save_is_one_line_and_keeps_the_earlier_checkpoint(capsys, run_dir):
    """A real failing write(2): model.safetensors (13.6 MB) fits under the 20 MB file-size limit, the
    recipe state (27 MB of AdamW moments) does not, so torch.save itself fails mid-file."""
    shutil.rmtree(run_dir / "step_4")
    before = (run_dir / "step_2" / "recipe_state.pt").read_bytes()
    argv = as_argv(output_dir=run_dir, **RUN)
    process = tune(
        "finetune_llm", *argv, "resume_from_checkpoint=true", wait=False, preexec_fn=_file_size_limit(20_000_000)
    )
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 2, stderr[-3000:]
    assert "Traceback" not in stderr
    assert error_line(stderr) == (
        f"error: cannot write {run_dir / 'step_4'} (File too large): the file system or the shell's file-size "
        "limit (ulimit -f) caps one file's size; raise the limit or choose an output_dir on another file system, "
        "then run again: nothing saved before was changed"
    )
    assert (run_dir / "step_2" / "recipe_state.pt").read_bytes() == before
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith((".step", "step_"))) == ["step_2"]


def test_leftovers_of_killed_saves_are_removed_at_the_next_start(capsys, run_dir):
    (run_dir / ".step_6.tmp-999999").mkdir()
    (run_dir / ".step_6.tmp-999999" / "model.safetensors").write_bytes(b"partial")
    (run_dir / ".status.json.tmp-999998").write_text("{")
    code, err = resume(capsys, run_dir, "epochs=2")
    assert code == 0, err
    assert not list(run_dir.glob(".*.tmp-*"))


def test_drop_records_after_keeps_earlier_steps_and_drops_a_cut_line(tmp_path):
    from finetune.training.metrics import drop_records_after  # here: the other tests also run on older code

    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3, 2, 3)] + ['{"step": 4, "lo']
    path.write_text("\n".join(lines))
    assert drop_records_after(path, 2) == 3
    assert path.read_text() == f"{lines[0]}\n{lines[1]}\n{lines[3]}\n"
    assert drop_records_after(tmp_path / "missing.jsonl", 2) == 0
