"""`TuneArgumentParser`: `--config X [--override k=v ...] [k=v ...]` into a validated Params dataclass.

Precedence is CLI override > config file > dataclass default. It works for any dataclass whose
fields carry `help` (and optionally `hint`) metadata; a Params class may also offer
`hint_for_unknown_key(key)` to point at the recipe a stray key belongs to, and `ignored_keys()`:
keys it accepts and drops (the dummy recipe reads a fine-tuning config that way).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
import typing
from typing import Any, Optional, Sequence

from finetune.config.coercion import coerce, describe_type
from finetune.config.files import read_config, resolve_config_path
from finetune.errors import UserError

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


# torchrun's flags, which `tune` takes before the recipe name.
LAUNCHER_FLAGS = ("nproc_per_node", "nnodes", "node_rank", "master_addr", "master_port", "rdzv_endpoint", "standalone")


class TuneArgumentParser:
    """Parse `--config X [--override k=v ...] [k=v ...]` into a validated Params dataclass."""

    def __init__(self, params_cls: type, prog: Optional[str] = None, description: Optional[str] = None):
        self.params_cls = params_cls
        self.fields = {f.name: f for f in dataclasses.fields(params_cls)}
        self.types = typing.get_type_hints(params_cls)
        ignored_keys = getattr(params_cls, "ignored_keys", None)
        self.ignored: set[str] = set(ignored_keys()) if ignored_keys is not None else set()
        self.parser = argparse.ArgumentParser(
            prog=prog,
            description=description or (params_cls.__doc__ or "").strip(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
            epilog=self.fields_help(),
        )
        self.parser.add_argument("--config", help="config name from configs/ or a path to a YAML file")
        self.parser.add_argument(
            "--override",
            nargs="+",
            action="extend",
            default=[],
            metavar="KEY=VALUE",
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
        argv = list(sys.argv[1:] if argv is None else argv)
        self._check_dashed_keys(argv)
        # Intermixed: KEY=VALUE may come before and after --config, as users type them.
        args = self.parser.parse_intermixed_args(argv)
        if not args.config and args.assignments and "=" not in args.assignments[0]:
            args.config, args.assignments = args.assignments[0], args.assignments[1:]  # `tune validate my.yaml`
        values: dict[str, Any] = {}
        if args.config:
            path = resolve_config_path(args.config)
            for key, value in read_config(path).items():
                if key in self.ignored:
                    continue
                self._check_key(str(key), f"in {path}")
                values[key] = self._coerce(key, value, f"in {path}")
        for assignment in [*args.override, *args.assignments]:
            key, value = self._split(assignment)
            if key in self.ignored:
                continue
            self._check_key(key, "on the command line")
            values[key] = self._coerce(key, value, "on the command line")
        try:
            return self.params_cls(**values)
        except UserError:
            raise
        except TypeError as exc:  # a missing required field
            raise UserError(f"{exc}; set it in the config or with KEY=VALUE") from None

    def _check_dashed_keys(self, argv: Sequence[str]) -> None:
        """`--lr=0.001` or `--lr 0.001`, as argparse-style tools take settings: one line saying how
        ours are written, before argparse calls the rest of the line unrecognised."""
        for i, token in enumerate(argv):
            flag, has_value, value = token.partition("=")
            if not token.startswith("--") or flag in ("--", "--help", "--config", "--override"):
                continue
            key = flag[2:].replace("-", "_")
            if key in LAUNCHER_FLAGS:
                raise UserError(
                    f"'{flag}' is a flag of the launcher: put it before the recipe name "
                    f"(tune {flag} N <recipe> --config ...)"
                )
            if not has_value and i + 1 < len(argv) and not argv[i + 1].startswith("-") and "=" not in argv[i + 1]:
                value, has_value, token = argv[i + 1], "=", f"{token} {argv[i + 1]}"
            written = f"{key}={value if has_value else '<value>'}"
            if key in self.fields:
                raise UserError(
                    f"'{token}': settings are written without dashes, as {written} (or --override {written})"
                )
            self._check_key(key, f"on the command line ('{token}'; settings are written key=value, without dashes)")

    def _coerce(self, key: str, value: Any, source: str) -> Any:
        return coerce(key, value, self.types[key], source, self.fields[key].metadata.get("hint", ""))

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
        known = [*self.fields, *sorted(self.ignored)]  # a typo of an ignored key is still a typo
        close = [leaf] if leaf in self.fields else difflib.get_close_matches(leaf, known, n=1, cutoff=0.5)
        hint = f"did you mean '{close[0]}'? " if close else ""
        ours, why = FOREIGN_KEYS.get(leaf, ("", ""))
        if ours in self.fields:
            hint = f"did you mean '{ours}'?{f' ({why})' if why else ''} "
        # The Params class knows its siblings: a key of another recipe's params says which recipe to run.
        hint_for_unknown_key = getattr(self.params_cls, "hint_for_unknown_key", None)
        elsewhere = hint_for_unknown_key(leaf) if hint_for_unknown_key is not None else ""
        if elsewhere:
            hint = f"{elsewhere}; "
        raise UserError(f"unknown key '{key}' {where}; {hint}run with --help to list every key")
