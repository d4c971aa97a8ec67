"""torchrun flags before the recipe name: a misspelt flag or a value torchrun cannot use is one
`error:` line with exit 2 before any worker starts; the first-generation documentation's
commands run as written as far as the checkpoint they need."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.cli.torchrun import _TORCHRUN_SWITCHES, check_launcher_args, torchrun_options
from tests.cli_helpers import error_line, run

REPO = Path(__file__).resolve().parents[2]

BAD_FLAGS = [
    (["--nproc_per_nod", "4"], "unknown launcher flag '--nproc_per_nod'; did you mean '--nproc_per_node'?"),
    (["--nprocs", "4"], "unknown launcher flag '--nprocs'; did you mean '--nproc_per_node'?"),
    (["--nproc-per-nod", "4"], "did you mean '--nproc-per-node'?"),
    (["--nnode", "1"], "unknown launcher flag '--nnode'; did you mean '--nnodes'?"),
    (
        ["--nproc_per_node", "abc"],
        "--nproc_per_node must be a positive whole number (or auto, cpu, gpu, xpu); got 'abc'",
    ),
    (["--nproc_per_node", "0"], "got '0'"),
    (["--nproc_per_node=-2"], "got '-2'"),
    (["--nproc-per-node", "1.5"], "--nproc-per-node must be a positive whole number"),
    (["--nnodes", "0"], "--nnodes must be a positive whole number or MIN:MAX (e.g. 1 or 1:4); got '0'"),
    (["--nnodes", "2:1"], "got '2:1'"),
    (["--nnodes", "1:2:3"], "got '1:2:3'"),
    (["--nnodes", "1", "--master_port", "http"], "--master_port must be a whole number; got 'http'"),
    (["--start_method", "thread"], "--start_method must be one of spawn, fork, forkserver; got 'thread'"),
    (["--no-python"], "tune starts each worker on the recipe itself"),
]


@pytest.mark.parametrize("flags,expected", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
@pytest.mark.parametrize("prefix", [[], ["run"]], ids=["tune", "tune-run"])
def test_a_bad_launcher_flag_is_one_line_and_exit_2(capsys, tmp_path, flags, expected, prefix):
    argv = [*flags, "dummy", f"output_dir={tmp_path / 'out'}"]
    if prefix:  # `tune run --nproc_per_node 2 dummy` takes the flags after `run` too
        argv = ["run", *argv]
    code, _, err = run(capsys, *argv)
    assert code == 2, err
    assert expected in error_line(err) and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing ran


def test_torchruns_own_spellings_and_values_pass():
    check_launcher_args(
        ["--nnodes", "1:4", "--nproc_per_node", "auto", "--node-rank=0", "--master_addr", "localhost"]
        + ["--master-port", "29500", "--standalone", "--rdzv_backend", "c10d", "--max_restarts", "0"]
    )
    check_launcher_args(["--nproc-per-node", "cpu", "--nnodes=2", "--start-method", "spawn"])


def test_the_switches_tune_splits_by_are_torchruns():
    switches = {name for name, action in torchrun_options().items() if action.nargs == 0} - {"-h", "--help"}
    assert switches == _TORCHRUN_SWITCHES


# The first-generation documentation's config names and its two commands.
FIRST_GENERATION = [
    ("finetune_llm", "alpaca_llama2_finetune"),
    ("full_finetune", "alpaca_llama2_full_finetune"),
    ("lora_finetune_single_device", "alpaca_llama2_lora_finetune_single_device"),
    ("lora_finetune_distributed", "alpaca_llama2_lora_finetune_distributed"),
]
CHECKPOINT_ERROR = "error: checkpoint directory /models/Llama-2-7b-hf does not exist; check checkpoint_dir"


@pytest.mark.parametrize("recipe,config", FIRST_GENERATION)
def test_first_generation_configs_run_up_to_the_checkpoint(capsys, tmp_path, recipe, config):
    code, _, err = run(capsys, "--nnodes", "1", recipe, "--config", config, f"output_dir={tmp_path / 'out'}")
    assert code == 2 and error_line(err) == CHECKPOINT_ERROR


@pytest.mark.slow
@pytest.mark.parametrize(
    "command",
    [
        "--nnodes 1 --nproc_per_node 4 finetune_llm --config alpaca_llama2_finetune",
        "--nnodes 1 --nproc_per_node 2 lora_finetune_distributed --config alpaca_llama2_lora_finetune_distributed "
        "--override lora_attn_modules=q_proj,k_proj,v_proj lora_rank=4",
    ],
)
def test_first_generation_commands_run_as_written_through_torchrun(tmp_path, command):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    argv = [*command.split(), f"output_dir={tmp_path / 'out'}"]
    result = subprocess.run(
        [sys.executable, "-m", "finetune.cli", *argv], capture_output=True, text=True, env=env, timeout=240
    )
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert errors == [CHECKPOINT_ERROR], result.stderr
    assert "Traceback" not in result.stderr
