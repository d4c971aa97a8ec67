"""The recipe registry comes from the files: recipe modules in finetune/recipes/ and each config's
`# recipe:` line. Adding a recipe or a config is adding the file."""

import dataclasses
from pathlib import Path

from finetune.cli.registry import (
    LISTED_FIRST,
    RecipeEntry,
    available_recipes,
    config_recipes,
    configs_for,
    discover_recipes,
    find_recipe,
)
from finetune.config import CONFIG_DIR, read_config


def test_a_recipe_is_a_module_with_main_and_params_class(tmp_path):
    (tmp_path / "__init__.py").write_text("")
    (tmp_path / "ppo.py").write_text(
        "ALIASES = ('ppo_single_device',)\nPARAMS_CLASS = object\ndef main(argv): return 0\n"
    )
    (tmp_path / "helpers.py").write_text("def main(argv): return 0\n")  # no PARAMS_CLASS: a helper, not a recipe
    (tmp_path / "dummy.py").write_text("PARAMS_CLASS = object\nmain = print\n")
    (tmp_path / "_private.py").write_text("PARAMS_CLASS = object\nmain = print\n")
    (tmp_path / "broken.py").write_text("def main(argv)\n")  # listed, so running it shows the SyntaxError
    found = discover_recipes(tmp_path, "mypkg")
    assert [(e.name, e.module, e.aliases) for e in found] == [
        ("dummy", "mypkg.dummy", ()),  # the recipes listed first come first, in their order
        ("broken", "mypkg.broken", ()),
        ("ppo", "mypkg.ppo", ("ppo_single_device",)),
    ]


def test_the_shipped_recipes_and_their_seed_names():
    names = [entry.name for entry in available_recipes()]
    assert names == list(LISTED_FIRST)
    for alias in ("finetune_llm", "full_finetune_single_device", "full_finetune_distributed"):
        assert find_recipe(alias).name == "full_finetune"
    assert find_recipe("lora_finetune_distributed").name == "lora_finetune"
    assert find_recipe("alpaca_generate").name == "generate"
    assert find_recipe("quantize").module == "finetune.recipes.quantize"


def test_every_shipped_config_names_a_recipe_whose_params_read_it():
    """A config without a `# recipe:` line would be listed nowhere; one naming the wrong recipe would not parse."""
    configs = sorted(CONFIG_DIR.glob("*.yaml"))
    assert len(configs) >= 10
    for path in configs:
        recipes = config_recipes(path)
        assert recipes, f"{path} has no '# recipe: <name>' first line"
        for name in recipes:
            params_cls = find_recipe(name).params_class()
            read = {f.name for f in dataclasses.fields(params_cls)}
            ignored = params_cls.ignored_keys() if hasattr(params_cls, "ignored_keys") else set()  # the dummy's
            unknown = set(read_config(path)) - read - ignored
            assert not unknown, (path, name, unknown)


def test_configs_are_listed_by_name(tmp_path):
    (tmp_path / "b.yaml").write_text("# recipe: demo\nlr: 1\n")
    (tmp_path / "a.yaml").write_text("# A config of demo and other.\n# recipe: other, demo\nlr: 1\n")
    (tmp_path / "c.yaml").write_text("# recipe: other\n")
    (tmp_path / "d.yaml").write_text("lr: 1\n# recipe: demo\n")  # not in the opening comments: no recipe
    (tmp_path / "e.yaml").write_text("# recipe: demo_alias\n")
    entry = RecipeEntry("demo", "pkg.demo", Path("demo.py"), ("demo_alias",))
    assert configs_for(entry, tmp_path) == ["a", "b", "e"]
    assert config_recipes(tmp_path / "a.yaml") == ("other", "demo")
    assert config_recipes(tmp_path / "d.yaml") == ()
    assert config_recipes(tmp_path / "missing.yaml") == ()
