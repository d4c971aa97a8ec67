"""The `tune` launcher and TuneArgumentParser: bad input gives one `error:` line and exit 2,
`ls` / `cp` / `validate`, a user recipe by path, and a 2-process dummy run through torchrun."""

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from finetune.cli import main

REPO = Path(__file__).resolve().parents[2]


def tune(*argv, cwd=None, timeout=240):
    """Run `tune` in a fresh interpreter, as a user would."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}  # as torchrun would set it, minus its notice
    return subprocess.run(
        [sys.executable, "-m", "finetune.cli", *argv], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout
    )


def single_error_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


def run_in_process(capsys, *argv):
    code = main(list(argv))
    return code, capsys.readouterr()


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(f"tokenizer_path: tok.model\noutput_dir: {tmp_path / 'out'}\n")
    return path


BAD_INPUTS = [
    (["validate", "--config", "{cfg}", "learning_rate=1"], "unknown key 'learning_rate' on the command line"),
    (["validate", "--config", "{cfg}", "bach_size=1"], "did you mean 'batch_size'?"),
    (
        ["validate", "--config", "{cfg}", "batch_size=two"],
        "batch_size='two' (on the command line) is not valid: expected int",
    ),
    (["validate", "--config", "{cfg}", "batch_size=0"], "batch_size=0 must be at least 1"),
    (["validate", "--config", "{cfg}", "compile=true", "enable_activation_offloading=true"], "cannot be combined"),
    (["validate", "--config", "no_such_config"], "config 'no_such_config' not found"),
    (["validate", "--config", "{cfg}", "shuffle=maybe"], "expected bool"),
    (
        ["validate", "--config", "{cfg}", "optimizer=lion"],
        "optimizer='lion' (on the command line) is not valid: expected one of adamw|adam|sgd",
    ),
    (["no_such_recipe", "--config", "{cfg}"], "unknown recipe 'no_such_recipe'"),
    (["validate", "--config", "{cfg}", "lr"], "'lr' is not KEY=VALUE"),
]


@pytest.mark.parametrize("argv,expected", BAD_INPUTS)
def test_bad_input_is_one_error_line_and_exit_2(capsys, config, argv, expected):
    argv = [a.replace("{cfg}", str(config)) for a in argv]
    code, out = run_in_process(capsys, *argv)
    assert code == 2
    assert expected in single_error_line(out.err)


def test_unknown_key_in_yaml_names_file_and_suggestion(capsys, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("tokenizer_path: t\nwarmup_step: 3\n")
    code, out = run_in_process(capsys, "validate", "--config", str(path))
    line = single_error_line(out.err)
    assert code == 2 and f"unknown key 'warmup_step' in {path}" in line and "did you mean 'warmup_steps'?" in line


def test_a_lora_config_under_the_full_recipe_names_the_lora_recipe(capsys):
    code, out = run_in_process(capsys, "finetune_llm", "--config", "tiny_lora")
    line = single_error_line(out.err)
    assert code == 2 and "unknown key 'lora_attn_modules'" in line
    assert "run this config with tune lora_finetune (also named lora_finetune_single_device and" in line


def test_malformed_yaml_names_the_line(capsys, tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("tokenizer_path: t\nlr: 0.1\nbatch_size: [1, 2\nepochs: 1\n")
    code, out = run_in_process(capsys, "validate", "--config", str(path))
    line = single_error_line(out.err)
    assert code == 2 and f"malformed YAML in {path}, line" in line


def test_errors_from_a_fresh_process_have_no_traceback(config):
    result = tune("dumy", "--config", str(config))
    assert result.returncode == 2
    assert "did you mean 'dummy'?" in single_error_line(result.stderr)
    result = tune("validate", "--config", str(config), "epochs=-1")
    assert result.returncode == 2
    assert "epochs=-1 must be at least 1" in single_error_line(result.stderr)


def test_help_lists_every_field_with_type_default_and_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune_llm", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for line in (
        "lr: float = 2e-05",
        "optimizer: one of adamw|adam|sgd|adamw8bit|adamw4bit = 'adamw'",
        "max_steps_per_epoch: int or none = None",
        "peak learning rate",
    ):
        assert line in out


def test_ls_lists_recipes_and_configs(capsys):
    code, out = run_in_process(capsys, "ls")
    assert code == 0
    dummy_row = next(line for line in out.out.splitlines() if line.startswith("dummy"))
    assert "tiny_full" in dummy_row


def test_cp_copies_a_config_and_refuses_to_overwrite(capsys, tmp_path):
    dest = tmp_path / "mine.yaml"
    code, _ = run_in_process(capsys, "cp", "tiny_full", str(dest))
    assert code == 0
    assert yaml.safe_load(dest.read_text())["model"] == "tiny"
    code, out = run_in_process(capsys, "cp", "tiny_full", str(dest))
    assert code == 2 and "already exists" in single_error_line(out.err)


def test_cp_copies_a_recipe_file(capsys, tmp_path):
    code, _ = run_in_process(capsys, "cp", "dummy", str(tmp_path))
    assert code == 0
    assert "class DummyRecipe" in (tmp_path / "dummy.py").read_text()


def test_validate_prints_resolved_params(capsys, config):
    code, out = run_in_process(capsys, "validate", "--config", str(config), "--override", "lr=0.5", "epochs=3")
    assert code == 0
    assert "lr" in out.out and "0.5" in out.out and "config is valid" in out.out


def test_dummy_runs_in_process_and_writes_outputs(capsys, tmp_path, config):
    code, out = run_in_process(capsys, "run", "dummy", "--config", str(config), "max_steps_per_epoch=3")
    assert code == 0
    out_dir = tmp_path / "out"
    losses = [json.loads(line)["loss"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and losses[0] > losses[1] > losses[2]
    assert (out_dir / "step_3" / "model.safetensors").is_file()
    assert yaml.safe_load((out_dir / "params.yaml").read_text())["max_steps_per_epoch"] == 3


def test_user_recipe_by_path(tmp_path, config):
    recipe = tmp_path / "my_recipe.py"
    recipe.write_text(
        "import sys\n"
        "from finetune.cli import TuneArgumentParser\n"
        "from finetune.params import FullFinetuneParams\n"
        "def main(argv):\n"
        "    params = TuneArgumentParser(FullFinetuneParams).parse_args(argv)\n"
        "    print(f'my recipe lr={params.lr}')\n"
        "    return 0\n"
        "if __name__ == '__main__':\n"
        "    sys.exit(main(sys.argv[1:]))\n"
    )
    result = tune(str(recipe), "--config", str(config), "lr=0.25")
    assert result.returncode == 0, result.stderr
    assert "my recipe lr=0.25" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("failing_rank", [0, 1])
def test_an_input_error_on_one_rank_is_one_line_from_torchrun(tmp_path, failing_rank):
    # The other rank is waiting in a collective when the failing one exits: it must stop
    # without a traceback of its own. The file has no __main__ guard: main(argv) runs anyway.
    recipe = tmp_path / "one_rank_fails.py"
    recipe.write_text(
        "import torch\n"
        "from finetune.errors import UserError\n"
        "from finetune.training.distributed import all_reduce_sum, init_distributed\n"
        "def main(argv):\n"
        "    info = init_distributed('cpu')\n"
        "    all_reduce_sum(torch.ones(1))\n"
        "    if info.rank == int(argv[0]):\n"
        "        raise UserError(f'rank {info.rank} cannot read its shard; fix it')\n"
        "    all_reduce_sum(torch.ones(1))\n"
    )
    result = tune("--nproc_per_node", "2", str(recipe), str(failing_rank))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: rank {failing_rank} cannot read its shard; fix it"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "launch", [["--nproc_per_node", "2", "dummy"], ["run", "--nproc_per_node", "2", "dummy"]], ids=["tune", "tune-run"]
)
def test_dummy_with_two_processes(tmp_path, config, launch):
    result = tune(*launch, "--config", str(config), "max_steps_per_epoch=2")
    assert result.returncode == 0, result.stderr
    assert "dummy: rank 0 of 2" in result.stdout and "dummy: rank 1 of 2" in result.stdout
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["ranks"] for r in records] == [2, 2]
    # Loss is exp(-0.1 * step) once shares from both ranks are summed and normalised.
    assert records[0]["loss"] == pytest.approx(0.904837418, rel=1e-6)


def test_validate_names_missing_paths_and_refuses_an_unknown_template(capsys, tmp_path):
    code, out = run_in_process(
        capsys,
        "validate",
        "--config",
        "tiny_full",
        f"dataset={tmp_path / 'gone.jsonl'}",
        "eval_dataset=someone/hub-name",
    )
    assert code == 0 and f"note: dataset={tmp_path / 'gone.jsonl'} does not exist on this machine" in out.out
    assert "eval_dataset" not in "".join(line for line in out.out.splitlines() if line.startswith("note:"))
    code, out = run_in_process(capsys, "validate", "--config", "tiny_full", "template=alpacca")
    assert code == 2 and "did you mean 'alpaca'?" in single_error_line(out.err)


def test_peft_module_names_point_at_ours(capsys):
    code, out = run_in_process(capsys, "validate", "--config", "tiny_lora", "lora_attn_modules=[q_proj,o_proj]")
    assert code == 2 and "PEFT's o_proj is output_proj here" in single_error_line(out.err)


def test_a_yaml_number_for_a_text_field_is_read_as_text(capsys, tmp_path):
    own = tmp_path / "mine.yaml"
    own.write_text("model: tiny\ntokenizer_path: pkg:data/demo/tokenizer.model\noutput_dir: 2024\n")
    code, out = run_in_process(capsys, "validate", "--config", str(own))
    assert code == 0 and re.search(r"output_dir += '2024'\n", out.out)


def test_help_with_torchrun_flags_is_printed_once_without_workers():
    result = tune("--nproc_per_node", "2", "finetune_llm", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("usage:") == 1 and "batch_size" in result.stdout


@pytest.mark.slow
def test_bad_config_with_two_processes_is_one_line(config):
    result = tune("--nproc_per_node", "2", "dummy", "--config", str(config), "lr=-1")
    assert result.returncode == 2
    assert "lr=-1.0 must be positive" in single_error_line(result.stderr)


def test_validate_picks_the_recipe_a_config_is_for(capsys, tmp_path):
    code, out = run_in_process(capsys, "validate", "--config", "tiny_lora")
    assert code == 0 and out.out.startswith("LoraFinetuneParams:") and "config is valid" in out.out
    own = tmp_path / "mine.yaml"
    own.write_text("model: tiny\ntokenizer_path: pkg:data/demo/tokenizer.model\nlora_rank: 4\n")
    code, out = run_in_process(capsys, "validate", "--config", str(own))
    assert code == 0 and re.search(r"lora_rank += 4\n", out.out)


def test_overrides_before_and_after_config_and_a_positional_config(capsys):
    code, out = run_in_process(capsys, "validate", "batch_size=8", "--config", "tiny_full", "shuffle=false")
    assert code == 0 and re.search(r"batch_size += 8\n", out.out) and re.search(r"shuffle += False\n", out.out)
    code, out = run_in_process(capsys, "validate", "tiny_lora", "lora_rank=4")
    assert code == 0 and re.search(r"lora_rank += 4\n", out.out)


@pytest.mark.parametrize(
    ("override", "suggestion"),
    [
        ("optimizer.lr=1e-4", "did you mean 'lr'?"),
        ("checkpointer.output_dir=/x", "did you mean 'output_dir'?"),
        ("learning_rate=1e-4", "did you mean 'lr'?"),
        ("num_train_epochs=3", "did you mean 'epochs'?"),
    ],
)
def test_torchtune_nested_keys_and_transformers_names_suggest_ours(capsys, config, override, suggestion):
    code, out = run_in_process(capsys, "validate", "--config", str(config), override)
    assert code == 2 and suggestion in single_error_line(out.err)


@pytest.mark.parametrize("override", ["column_map={a: 1", "lora_attn_modules=[q_proj, v_proj"])
def test_malformed_list_or_mapping_is_one_error_line(capsys, override):
    code, out = run_in_process(capsys, "validate", "--config", "tiny_lora", override)
    assert code == 2 and "is not valid: expected" in single_error_line(out.err)


def test_configs_are_found_in_the_source_tree_else_where_an_install_put_them(tmp_path):
    from finetune.cli import builtin_config_dir

    source_tree, prefix, user_base = tmp_path / "repo" / "configs", tmp_path / "prefix", tmp_path / "user"
    installed = user_base / "share" / "finetune" / "configs"
    installed.mkdir(parents=True)
    assert builtin_config_dir(source_tree, [prefix, user_base]) == installed
    source_tree.mkdir(parents=True)
    assert builtin_config_dir(source_tree, [prefix, user_base]) == source_tree


@pytest.mark.slow
def test_a_regular_install_ships_every_config(tmp_path):
    """`pip install .` (not editable) has no source tree beside the package: the wheel must carry configs/."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ["setup.cfg", "pyproject.toml", "README.md"]:
        (source / name).write_bytes((REPO / name).read_bytes())
    for name in ["finetune", "configs"]:
        subprocess.run(["cp", "-r", str(REPO / name), str(source / name)], check=True)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "wheel"), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "wheel").glob("finetune-*.whl")
    shipped = {Path(n).name for n in zipfile.ZipFile(wheel).namelist() if "/data/share/finetune/configs/" in n}
    assert shipped == {p.name for p in (REPO / "configs").glob("*.yaml")}
    assert len(shipped) >= 10


@pytest.mark.slow
def test_workers_share_the_cores_without_torchruns_thread_banner(tmp_path):
    from finetune.cli.torchrun import worker_threads

    recipe = tmp_path / "threads.py"
    recipe.write_text(
        "import os\n"
        "import torch\n"
        "def main(argv):\n"
        "    print(f\"rank {os.environ['RANK']} threads {os.environ['OMP_NUM_THREADS']} {torch.get_num_threads()}\")\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    result = subprocess.run(
        [sys.executable, "-m", "finetune.cli", "--nproc_per_node", "2", str(recipe)],
        capture_output=True,
        text=True,
        env={**env, "PYTHONPATH": str(REPO)},
        timeout=240,
    )
    assert result.returncode == 0, result.stderr
    expected = worker_threads(2)
    assert sorted(result.stdout.split("\n")[:2]) == [f"rank {r} threads {expected} {expected}" for r in (0, 1)]
    assert "OMP_NUM_THREADS" not in result.stderr
    # A user's own setting is kept.
    result = subprocess.run(
        [sys.executable, "-m", "finetune.cli", "--nproc_per_node", "2", str(recipe)],
        capture_output=True,
        text=True,
        env={**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "3"},
        timeout=240,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(line.rsplit(" ", 1)[0] for line in result.stdout.split("\n")[:2]) == [
        f"rank {r} threads 3" for r in (0, 1)
    ]
