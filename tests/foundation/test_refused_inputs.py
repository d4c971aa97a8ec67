"""Inputs that cannot be honoured as written are one `error:` line with exit status 2, never a run
that goes on with something else: an output_dir among the files a run reads, a slice beyond its
data, a sequence length beyond the model's positions, a YAML key given twice, a setting written
as an argparse flag, a resume_from_checkpoint that names no checkpoint of output_dir."""

import json
from pathlib import Path

import pytest

from finetune.data.sources import load_records
from finetune.errors import UserError
from finetune.params import FullFinetuneParams
from tests.cli_helpers import error_line, run

TINY = {"model": "tiny", "tokenizer_path": "pkg:data/demo/tokenizer.model", "device": "cpu", "dtype": "fp32"}


def refusal(**values) -> str:
    with pytest.raises(UserError) as info:
        FullFinetuneParams(**{**TINY, **values})
    return str(info.value)


def test_output_dir_equal_to_or_inside_a_folder_the_run_reads_is_refused(tmp_path):
    model = tmp_path / "llama"
    model.mkdir()
    for out in (model, model / "run1"):
        where = "is" if out == model else "is inside"
        assert refusal(checkpoint_dir=str(model), output_dir=str(out)) == (
            f"output_dir {out} {where} the folder checkpoint_dir={model}: the run would write its checkpoints "
            "and logs among those files; choose an output_dir outside it"
        )
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    assert "is inside the folder dataset=" in refusal(dataset=str(data), output_dir=str(data / "out"))
    assert "is the folder of dataset=" in refusal(dataset=str(data / "train.jsonl"), output_dir=str(data))
    assert "is the folder of tokenizer_path=pkg:" in refusal(output_dir="pkg:data/demo")
    # Beside the sources, or a parent of them, is fine.
    FullFinetuneParams(**TINY, checkpoint_dir=str(model), output_dir=str(tmp_path / "out"))
    FullFinetuneParams(**TINY, dataset=str(data / "train.jsonl"), output_dir=str(data / "out"))


@pytest.mark.parametrize(
    "split,message",
    [
        (
            "train[:200%]",
            "split 'train[:200%]' asks for 200% of the records; a slice's percentages run from 0% to 100%",
        ),
        ("train[-150%:]", "asks for -150% of the records"),
        ("train[:100]", "split 'train[:100]' reaches record 100 of {path}, which has 10 records; use a count up to 10"),
        ("train[-11:]", "reaches record -11 of {path}, which has 10 records"),
    ],
)
def test_a_split_beyond_the_data_is_refused(tmp_path, split, message):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"instruction": str(i), "output": str(i)}) + "\n" for i in range(10)))
    with pytest.raises(UserError) as info:
        load_records(str(path), split=split)
    assert message.format(path=path) in str(info.value)
    assert len(load_records(str(path), split="train[:100%]")) == 10
    assert len(load_records(str(path), split="train[-10:]")) == 10


def test_max_seq_len_beyond_the_models_positions_names_both(capsys, tmp_path):
    code, _, err = run(capsys, "finetune_llm", *[f"{k}={v}" for k, v in TINY.items()],
                       "max_seq_len=100000000", f"output_dir={tmp_path / 'out'}")  # fmt: skip
    assert code == 2
    assert error_line(err) == (
        "error: max_seq_len=100000000 exceeds the 512 positions model tiny was built for (max_position_embeddings); "
        "set max_seq_len=512 or less"
    )


def test_a_yaml_key_given_twice_names_the_file_and_lines(capsys, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("model: tiny\nlr: 0.001\nbatch_size: 2\nlr: 0.01\n")
    code, _, err = run(capsys, "validate", "--config", str(config), "--recipe", "full_finetune")
    assert code == 2
    assert error_line(err) == f"error: {config}, line 4: key 'lr' is given twice (lines 2 and 4); keep one of them"
    config.write_text("column_map:\n  output: answer\n  output: reply\n")
    code, _, err = run(capsys, "validate", "--config", str(config), "--recipe", "full_finetune")
    assert error_line(err) == f"error: {config}, line 3: key 'output' is given twice (lines 2 and 3); keep one of them"


@pytest.mark.parametrize(
    "argv,line",
    [
        (
            ["--lr=0.001"],
            "error: '--lr=0.001': settings are written without dashes, as lr=0.001 (or --override lr=0.001)",
        ),
        (["--lr", "0.001"], "error: '--lr 0.001': settings are written without dashes, as lr=0.001"),
        (["--batch-size=8"], "error: '--batch-size=8': settings are written without dashes, as batch_size=8"),
        (
            ["--learning_rate=3"],
            "error: unknown key 'learning_rate' on the command line ('--learning_rate=3'; settings",
        ),
        (["--nproc_per_node", "2"], "error: '--nproc_per_node' is a flag of the launcher: put it before the recipe"),
    ],
)
def test_a_setting_written_as_a_flag_says_how_it_is_written(capsys, tmp_path, argv, line):
    code, _, err = run(capsys, "full_finetune", "--config", "tiny_full", *argv, f"output_dir={tmp_path / 'out'}")
    assert code == 2
    assert error_line(err).startswith(line)
    assert "output_dir" not in error_line(err) and "usage:" not in err
    assert not (tmp_path / "out").exists()


def test_a_setting_written_as_a_flag_before_the_recipe_says_where_it_goes(capsys):
    code, _, err = run(capsys, "--lr=0.001", "full_finetune", "--config", "tiny_full")
    assert code == 2
    assert "a recipe setting goes after the recipe name, without dashes (lr=0.001)" in error_line(err)


def test_resume_from_checkpoint_takes_true_false_or_a_step_of_output_dir(tmp_path):
    assert FullFinetuneParams(**TINY, resume_from_checkpoint="step_40").resume_from_checkpoint == "step_40"
    out = tmp_path / "out"
    made = FullFinetuneParams(**TINY, output_dir=str(out), resume_from_checkpoint=str(out / "step_40"))
    assert made.resume_from_checkpoint == "step_40"
    assert "write true (the newest checkpoint in output_dir), false, or step_<N>" in refusal(
        resume_from_checkpoint="latest"
    )
    assert "is not in output_dir" in refusal(output_dir=str(out), resume_from_checkpoint=str(tmp_path / "step_4"))


def test_resume_from_checkpoint_is_read_from_the_command_line_and_yaml(tmp_path):
    from finetune.config import TuneArgumentParser

    argv = [f"{k}={v}" for k, v in TINY.items()]
    parser = TuneArgumentParser(FullFinetuneParams)
    assert parser.parse_args([*argv, "resume_from_checkpoint=true"]).resume_from_checkpoint is True
    assert parser.parse_args([*argv, "resume_from_checkpoint=False"]).resume_from_checkpoint is False
    assert parser.parse_args([*argv, "resume_from_checkpoint=step_7"]).resume_from_checkpoint == "step_7"
    config = Path(tmp_path / "c.yaml")
    config.write_text("resume_from_checkpoint: step_3\n")
    assert parser.parse_args(["--config", str(config), *argv]).resume_from_checkpoint == "step_3"
