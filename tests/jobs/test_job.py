"""`tune job`: the pipeline's flags turned into a recipe and its overrides, bad flags as one line
and exit 2, and whole jobs in process: a tiny LoRA run and the dummy uploaded to a local S3
server (moto), the weights deleted after a verified upload, a dataset fetched from s3://."""

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest

from finetune.cli.registry import config_recipes
from finetune.config.files import CONFIG_DIR
from finetune.jobs import job
from finetune.jobs.job import JobSpec, choose_recipe, parse_job_args, recipe_argv, resolve_job_config
from tests.cli_helpers import error_line, run
from tests.jobs.helpers import assert_uploaded, read_events, remote_tree

REPO = Path(__file__).resolve().parents[2]
DEMO = "pkg:data/demo/train.jsonl"
FAST = [
    "--override",
    "max_steps_per_epoch=2",
    "eval_dataset=none",
    "eval_every_n_steps=none",
    "max_seq_len=32",
    "device=cpu",
]


def plan(*argv: str) -> tuple[str, list[str]]:
    spec = parse_job_args(["--job_id", "j1", "--user_id", "u1", *argv])
    config = resolve_job_config(spec)
    recipe = choose_recipe(spec, config_recipes(config) if config else ())
    return recipe, recipe_argv(spec, recipe, config, spec.dataset_id, Path("/jobs/u1/j1"))


# Flags -> recipe and overrides ---------------------------------------------------------------------


def test_the_pipeline_command_line_maps_to_lora_finetune_with_its_overrides():
    recipe, argv = plan(
        *["--job_config_name", "llm_llama3_1_8b", "--dataset_id", "/data/train.jsonl", "--batch_size", "2"],
        *["--num_epochs", "1", "--use_lora", "true", "--num_gpus", "1", "--lr=3e-4", "--seed", "7", "--shuffle", "no"],
    )
    assert recipe == "lora_finetune"
    assert argv == [
        *["--config", str(CONFIG_DIR / "llama3_1_8b_lora.yaml"), "output_dir=/jobs/u1/j1"],
        *["dataset=/data/train.jsonl", "batch_size=2", "epochs=1", "lr=0.0003", "seed=7", "shuffle=false"],
    ]


@pytest.mark.parametrize(
    "flags,recipe,config,extra",
    [
        (["--job_config_name", "llm_llama3_1_8b"], "full_finetune", "llama3_1_8b_full", []),
        (
            ["--job_config_name", "llm_llama3_1_8b", "--use_qlora"],
            "lora_finetune",
            "llama3_1_8b_qlora",
            ["quantize_base=true"],
        ),
        (["--job_config_name", "tiny_lora"], "lora_finetune", "tiny_lora", []),  # the config's recipe line
        (["--job_config_name=tiny_full", "--use_lora", "0"], "full_finetune", "tiny_full", []),
        (["--job_config_name", "tiny_full", "--num_gpus", "0"], "full_finetune", "tiny_full", ["device=cpu"]),
        (["--job_config_name", "tiny_dpo"], "dpo", "tiny_dpo", []),  # the config's own use_lora
        (["--job_config_name", "tiny_dpo", "--use_lora"], "dpo", "tiny_dpo", ["use_lora=true"]),
        (["--job_config_name", "tiny_dpo", "--use_lora", "no"], "dpo", "tiny_dpo", ["use_lora=false"]),
        (
            ["--job_config_name", "tiny_dpo", "--use_qlora"],
            "dpo",
            "tiny_dpo",
            ["use_lora=true", "quantize_base=true"],
        ),
    ],
)
def test_config_names_and_lora_flags_pick_the_recipe(flags, recipe, config, extra):
    got_recipe, argv = plan(*flags)
    assert got_recipe == recipe
    assert argv == ["--config", str(CONFIG_DIR / f"{config}.yaml"), "output_dir=/jobs/u1/j1", *extra]


def test_a_yaml_path_the_dummy_and_overrides_pass_through(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("model: tiny\n")
    recipe, argv = plan("--job_config_name", str(path), "--override", "lr=1e-3", "log_every_n_steps=2")
    assert recipe == "full_finetune" and argv == [
        "--config",
        str(path),
        "output_dir=/jobs/u1/j1",
        "lr=1e-3",
        "log_every_n_steps=2",
    ]
    recipe, argv = plan("--job_config_name", "dummy", "--dataset_id", "/d", "--batch_size", "3", "--shuffle", "yes")
    assert recipe == "dummy" and argv == ["output_dir=/jobs/u1/j1", "batch_size=3"]


def test_ids_are_generated_when_absent(monkeypatch):
    monkeypatch.setenv("USER", "alice")
    first, second = (parse_job_args(["--job_config_name", "tiny_full"]) for _ in range(2))
    assert re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{6}", first.job_id) and first.job_id != second.job_id
    assert first.user_id == "alice"
    monkeypatch.delenv("USER")
    assert parse_job_args(["--job_config_name", "tiny_full"]).user_id == "anonymous"


def test_output_dir_and_results_location(monkeypatch, tmp_path):
    spec = JobSpec("tiny_full", job_id="j", user_id="u", results_url="s3://b/results/")
    monkeypatch.setenv("FINETUNE_JOBS_DIR", str(tmp_path))
    assert spec.output_dir() == tmp_path / "u" / "j"
    monkeypatch.delenv("FINETUNE_JOBS_DIR")
    assert spec.output_dir() == Path("jobs/u/j")
    assert spec.results_location() == "s3://b/results/u/j"


BAD_FLAGS = [
    (["--job_config_name", "tiny_full", "--batch_sise", "2"], "unknown flag --batch_sise; did you mean --batch_size?"),
    (["--job_config_name", "tiny_full", "--use_lora", "maybe"], "--use_lora: expected true/false/yes/no/1/0"),
    (["--job_config_name", "tiny_full", "--num_gpus", "two"], "--num_gpus: expected an integer, got 'two'"),
    (["--job_config_name", "tiny_full", "--batch_size=0"], "--batch_size: must be at least 1"),
    (["--job_config_name", "tiny_full", "--override", "lr"], "'lr' is not KEY=VALUE"),
    (["--job_config_name", "tiny_full", "stray"], "unrecognized arguments: stray"),
    (["--dataset_id", "x"], "required: --job_config_name"),
    (["--job_config_name", "llm_mistral_7b"], "no config mistral_7b_full"),
    (["--job_config_name", "tiny_ful"], "did you mean 'tiny_full'?"),
    (["--job_config_name", "tiny_lora", "--use_lora", "false"], "is a lora_finetune config"),
    (["--job_config_name", "tiny_full", "--job_id", "a/b"], "--job_id 'a/b' must be a non-empty name"),
    (["--job_config_name", "tiny_full", "--override", "bogus=1"], "unknown key 'bogus' on the command line"),
]


def test_help_lists_every_flag(capsys):
    code, out, _ = run(capsys, "job", "--help")
    assert code == 0
    for flag in ("--job_config_name", "--dataset_id", "--num_gpus", "--results_url", "--delete_weights_after_upload"):
        assert flag in out


@pytest.mark.parametrize("argv,expected", BAD_FLAGS)
def test_bad_flags_are_one_line_and_exit_2(capsys, argv, expected):
    code, out, err = run(capsys, "job", *argv)
    assert code == 2 and not out
    assert expected in error_line(err) and len(err.strip().splitlines()) == 1


# Whole jobs ----------------------------------------------------------------------------------------


@pytest.fixture
def jobs_env(monkeypatch, tmp_path, s3_endpoint, aws_env):
    """Jobs under tmp_path, the input cache there too, and s3:// reaching the local server."""
    monkeypatch.setenv("FINETUNE_JOBS_DIR", str(tmp_path / "jobs"))
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.delenv("FINETUNE_JOB_ID", raising=False)
    return tmp_path / "jobs"


def test_a_tiny_lora_job_trains_uploads_and_deletes_its_weights(capsys, jobs_env, s3_options, bucket):
    results = f"s3://{bucket}/results"
    code, out, err = run(
        capsys,
        *["job", "--job_config_name", "tiny_lora", "--dataset_id", DEMO, "--batch_size", "4", "--num_epochs", "1"],
        *["--job_id", "lora1", "--user_id", "bob", "--results_url", results, "--delete_weights_after_upload", "true"],
        *FAST,
    )
    output_dir = jobs_env / "bob" / "lora1"
    url = f"{results}/bob/lora1"
    assert code == 0, err
    assert out.strip().splitlines()[-1] == f"job lora1: done; results in {output_dir} and {url}"
    weights = [p for p in output_dir.glob("step_*/**/*") if p.suffix in (".safetensors", ".pt")]
    assert not weights  # deleted locally ...
    remote = remote_tree(s3_options, url)
    assert any(k.endswith("adapter_model.safetensors") for k in remote)  # ... kept remotely
    records = read_events(output_dir)
    assert [r["kind"] for r in records[-2:]] == ["upload", "job_end"] and records[-2]["url"] == url
    assert records[0]["job_id"] == "lora1"
    # events.jsonl went up again after its job_end; the manifest still lists the deleted weights
    events_bytes = (output_dir / "events.jsonl").read_bytes()
    assert remote["events.jsonl"] == events_bytes
    listed = {e["path"]: e for e in json.loads(remote["_manifest.json"])["files"]}
    assert listed["events.jsonl"]["sha256"] == hashlib.sha256(events_bytes).hexdigest()
    assert {k for k in remote if k.endswith(".safetensors")} <= listed.keys()
    assert json.loads((output_dir / "_manifest.json").read_bytes()) == json.loads(remote["_manifest.json"])
    assert json.loads((output_dir / "status.json").read_text())["state"] == "done"


def test_a_dpo_lora_job_trains_from_preference_pairs_and_uploads_its_adapter(capsys, jobs_env, s3_options, bucket):
    results = f"s3://{bucket}/results"
    pairs = "pkg:data/demo/preference_train.jsonl"
    code, out, err = run(
        capsys,
        *["job", "--job_config_name", "tiny_dpo", "--dataset_id", pairs, "--batch_size", "4", "--num_epochs", "1"],
        *["--use_lora", "--lr", "1e-3", "--job_id", "dpo1", "--user_id", "bob", "--results_url", results],
        *["--override", "model=tiny", "checkpoint_dir=none", "tokenizer_path=pkg:data/demo/tokenizer.model"],
        *["max_steps_per_epoch=3", "eval_dataset=none", "eval_every_n_steps=none"],
    )
    output_dir = jobs_env / "bob" / "dpo1"
    assert code == 0, err
    assert out.strip().splitlines()[-1] == f"job dpo1: done; results in {output_dir} and {results}/bob/dpo1"
    steps = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in steps if "reward_accuracy" in m] == [1, 2, 3]  # DPO's metrics, not SFT's
    remote = remote_tree(s3_options, f"{results}/bob/dpo1")
    assert "step_3/adapter_model.safetensors" in remote and "step_3/adapter_config.json" in remote
    assert [r["kind"] for r in read_events(output_dir)[-2:]] == ["upload", "job_end"]


def test_the_dummy_job_uploads_byte_for_byte(capsys, jobs_env, s3_options, bucket):
    results = f"s3://{bucket}/out"
    code, out, err = run(
        capsys, "job", "--job_config_name", "dummy", "--job_id", "d1", "--user_id", "u", "--results_url", results
    )
    assert code == 0, err
    output_dir = jobs_env / "u" / "d1"
    assert_uploaded(s3_options, output_dir, f"{results}/u/d1")
    assert list(output_dir.glob("step_*/*.safetensors"))  # kept without --delete_weights_after_upload


def test_a_dataset_url_is_fetched_and_trained_on(capsys, jobs_env, s3_options, bucket, tmp_path):
    fs = fsspec.filesystem("s3", **s3_options)
    lines = [json.dumps({"instruction": f"add {i} and 1", "output": str(i + 1)}) for i in range(40)]
    fs.pipe_file(f"{bucket}/data/train.jsonl", ("\n".join(lines) + "\n").encode())
    code, out, err = run(
        capsys,
        *["job", "--job_config_name", "tiny_full", "--dataset_id", f"s3://{bucket}/data/train.jsonl"],
        *["--job_id", "f1", "--user_id", "u", "--batch_size", "4"],
        *FAST,
    )
    assert code == 0, err
    cached = tmp_path / "cache" / "s3" / bucket / "data" / "train.jsonl"
    assert cached.read_bytes() == fs.cat_file(f"{bucket}/data/train.jsonl")
    params = next(r for r in read_events(jobs_env / "u" / "f1") if r["kind"] == "config")["params"]
    assert params["dataset"] == str(cached)
    assert out.strip().splitlines()[-1] == f"job f1: done; results in {jobs_env / 'u' / 'f1'}"


def test_a_failed_upload_keeps_the_results_and_exits_3(capsys, jobs_env, s3_options):
    code, out, err = run(
        capsys,
        "job",
        "--job_config_name",
        "dummy",
        "--job_id",
        "x",
        "--user_id",
        "u",
        "--results_url",
        "s3://no-such-bucket-here",
    )
    assert code == job.EXIT_NOT_UPLOADED == 3
    assert "upload of" in error_line(err) and "the results are kept in" in error_line(err)
    output_dir = jobs_env / "u" / "x"
    assert out.strip().splitlines()[-1] == f"job x: done, not uploaded; results in {output_dir}"
    assert list(output_dir.glob("step_*/*.safetensors"))
    records = read_events(output_dir)
    assert [r["kind"] for r in records[-2:]] == ["error", "job_end"] and "upload of" in records[-2]["message"]
    assert records[-1] == {**records[-1], "state": "done", "exit_status": 3, "uploaded_to": None}


def test_the_same_command_again_finishes_a_job_and_other_flags_are_refused(capsys, jobs_env, s3_options):
    fs = fsspec.filesystem("s3", **s3_options)
    bucket = "later-bucket"
    argv = [
        "job",
        "--job_config_name",
        "dummy",
        "--job_id",
        "again",
        "--user_id",
        "u",
        "--results_url",
        f"s3://{bucket}",
    ]
    assert run(capsys, *argv)[0] == job.EXIT_NOT_UPLOADED  # no bucket yet: trained, not uploaded
    fs.mkdir(bucket)
    code, out, err = run(capsys, *argv)  # the same command: the upload only, no second run
    output_dir = jobs_env / "u" / "again"
    assert code == 0, err
    assert "job again: already trained" in out and "resuming" not in out
    assert_uploaded(s3_options, output_dir, f"s3://{bucket}/u/again")
    assert [r["kind"] for r in read_events(output_dir)].count("job_start") == 1
    code, out, err = run(capsys, *argv, "--batch_size", "3")
    assert code == 2 and "was started with batch_size None; repeat its flags" in error_line(err)


@pytest.mark.slow
def test_num_gpus_above_one_runs_under_torchrun(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "FINETUNE_JOBS_DIR": str(tmp_path)}
    env.pop("FINETUNE_JOB_ID", None)
    argv = ["job", "--job_config_name", "dummy", "--num_gpus", "2", "--job_id", "t2", "--user_id", "u"]
    done = subprocess.run(
        [sys.executable, "-m", "finetune.cli", *argv], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == f"job t2: done; results in {tmp_path / 'u' / 't2'}"
    records = read_events(tmp_path / "u" / "t2")
    assert records[0]["job_id"] == "t2" and records[-1] == {**records[-1], "kind": "job_end", "state": "done"}
