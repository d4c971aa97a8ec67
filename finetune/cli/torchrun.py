"""Launching through torch's elastic launcher (torchrun) when more than one process or node is asked for."""

from __future__ import annotations

import logging
from typing import Optional, Sequence

from finetune.cli.registry import find_recipe
from finetune.errors import UserError

# torchrun flags that take no value.
_TORCHRUN_SWITCHES = {"--standalone", "--no-python", "--no_python", "--run-path", "--run_path"}


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
    # torch takes seconds to import: only a multi-process launch needs it, not `tune ls` or a single process.
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
    except SignalException as exc:
        # Ctrl-C or SIGTERM reached the launcher, which passed it on: the workers stop after their
        # step and save; the launcher exits as they do, 128 + the signal (130 or 143).
        return 128 + int(exc.sigval)
    return 0
