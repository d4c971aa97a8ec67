"""The recipe registry, derived from the files: recipe modules in finetune/recipes/ and configs/*.yaml.

A recipe is a module `finetune/recipes/<name>.py` that defines `main` and `PARAMS_CLASS` (and, if it
wants more names, `ALIASES = ("other_name", ...)`). A shipped config says which recipe(s) it is for
in its first line, `# recipe: <name>[, <name>]`, and is listed under them by name. Adding either is
adding the file; no list to edit.

Recipe modules are read with `ast`, not imported, to list them: importing one loads torch and the
rest of the library, which would make `tune ls` and `tune --help` take seconds.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Optional

from finetune.config.files import CONFIG_DIR
from finetune.errors import UserError

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
RECIPES_PACKAGE = "finetune.recipes"

# `tune ls` lists these first, in the order a newcomer meets them (train, try, shrink, score, test
# the launcher); any other recipe follows by name. Only the order: a recipe needs no line here.
LISTED_FIRST = ("full_finetune", "lora_finetune", "dpo", "generate", "quantize", "eleuther_eval", "dummy")

# `# recipe: full_finetune, dummy`: the recipes a config is for.
_RECIPE_LINE = re.compile(r"#\s*recipe:\s*(?P<names>[\w, ]+?)\s*")


@dataclass(frozen=True)
class RecipeEntry:
    name: str
    module: str  # importable name, e.g. finetune.recipes.full_finetune
    path: Path
    aliases: tuple[str, ...]

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)

    def params_class(self) -> Optional[type]:
        """The Params dataclass the recipe reads (importing the recipe module)."""
        return getattr(self.load(), "PARAMS_CLASS", None)


def module_constants(path: Path) -> tuple[set[str], tuple[str, ...]]:
    """(the names a module defines at its top level, its ALIASES), read without importing it."""
    defined: set[str] = set()
    aliases: tuple[str, ...] = ()
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    except SyntaxError:
        # Still a recipe by its name, so `tune <name>` imports it and shows where the file is broken.
        return {"main", "PARAMS_CLASS"}, ()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        targets = (
            node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        )
        for target in targets:
            if isinstance(target, ast.Name):
                defined.add(target.id)
                if target.id == "ALIASES" and node.value is not None:
                    aliases = tuple(ast.literal_eval(node.value))
    return defined, aliases


def discover_recipes(directory: Path = RECIPES_DIR, package: str = RECIPES_PACKAGE) -> list[RecipeEntry]:
    """Every recipe module in `directory`: those in LISTED_FIRST in that order, then the rest by name."""
    found = {}
    for path in sorted(directory.glob("*.py")):
        defined, aliases = module_constants(path)
        if path.stem.startswith("_") or not {"main", "PARAMS_CLASS"} <= defined:
            continue
        found[path.stem] = RecipeEntry(path.stem, f"{package}.{path.stem}", path, aliases)
    first = [found.pop(name) for name in LISTED_FIRST if name in found]
    return [*first, *found.values()]


@lru_cache(maxsize=1)
def available_recipes() -> tuple[RecipeEntry, ...]:
    """The registry of this installation (read once per process)."""
    return tuple(discover_recipes())


def find_recipe(name: str) -> RecipeEntry:
    recipes = available_recipes()
    for entry in recipes:
        if name == entry.name or name in entry.aliases:
            return entry
    known = [n for e in recipes for n in (e.name, *e.aliases)]
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise UserError(f"unknown recipe '{name}'; {hint}recipes: {', '.join(known)} (or a path to a .py file)")


def load_recipe_module(name_or_path: str) -> ModuleType:
    """Import a registered recipe, or a user's own recipe file given by path."""
    if name_or_path.endswith(".py"):
        path = Path(name_or_path)
        if not path.is_file():
            raise UserError(f"recipe file {path} does not exist; check the path")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if not hasattr(module, "main"):
            raise UserError(f"recipe file {path} has no main(argv) function; add one")
        return module
    return find_recipe(name_or_path).load()


def config_recipes(path: Path) -> tuple[str, ...]:
    """The recipes named by the `# recipe:` line among a config's opening comment lines (none: no recipe's)."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.startswith("#"):
                    break
                match = _RECIPE_LINE.fullmatch(line.rstrip("\n"))
                if match:
                    return tuple(n.strip() for n in match["names"].split(",") if n.strip())
    except (OSError, UnicodeDecodeError):
        pass  # not a readable config: it is for no recipe (the parser says what is wrong if it is used)
    return ()


def configs_for(entry: RecipeEntry, config_dir: Optional[Path] = None) -> list[str]:
    """Names of the configs in `config_dir` whose `# recipe:` line names `entry` (or an alias), by name."""
    names = {entry.name, *entry.aliases}
    return [
        path.stem for path in sorted((config_dir or CONFIG_DIR).glob("*.yaml")) if names & set(config_recipes(path))
    ]
