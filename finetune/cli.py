"""The `tune` command: argument parsing into typed Params, the recipe registry, and launching.

`TuneArgumentParser` fills a Params dataclass with CLI override > YAML config > defaults.
`tune` resolves a recipe name (or a user's `.py` file), runs it in this process, or through
torch's elastic launcher (torchrun) when more than one process or node is asked for.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import importlib.util
import logging
import os
import shutil
import sys
import sysconfig
import typing
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Literal, Optional, Sequence

import yaml

from finetune.errors import UserError
from finetune.params import FullFinetuneParams, LoraFinetuneParams, describe_type, matches_type


def builtin_config_dir(source_tree: Path = Path(__file__).resolve().parent.parent / "configs",
                       data_roots: Optional[Sequence[Path]] = None) -> Path:
    """configs/ beside the package in a source checkout, else the copy a regular install puts under share/."""
    if source_tree.is_dir():
        return source_tree
    if data_roots is None:
        schemes = [sysconfig.get_default_scheme(), f"{os.name}_user"]
        data_roots = [Path(sysconfig.get_path("data", scheme)) for scheme in schemes]
    installed = [root / "share" / "finetune" / "configs" for root in data_roots]
    return next((d for d in installed if d.is_dir()), source_tree)


CONFIG_DIR = Path(os.environ.get("FINETUNE_CONFIG_DIR") or builtin_config_dir())


# ----------------------------------------------------------------------------------------------
# Recipe registry
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecipeEntry:
    name: str
    module: str
    params: str  # name of the Params dataclass in finetune.params
    aliases: tuple[str, ...]
    configs: tuple[str, ...]

    def params_class(self) -> type:
        import finetune.params

        return getattr(finetune.params, self.params)


RECIPES: tuple[RecipeEntry, ...] = (
    RecipeEntry(
        "full_finetune",
        "finetune.recipes.full_finetune",
        "FullFinetuneParams",
        ("finetune_llm", "full_finetune_single_device", "full_finetune_distributed"),
        ("tiny_full", "llama2_7b_full", "llama3_1_8b_full", "llama3_1_8b_full_distributed", "llama3_2_1b_full"),
    ),
    RecipeEntry(
        "lora_finetune",
        "finetune.recipes.lora_finetune",
        "LoraFinetuneParams",
        ("lora_finetune_single_device", "lora_finetune_distributed"),
        ("tiny_lora", "llama2_7b_lora", "llama3_1_8b_lora", "llama3_1_8b_qlora", "llama3_2_1b_lora",
         "llama3_1_8b_lora_distributed"),
    ),
    RecipeEntry("generate", "finetune.recipes.generate", "GenerateParams", ("alpaca_generate",),
                ("generation", "llama2_7b_generation", "llama3_1_8b_generation")),
    RecipeEntry("quantize", "finetune.recipes.quantize", "QuantizeParams", (),
                ("quantization", "llama2_7b_quantization", "llama3_1_8b_quantization")),
    RecipeEntry("eleuther_eval", "finetune.recipes.eleuther_eval", "EvalParams", (),
                ("eleuther_evaluation", "llama2_7b_eleuther_evaluation", "llama3_1_8b_eleuther_evaluation")),
    RecipeEntry("dummy", "finetune.recipes.dummy", "FullFinetuneParams", (), ("tiny_full",)),
)


def recipe_is_available(entry: RecipeEntry) -> bool:
    return importlib.util.find_spec(entry.module) is not None


def available_recipes() -> list[RecipeEntry]:
    return [entry for entry in RECIPES if recipe_is_available(entry)]


def find_recipe(name: str, require_module: bool = True) -> RecipeEntry:
    for entry in available_recipes() if require_module else RECIPES:
        if name == entry.name or name in entry.aliases:
            return entry
    known = [n for e in available_recipes() for n in (e.name, *e.aliases)]
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise UserError(f"unknown recipe '{name}'; {hint}recipes: {', '.join(known)} (or a path to a .py file)")


def existing_configs(entry: RecipeEntry) -> list[str]:
    return [c for c in entry.configs if (CONFIG_DIR / f"{c}.yaml").is_file()]


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
    return importlib.import_module(find_recipe(name_or_path).module)


# ----------------------------------------------------------------------------------------------
# Config files and value coercion
# ----------------------------------------------------------------------------------------------


def resolve_config_path(config: str) -> Path:
    """A config name from configs/ (with or without .yaml) or a path to a YAML file."""
    path = Path(config).expanduser()
    if path.is_file():
        return path
    named = CONFIG_DIR / (config if config.endswith(".yaml") else f"{config}.yaml")
    if named.is_file() and os.sep not in config:
        return named
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    close = difflib.get_close_matches(config, names, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise UserError(
        f"config '{config}' not found (no such file, and not a config name); {hint}"
        f"configs: {', '.join(names) or 'none'}"
    )


def read_config(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise UserError(f"malformed YAML in {where}: {problem}; fix the file") from None
    except UnicodeDecodeError:
        raise UserError(f"config {path} is not UTF-8 text; save it as UTF-8") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config {path} must be a mapping of key: value lines, found a {type(data).__name__}")
    return data


_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}
_NONE = {"none", "null", "~", ""}


def coerce(key: str, value: Any, tp: Any, source: str, hint: str = "") -> Any:
    """Convert a CLI string or a YAML value to the field's type, or raise a UserError."""
    try:
        result = _coerce(value, tp)
    except (ValueError, TypeError, AttributeError, yaml.YAMLError):  # malformed lists and mappings too
        result = _INVALID
    if result is _INVALID or not matches_type(result, tp):
        raise UserError(
            f"{key}={value!r} ({source}) is not valid: expected {describe_type(tp)}" + (f" ({hint})" if hint else "")
        )
    return result


_INVALID = object()


def _coerce(value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:
        if isinstance(value, str) and value.strip().lower() in _NONE and type(None) in args:
            return None
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0])
    if not isinstance(value, str):
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # YAML read `output_dir: 2024` as a number
        if origin is list and isinstance(value, list):
            return [_coerce(v, args[0]) for v in value]
        if origin is dict and isinstance(value, dict):
            return {_coerce(k, args[0]): _coerce(v, args[1]) for k, v in value.items()}
        return value
    text = value.strip()
    if tp is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        return _INVALID
    if tp is int:
        return int(text)
    if tp is float:
        return float(text)
    if tp is str:
        return value
    if origin is Literal:
        for choice in args:
            if str(choice) == text:
                return choice
        return _INVALID
    if origin is list:
        if text.startswith("["):
            items = yaml.safe_load(text)
        else:
            items = [t.strip() for t in text.split(",") if t.strip()]
        return [_coerce(item, args[0]) for item in items]
    if origin is dict:
        if text.startswith("{"):
            mapping = yaml.safe_load(text)
        else:
            mapping = dict(pair.split(":", 1) for pair in text.split(",") if pair.strip())
        return {_coerce(str(k).strip(), args[0]): _coerce(str(v).strip(), args[1]) for k, v in mapping.items()}
    return _INVALID


# ----------------------------------------------------------------------------------------------
# TuneArgumentParser
# ----------------------------------------------------------------------------------------------


# What transformers, TRL and PEFT call some of our settings: (our key, why it differs).
FOREIGN_KEYS = {
    "do_sample": ("temperature", "sampling is on when temperature > 0"),
    "learning_rate": ("lr", ""),
    "num_train_epochs": ("epochs", ""),
    "per_device_train_batch_size": ("batch_size", ""),
    "gradient_checkpointing": ("enable_activation_checkpointing", ""),
    "max_length": ("max_seq_len", ""),
    "lora_r": ("lora_rank", ""),
    "r": ("lora_rank", ""),
    "model_name_or_path": ("checkpoint_dir", "a local folder"),
}


class TuneArgumentParser:
    """Parse `--config X [--override k=v ...] [k=v ...]` into a validated Params dataclass."""

    def __init__(self, params_cls: type, prog: Optional[str] = None, description: Optional[str] = None):
        self.params_cls = params_cls
        self.fields = {f.name: f for f in dataclasses.fields(params_cls)}
        self.types = typing.get_type_hints(params_cls)
        self.parser = argparse.ArgumentParser(
            prog=prog,
            description=description or (params_cls.__doc__ or "").strip(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
            epilog=self.fields_help(),
        )
        self.parser.add_argument("--config", help="config name from configs/ or a path to a YAML file")
        self.parser.add_argument(
            "--override", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
            help="set fields; bare KEY=VALUE arguments work too (CLI > config > defaults)",
        )
        self.parser.add_argument("assignments", nargs="*", metavar="KEY=VALUE", help=argparse.SUPPRESS)

    def fields_help(self) -> str:
        lines = ["fields (KEY=VALUE):"]
        for name, f in self.fields.items():
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            lines.append(f"  {name}: {describe_type(self.types[name])} = {default!r}")
            lines.append(f"      {f.metadata.get('help', '')}")
        return "\n".join(lines)

    def parse_args(self, argv: Optional[Sequence[str]] = None) -> Any:
        # Intermixed: KEY=VALUE may come before and after --config, as users type them.
        args = self.parser.parse_intermixed_args(list(sys.argv[1:] if argv is None else argv))
        if not args.config and args.assignments and "=" not in args.assignments[0]:
            args.config, args.assignments = args.assignments[0], args.assignments[1:]  # `tune validate my.yaml`
        values: dict[str, Any] = {}
        if args.config:
            path = resolve_config_path(args.config)
            for key, value in read_config(path).items():
                self._check_key(str(key), f"in {path}")
                values[key] = coerce(key, value, self.types[key], f"in {path}", self.fields[key].metadata.get("hint", ""))
        for assignment in [*args.override, *args.assignments]:
            key, value = self._split(assignment)
            self._check_key(key, "on the command line")
            values[key] = coerce(key, value, self.types[key], "on the command line", self.fields[key].metadata.get("hint", ""))
        try:
            return self.params_cls(**values)
        except UserError:
            raise
        except TypeError as exc:  # a missing required field
            raise UserError(f"{exc}; set it in the config or with KEY=VALUE") from None

    def _split(self, assignment: str) -> tuple[str, str]:
        if "=" not in assignment:
            raise UserError(f"'{assignment}' is not KEY=VALUE; write it as key=value (e.g. lr=1e-4)")
        key, value = assignment.split("=", 1)
        return key.strip(), value

    def _check_key(self, key: str, where: str) -> None:
        if key in self.fields:
            return
        # torchtune nests settings (optimizer.lr, checkpointer.output_dir); ours are flat.
        leaf = key.rsplit(".", 1)[-1]
        close = [leaf] if leaf in self.fields else difflib.get_close_matches(leaf, list(self.fields), n=1, cutoff=0.5)
        hint = f"did you mean '{close[0]}'? " if close else ""
        ours, why = FOREIGN_KEYS.get(leaf, ("", ""))
        if ours in self.fields:
            hint = f"did you mean '{ours}'?{f' ({why})' if why else ''} "
        if leaf in {f.name for f in dataclasses.fields(LoraFinetuneParams)} - set(self.fields):
            hint = "it is a LoRA setting: run this config with lora_finetune_single_device or lora_finetune_distributed; "
        raise UserError(f"unknown key '{key}' {where}; {hint}run with --help to list every key")


# ----------------------------------------------------------------------------------------------
# Error handling shared by every entry point
# ----------------------------------------------------------------------------------------------


def report_user_errors(main: Callable[[Sequence[str]], Optional[int]], argv: Sequence[str]) -> int:
    """Run `main(argv)`; a UserError becomes one `error:` line and exit status 2."""
    under_torchrun = os.environ.get("WORLD_SIZE", "1") not in ("", "0", "1")
    try:
        return main(argv) or 0
    except UserError as exc:
        if under_torchrun:
            # The ranks usually hit the same input error: one line per node is enough.
            from finetune.training.distributed import first_to_report_user_error

            if not first_to_report_user_error():
                return 2
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except Exception:
        # A rank whose collective broke because a peer stopped on an input error: the peer's
        # line says what to fix, and this rank's traceback would only bury it.
        from finetune.training.distributed import peer_stopped_on_user_error

        if under_torchrun and peer_stopped_on_user_error():
            return 2
        raise


def recipe_entry_point(main: Callable[[Sequence[str]], Optional[int]]) -> Callable[[Optional[Sequence[str]]], int]:
    """Wrap a recipe's main so it exits 2 with one line on a UserError."""

    def run(argv: Optional[Sequence[str]] = None) -> int:
        return report_user_errors(main, list(sys.argv[1:] if argv is None else argv))

    return run


# ----------------------------------------------------------------------------------------------
# The `tune` launcher
# ----------------------------------------------------------------------------------------------

# torchrun flags that take no value.
_TORCHRUN_SWITCHES = {"--standalone", "--no-python", "--no_python", "--run-path", "--run_path"}

USAGE = """usage: tune [torchrun flags] <recipe | path/to/recipe.py> --config X [--override k=v ...] [k=v ...]
       tune run <recipe> ...         same as above
       tune ls                       list recipes and their configs
       tune cp <recipe|config> DEST  copy a recipe file or config out to edit
       tune validate --config X [k=v ...] [--recipe R]   check and print the resolved params

torchrun flags: --nproc_per_node N, --nnodes N, --node_rank R, --master_addr A, --master_port P, ...
"""


def split_launcher_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate leading torchrun flags from `<recipe> ...`."""
    launcher: list[str] = []
    i = 0
    while i < len(argv) and argv[i].startswith("-") and argv[i] not in ("-h", "--help"):
        flag = argv[i]
        launcher.append(flag)
        if "=" not in flag and flag not in _TORCHRUN_SWITCHES:
            if i + 1 >= len(argv):
                raise UserError(f"torchrun flag {flag} needs a value")
            launcher.append(argv[i + 1])
            i += 1
        i += 1
    return launcher, list(argv[i:])


def launcher_flag(launcher: Sequence[str], name: str) -> Optional[str]:
    for i, token in enumerate(launcher):
        if token == name and i + 1 < len(launcher):
            return launcher[i + 1]
        if token.startswith(name + "="):
            return token.split("=", 1)[1]
    return None


def needs_torchrun(launcher: Sequence[str]) -> bool:
    nproc = launcher_flag(launcher, "--nproc_per_node") or launcher_flag(launcher, "--nproc-per-node") or "1"
    nnodes = launcher_flag(launcher, "--nnodes") or "1"
    return nproc not in ("1",) or nnodes not in ("1", "1:1")


def _quiet_after_user_error(record: logging.LogRecord) -> bool:
    """Drop the launcher's log lines about stopping the workers after one exits on an input
    error (status 2): that worker's `error:` line is the whole story."""
    message = str(record.msg)
    if message.startswith("Sending process %s closing signal"):
        return False
    return not (message.startswith("failed (exitcode: %s)") and record.args and record.args[0] == 2)


def run_with_torchrun(launcher: list[str], recipe: str, recipe_argv: list[str]) -> int:
    """Launch through torch's elastic launcher; a failed worker becomes an exit status."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    if recipe.endswith(".py"):
        # Each worker loads the file as a single process does: its main(argv) runs, guard or not.
        target = ["-m", "finetune.cli", recipe]
    else:
        target = ["-m", find_recipe(recipe).module]
    args = get_args_parser().parse_args([*launcher, *target, *recipe_argv])
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_quiet_after_user_error)
    try:
        run(args)
    except ChildFailedError as exc:
        codes = [failure.exitcode for failure in exc.failures.values()]
        return 2 if 2 in codes else (codes[0] if codes and codes[0] > 0 else 1)
    except SignalException:
        # Ctrl-C reached the launcher too; the workers stop after their step and save.
        return 130
    return 0


def cmd_ls() -> int:
    rows = [("RECIPE", "ALIASES", "CONFIGS")]
    for entry in available_recipes():
        rows.append((entry.name, ", ".join(entry.aliases) or "-", ", ".join(existing_configs(entry)) or "-"))
    name_width = max(len(r[0]) for r in rows) + 2
    alias_width = max(len(r[1]) for r in rows) + 2
    for name, aliases, configs in rows:
        print(f"{name:<{name_width}}{aliases:<{alias_width}}{configs}")
    return 0


def cmd_cp(argv: Sequence[str]) -> int:
    if len(argv) != 2:
        raise UserError("tune cp takes a recipe or config name and a destination: tune cp tiny_full my.yaml")
    name, dest = argv
    config_path = CONFIG_DIR / f"{name.removesuffix('.yaml')}.yaml"
    if config_path.is_file():
        source = config_path
    else:
        try:
            module = find_recipe(name.removesuffix(".py")).module
        except UserError:
            raise UserError(f"'{name}' is neither a config nor a recipe; run `tune ls` to see both") from None
        spec = importlib.util.find_spec(module)
        assert spec is not None and spec.origin is not None
        source = Path(spec.origin)
    target = Path(dest)
    if target.is_dir() or dest.endswith(("/", os.sep)):
        target = target / source.name
    if target.exists():
        raise UserError(f"{target} already exists; choose another destination or delete it first")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    print(f"copied {source} to {target}")
    return 0


def recipe_for_config(argv: Sequence[str]) -> str:
    """The recipe a config is for: by its name in the registry, or by its keys for a file of the user's."""
    positional = [a for a in argv if "=" not in a and not a.startswith("-")]
    config = launcher_flag(argv, "--config") or (positional[0] if positional else None)
    if config is None:
        return "full_finetune"
    name = config.removesuffix(".yaml")
    for entry in RECIPES:
        if name in entry.configs:
            return entry.name
    try:
        keys = set(read_config(resolve_config_path(config)))
    except (UserError, OSError):
        return "full_finetune"  # the parser reports what is wrong with the file
    lora_only = {f.name for f in dataclasses.fields(LoraFinetuneParams)} - {f.name for f in dataclasses.fields(FullFinetuneParams)}
    return "lora_finetune" if keys & lora_only else "full_finetune"


def cmd_validate(argv: Sequence[str]) -> int:
    argv = list(argv)
    if "--recipe" in argv:
        i = argv.index("--recipe")
        if i + 1 >= len(argv):
            raise UserError("--recipe needs a recipe name")
        recipe = argv[i + 1]
        del argv[i : i + 2]
    else:
        recipe = recipe_for_config(argv)
    params_cls = params_class_for(recipe)
    if params_cls is None:
        raise UserError(f"recipe '{recipe}' declares no PARAMS_CLASS, so it cannot be validated")
    params = TuneArgumentParser(params_cls, prog=f"tune validate --recipe {recipe}").parse_args(argv)
    if getattr(params, "dataset_type", None) == "instruct":
        from finetune.data.templates import get_template

        get_template(params.template)
    print(params)
    for note in missing_paths(params):
        print(note)
    print("config is valid")
    return 0


_PATH_KEYS = ("checkpoint_dir", "tokenizer_path", "adapter_dir", "dataset", "eval_dataset", "calibration_dataset",
              "prompt_file")


def missing_paths(params: Any) -> list[str]:
    """Notes on local paths a run would read that are not on this machine (configs may be
    validated away from the machine that runs them, so these do not fail validation)."""
    from finetune.data.sources import FILE_SUFFIXES
    from finetune.params import PACKAGE_PREFIX, resolve_path

    notes = []
    for key in _PATH_KEYS:
        value = getattr(params, key, None)
        if not isinstance(value, str) or not value:
            continue
        # A dataset without a file suffix or a path prefix may be a Hub name.
        local = "dataset" not in key or value.startswith((PACKAGE_PREFIX, ".", "/", "~")) or Path(value).suffix.lower() in FILE_SUFFIXES
        if local and not resolve_path(value).exists():
            notes.append(f"note: {key}={value} does not exist on this machine")
    return notes


def params_class_for(recipe: str) -> Optional[type]:
    """The Params dataclass a recipe reads; a user's recipe file may declare PARAMS_CLASS."""
    if recipe.endswith(".py"):
        return getattr(load_recipe_module(recipe), "PARAMS_CLASS", None)
    return find_recipe(recipe, require_module=False).params_class()


def tune_main(argv: Sequence[str]) -> int:
    launcher, rest = split_launcher_args(argv)
    if not rest or rest[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if rest else 2
    command, *command_argv = rest
    if command == "run":
        more_launcher, command_argv = split_launcher_args(command_argv)  # tune run --nproc_per_node 2 <recipe>
        launcher += more_launcher
        if not command_argv:
            raise UserError("tune run needs a recipe name: tune run full_finetune --config tiny_full")
        command, *command_argv = command_argv
    if not launcher:
        if command == "ls":
            return cmd_ls()
        if command == "cp":
            return cmd_cp(command_argv)
        if command == "validate":
            return cmd_validate(command_argv)
    if needs_torchrun(launcher) and not {"-h", "--help"} & set(command_argv):  # help is printed once, here
        # Check the config once here, so a typo is one line and not a line per worker.
        params_cls = params_class_for(command)
        if params_cls is not None:
            TuneArgumentParser(params_cls).parse_args(command_argv)
        return run_with_torchrun(launcher, command, command_argv)
    module = load_recipe_module(command)
    return module.main(command_argv) or 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return report_user_errors(tune_main, list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
