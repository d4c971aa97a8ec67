"""`tune report` on what a real run wrote: the summary's figures are the run's, the PNG is a real
picture of its curves, and the command never imports torch."""

import json
import os
import subprocess
import sys

import pytest

from tests.recipes.helpers import REPO, as_argv, metrics, tune


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("report") / "run"
    done = tune(
        "finetune_llm",
        *as_argv(
            output_dir=output_dir,
            max_steps_per_epoch=12,
            batch_size=8,
            eval_dataset="pkg:data/demo/heldout.jsonl",
            eval_every_n_steps=4,
            eval_max_batches=2,
            warmup_steps=3,
            save_every_n_steps=6,
        ),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return output_dir


def report(*argv: str) -> subprocess.CompletedProcess:
    """`tune report` in a fresh interpreter that then says whether torch was imported."""
    code = (
        "import sys\nfrom finetune.cli import main\ncode = main(sys.argv[1:])\n"
        "print('torch imported:', 'torch' in sys.modules)\nsys.exit(code)"
    )
    return subprocess.run(
        [sys.executable, "-c", code, "report", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def test_summary_gives_the_runs_own_figures_without_torch(finished_run):
    done = report(str(finished_run), "--no-plot")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    records = metrics(finished_run)
    losses = [r["loss"] for r in records if "loss" in r]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert "state     done" in lines
    assert "steps     12 (epoch 1)" in lines
    assert f"loss      {losses[0]:.4f} at step 1 -> {losses[-1]:.4f} at step 12" in done.stdout
    assert f"eval loss best {min(evals):.4f}" in done.stdout
    assert any(line.startswith("time      ") for line in lines)
    assert any(line.startswith("tokens/s  ") for line in lines)
    checkpoints = [line.split()[0] for line in lines[lines.index("checkpoints") + 1 :] if line.startswith("  ")]
    assert checkpoints == ["step_6", "step_12"]
    assert lines[-1] == "torch imported: False"
    assert not (finished_run / "report.png").exists()


def test_the_plot_is_a_png_of_the_curves(finished_run, tmp_path):
    image_module = pytest.importorskip("matplotlib.image", reason="matplotlib is the `report` extra (in `dev`)")
    target = tmp_path / "curves.png"
    done = report(str(finished_run), "--plot", str(target))
    assert done.returncode == 0, done.stderr
    assert f"plot      {target}" in done.stdout
    assert done.stdout.splitlines()[-1] == "torch imported: False"
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = image_module.imread(target)
    height, width = pixels.shape[:2]
    assert (width, height) == (1000, 400)
    rgb = pixels[..., :3]
    assert rgb.std() > 0.05  # not a blank canvas
    # The curves' own colours are drawn: training loss (blue), eval loss (orange), lr (green).
    for colour in ((0.122, 0.467, 0.706), (1.0, 0.498, 0.055), (0.173, 0.627, 0.173)):
        close = (abs(rgb - colour) < 0.02).all(axis=-1)
        assert close.sum() > 50, colour


def test_a_folder_without_a_run_is_one_error_line(tmp_path):
    done = report(str(tmp_path))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: {tmp_path} has no metrics.jsonl, so no training run wrote there; give tune report a run's output_dir"
    ]
    done = report(str(tmp_path / "missing"))
    assert done.returncode == 2 and "is not a folder" in done.stderr


def test_a_half_written_last_line_is_skipped(finished_run, tmp_path):
    copy = tmp_path / "run"
    copy.mkdir()
    lines = (finished_run / "metrics.jsonl").read_text().splitlines()
    (copy / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 13, "lo')
    (copy / "status.json").write_text(json.dumps({"state": "running", "step": 12, "epoch": 0}))
    done = report(str(copy), "--no-plot")
    assert done.returncode == 0, done.stderr
    assert "state     running" in done.stdout and "at step 12 (mean" in done.stdout
    assert "checkpoints none yet" in done.stdout
