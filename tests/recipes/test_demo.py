"""What the README promises about the demo: the notebook snippet runs and its output is what
`configs/generation.yaml` reads, and (slow) the README's first command ends with a model that
answers the held-out prompts of every task family."""

import importlib.util
import json
import re
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from finetune.cli import main
from finetune.params import FullFinetuneParams, GenerateParams
from tests.recipes.helpers import REPO, train_losses

README = REPO / "README.md"


def load_benchmark(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def readme_block(section: str, language: str) -> str:
    """The first ```language block under the README heading `section`."""
    text = README.read_text(encoding="utf-8")
    body = text[text.index(f"## {section}\n") :]
    match = re.search(rf"```{language}\n(.*?)```", body, re.S)
    assert match is not None, f"no {language} block under {section}"
    return match.group(1)


def test_the_notebook_snippet_trains_a_model_the_generation_config_reads(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the snippet's relative output_dir lands here
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    snippet = readme_block("In a notebook", "python")
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    params: FullFinetuneParams = namespace["params"]
    output_dir = tmp_path / params.output_dir
    losses = train_losses(output_dir)
    assert len(losses) == params.max_steps_per_epoch and losses[-1] < losses[0] / 2
    # The generation config reads the model as the demo trained it: same template, same tokenizer.
    generation = yaml.safe_load((REPO / "configs" / "generation.yaml").read_text())
    assert (generation["template"], generation["tokenizer_path"]) == (params.template, params.tokenizer_path)
    checkpoint = output_dir / f"step_{params.max_steps_per_epoch}"
    answers = tmp_path / "answers.jsonl"
    code = main(
        [
            "generate",
            "--config",
            "generation",
            f"checkpoint_dir={checkpoint}",
            "max_new_tokens=8",
            f"output_file={answers}",
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert answers.is_file()
    # The demo's own parameters, as the README says, come from its config by name.
    demo = FullFinetuneParams.from_yaml("tiny_full", ["output_dir=output/notebook"])
    assert (demo.template, demo.output_dir, demo.packed) == ("plain", "output/notebook", True)
    assert isinstance(GenerateParams.from_yaml("generation"), GenerateParams)


def test_the_readme_names_the_generation_configs_checkpoint(tmp_path):
    """The demo run's last checkpoint is the one configs/generation.yaml (and the eval configs) read."""
    generation = yaml.safe_load((REPO / "configs" / "generation.yaml").read_text())
    step = Path(generation["checkpoint_dir"]).name
    assert Path(generation["checkpoint_dir"]).parent == Path("output/tiny_full")
    for name in ("eleuther_evaluation", "quantization"):
        config = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
        assert Path(config["checkpoint_dir"]) == Path(generation["checkpoint_dir"]), name
    assert f"trained ({step})" in README.read_text(encoding="utf-8")  # the figures are that checkpoint's


@pytest.mark.slow
def test_the_readmes_first_command_learns_every_task_family(tmp_path, monkeypatch):
    """The README's first command (2 threads, as the README's figures were measured) ends with a
    model that answers at least 75% of the held-out prompts exactly, and half of every family."""
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the run's child process imports this checkout
    benchmark = load_benchmark("demo_accuracy")
    result_file = tmp_path / "figures.json"
    benchmark.main([str(tmp_path / "run"), "--train", "--threads", "2", "--show", "0", "--output", str(result_file)])
    figures = json.loads(result_file.read_text())
    trained, untrained = figures["exact_match"].values()
    assert trained["accuracy"] >= 0.75, trained
    for family, cell in trained["families"].items():
        assert cell["correct"] >= cell["total"] / 2, (family, cell)
    assert untrained["correct"] == 0
    (first_step, first), (last_step, last) = figures["figures"]["eval_loss"]
    assert first_step == 0 and last < first / 10
