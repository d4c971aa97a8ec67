"""`tune eleuther_eval` end to end on local task YAMLs, and its errors."""

import json
import logging
import logging.handlers
import shutil
import sys

import pytest

from finetune.checkpointing.quantized import save_quantized_checkpoint
from finetune.evaluation.harness import HarnessModel
from finetune.params import resolve_path
from finetune.quantization import quantize_model

pytest.importorskip("lm_eval")  # the eval extra; CI installs it
from lm_eval.api.instance import Instance  # noqa: E402

from tests.cli_helpers import error_line, run  # noqa: E402
from tests.eval.conftest import TOKENIZER, random_model  # noqa: E402

QUESTIONS = [
    "Add the two numbers.\n1 and 2\n",
    "Count from 3 to 5.\n",
    "Sort the words.\ncat dog\n",
    "Reverse the words.\nsun moon\n",
    "Which is larger?\n4 or 9\n",
    "Convert hours to minutes.\n2 h\n",
]
CHOICES = ["cat", "dog", "fish"]


def write_tasks(folder, model, tokenizer) -> None:
    """Two tasks over local files whose scores are known in advance: references equal to the
    model's own greedy answer for even documents (exact match 0.5), and correct choices that are
    the most likely one for even documents and the least likely for odd ones (accuracy 0.5)."""
    lm = HarnessModel(model, tokenizer)
    kwargs = {"until": ["\n"], "max_gen_toks": 8, "do_sample": False}
    answers = lm.generate_until([Instance("generate_until", {}, (q, kwargs), 0) for q in QUESTIONS])
    gen = [
        {"question": q, "answer": a if i % 2 == 0 else a + " no"} for i, (q, a) in enumerate(zip(QUESTIONS, answers))
    ]
    mc = []
    for i, q in enumerate(QUESTIONS):
        scores = [lp for lp, _ in lm.loglikelihood([Instance("loglikelihood", {}, (q, " " + c), 0) for c in CHOICES])]
        best = max(range(3), key=scores.__getitem__)
        mc.append({"question": q, "label": best if i % 2 == 0 else min(range(3), key=scores.__getitem__)})
        assert len(set(scores)) == 3
    folder.mkdir()
    for name, records in (("gen", gen), ("mc", mc)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "local_gen.yaml").write_text(f"""
task: local_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / "gen.jsonl"}
output_type: generate_until
test_split: test
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""")
    (folder / "local_mc.yaml").write_text(f"""
task: local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / "mc.jsonl"}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{question}}}}"
doc_to_choice: {json.dumps(CHOICES)}
doc_to_target: label
metric_list:
  - metric: acc
metadata:
  version: 1.0
""")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, model, tokenizer):
    folder = tmp_path_factory.mktemp("tasks") / "tasks"
    write_tasks(folder, model, tokenizer)
    return folder


def eval_args(checkpoint_dir, task_dir, output, *extra: str) -> list[str]:
    return [
        "eleuther_eval",
        f"checkpoint_dir={checkpoint_dir}",
        f"include_path={task_dir}",
        f"output_path={output}",
        "device=cpu",
        "batch_size=4",
        *extra,
    ]


def test_local_tasks_run_end_to_end_with_known_scores(capsys, checkpoint_dir, task_dir, tmp_path):
    output = tmp_path / "results" / "eval.json"
    code, stdout, err = run(capsys, *eval_args(checkpoint_dir, task_dir, output, "tasks=[local_gen,local_mc]"))
    assert code == 0, err
    results = json.loads(output.read_text())
    assert results["results"]["local_gen"]["exact_match,none"] == pytest.approx(0.5)
    assert results["results"]["local_mc"]["acc,none"] == pytest.approx(0.5)
    assert results["n-samples"]["local_gen"]["effective"] == len(QUESTIONS)
    # The harness's own table is printed.
    assert "|local_gen|" in stdout.replace(" ", "") and "exact_match" in stdout and "acc" in stdout


def test_output_path_is_a_json_file_or_a_folder_and_never_another_file(capsys, checkpoint_dir, task_dir, tmp_path):
    folder = tmp_path / "runs"
    code, _, err = run(capsys, *eval_args(checkpoint_dir, task_dir, f"{folder}/", "tasks=local_mc", "limit=2"))
    assert code == 0, err
    assert json.loads((folder / "results.json").read_text())["n-samples"]["local_mc"]["effective"] == 2
    weights = checkpoint_dir / "model.safetensors"
    before = weights.read_bytes()
    code, _, err = run(capsys, *eval_args(checkpoint_dir, task_dir, weights, "tasks=local_mc", "limit=2"))
    assert code == 2
    assert error_line(err) == (
        f"error: output_path {weights} must be a .json file or a folder (end it with /); choose such a path"
    )
    assert weights.read_bytes() == before


def test_limit_and_few_shot_reach_the_harness(capsys, checkpoint_dir, task_dir, tmp_path):
    output = tmp_path / "eval.json"
    code, _, err = run(
        capsys, *eval_args(checkpoint_dir, task_dir, output, "tasks=local_mc", "limit=4", "num_fewshot=1")
    )
    assert code == 0, err
    results = json.loads(output.read_text())
    assert results["n-samples"]["local_mc"]["effective"] == 4
    assert results["n-shot"]["local_mc"] == 1


def test_a_quantized_checkpoint_is_scored(capsys, task_dir, tmp_path):
    quantized = random_model()
    quantize_model(quantized, "int8_weight_only", group_size=32)
    directory = save_quantized_checkpoint(
        quantized, tmp_path / "q", {"scheme": "int8_weight_only", "group_size": None}, tokenizer_files=[TOKENIZER]
    )
    output = tmp_path / "eval.json"
    code, _, err = run(capsys, *eval_args(directory, task_dir, output, "tasks=local_mc"))
    assert code == 0, err
    assert "quantized checkpoint: int8_weight_only" in err
    # int8 weights move log-likelihoods by far less than the gaps between these choices.
    assert json.loads(output.read_text())["results"]["local_mc"]["acc,none"] == pytest.approx(0.5)


def test_the_demo_task_config_runs(capsys, checkpoint_dir, tmp_path):
    output = tmp_path / "demo.json"
    task_log = logging.getLogger("lm_eval.api.task")
    seen = logging.handlers.BufferingHandler(capacity=1000)
    task_log.addHandler(seen)
    code, stdout, err = run(
        capsys,
        "eleuther_eval",
        "--config",
        "eleuther_evaluation",
        f"checkpoint_dir={checkpoint_dir}",
        "limit=8",
        f"output_path={output}",
    )
    assert code == 0, err
    results = json.loads(output.read_text())
    assert results["n-samples"]["demo_exact_match"]["effective"] == 8
    assert 0 <= results["results"]["demo_exact_match"]["exact_match,none"] <= 1
    assert "demo_exact_match" in stdout
    # lm-eval's advice to pass its own `--metadata` flag, which tune has not, is not shown.
    task_log.removeHandler(seen)
    assert not [r for r in seen.buffer if "--metadata" in r.getMessage()]
    assert "--metadata" not in err


def test_a_copy_of_the_demo_task_folder_runs_from_anywhere(capsys, checkpoint_dir, tmp_path):
    """Users copy the demo task to adapt it: the copy still finds the demo's held-out records, and a
    heldout.jsonl put beside it is read instead."""
    copy = tmp_path / "my_tasks"
    shutil.copytree(resolve_path("pkg:data/demo/eval_task"), copy)
    output = tmp_path / "copy.json"
    argv = ["eleuther_eval", "--config", "eleuther_evaluation", f"checkpoint_dir={checkpoint_dir}", "limit=8"]
    code, _, err = run(capsys, *argv, f"include_path={copy}", f"output_path={output}")
    assert code == 0, err
    assert json.loads(output.read_text())["n-samples"]["demo_exact_match"]["effective"] == 8
    heldout = resolve_path("pkg:data/demo/heldout.jsonl").read_text().splitlines()
    (copy / "heldout.jsonl").write_text("\n".join(heldout[:3]) + "\n")
    code, _, err = run(capsys, *argv, f"include_path={copy}", f"output_path={output}")
    assert code == 0, err
    assert json.loads(output.read_text())["n-samples"]["demo_exact_match"]["effective"] == 3


def test_missing_lm_eval_names_the_install_command(capsys, monkeypatch, checkpoint_dir, task_dir, tmp_path):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    code, _, err = run(capsys, *eval_args(checkpoint_dir, task_dir, tmp_path / "x.json", "tasks=local_mc"))
    assert code == 2
    assert 'pip install "finetune[eval]"' in error_line(err)


def test_missing_include_path_is_one_error_line(capsys, checkpoint_dir, tmp_path):
    code, _, err = run(capsys, *eval_args(checkpoint_dir, tmp_path / "nowhere", tmp_path / "x.json", "tasks=local_mc"))
    assert code == 2
    assert "include_path" in error_line(err)


def test_empty_task_list_is_one_error_line(capsys, checkpoint_dir, task_dir, tmp_path):
    code, _, err = run(capsys, *eval_args(checkpoint_dir, task_dir, tmp_path / "x.json"))
    assert code == 2
    assert "tasks is empty" in error_line(err)


@pytest.mark.slow  # indexing the harness's ~15k built-in tasks takes 10-30 s
def test_unknown_task_lists_close_names(capsys, checkpoint_dir, task_dir, tmp_path):
    code, _, err = run(capsys, *eval_args(checkpoint_dir, task_dir, tmp_path / "x.json", "tasks=[local_mcq,hellaswag]"))
    assert code == 2
    line = error_line(err)
    assert "task 'local_mcq' is not an lm-eval task" in line and "local_mc" in line
    assert not (tmp_path / "x.json").exists()
