"""Launching through torch's elastic launcher (torchrun) when more than one process or node is asked for.

The torchrun flags before the recipe name are checked here before anything starts: torchrun's own
parser would take `--nproc_per_nod` as an abbreviation, a single-process run would ignore a flag
it does not read, and a bad `--nproc_per_node` would end in a worker-less traceback.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import re
from functools import lru_cache
from typing import Optional, Sequence

from finetune.cli.registry import find_recipe
from finetune.errors import UserError

# torchrun flags that take no value (tests check this against torchrun's parser; kept literal so
# splitting the command line does not import torch).
_TORCHRUN_SWITCHES = {
    "--standalone",
    "--no-python",
    "--no_python",
    "--run-path",
    "--run_path",
    "-m",
    "--module",
    "--virtual-local-rank",
    "--virtual_local_rank",
}
# Flags that say how a worker starts its program: tune decides that (each worker runs the recipe module).
_WORKER_START_FLAGS = {"--no-python", "--no_python", "--run-path", "--run_path", "-m", "--module"}
# What other launchers (accelerate, deepspeed, mpirun, Lightning) call torchrun's flags.
_FOREIGN_FLAGS = {
    "nproc": "nproc_per_node",
    "nprocs": "nproc_per_node",
    "num_processes": "nproc_per_node",
    "num_gpus": "nproc_per_node",
    "gpus": "nproc_per_node",
    "devices": "nproc_per_node",
    "np": "nproc_per_node",
    "num_nodes": "nnodes",
    "nodes": "nnodes",
    "num_machines": "nnodes",
    "machine_rank": "node_rank",
    "main_process_ip": "master_addr",
    "main_process_port": "master_port",
}
# Words torchrun accepts for --nproc_per_node besides a count: one process per CPU core or per device.
NPROC_WORDS = ("auto", "cpu", "gpu", "xpu")


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


def launcher_pairs(launcher: Sequence[str]) -> list[tuple[str, Optional[str]]]:
    """The (flag, value) pairs of `split_launcher_args`'s first part; a switch's value is None."""
    pairs: list[tuple[str, Optional[str]]] = []
    i = 0
    while i < len(launcher):
        flag = launcher[i]
        if "=" in flag:
            name, value = flag.split("=", 1)
            pairs.append((name, value))
        elif flag in _TORCHRUN_SWITCHES:
            pairs.append((flag, None))
        else:
            pairs.append((flag, launcher[i + 1] if i + 1 < len(launcher) else None))
            i += 1
        i += 1
    return pairs


@lru_cache(maxsize=1)
def torchrun_options() -> dict[str, argparse.Action]:
    """torchrun's flags, both `_` and `-` spellings, from its own parser (so a new torch's flags work)."""
    # torch takes seconds to import: only a command line with launcher flags gets here.
    from torch.distributed.run import get_args_parser

    return {name: action for action in get_args_parser()._actions for name in action.option_strings}


def _normal(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _suggest_flag(flag: str, known: Sequence[str]) -> str:
    """The torchrun flag `flag` was probably meant to be, spelt with the user's separator, or ''."""
    typed = _normal(flag)
    names = sorted({_normal(k) for k in known if k.startswith("--")})
    match = _FOREIGN_FLAGS.get(typed)
    if match is None:
        # An unfinished name first (argparse would have taken it as an abbreviation), then a close one.
        prefixed = [n for n in names if n.startswith(typed)]
        close = prefixed or difflib.get_close_matches(typed, names, n=1, cutoff=0.6)
        match = min(close, key=len) if prefixed else (close[0] if close else None)
    if match is None:
        return ""
    hyphens = "-" in flag.lstrip("-") and "_" not in flag
    return "--" + (match.replace("_", "-") if hyphens else match)


def _whole(value: str) -> Optional[int]:
    return int(value) if re.fullmatch(r"\d+", value.strip()) else None


def _check_nproc_per_node(flag: str, value: str) -> None:
    count = _whole(value)
    if value in NPROC_WORDS:
        _check_device_present(flag, value)
    elif count is None or count < 1:
        raise UserError(
            f"{flag} must be a positive whole number (or {', '.join(NPROC_WORDS)}); got {value!r}; "
            "e.g. --nproc_per_node 2 for two processes on this node"
        )


def _check_device_present(flag: str, value: str) -> None:
    """torchrun counts the GPUs (or XPUs) for `gpu` (`xpu`) and raises when there are none."""
    if value not in ("gpu", "xpu"):
        return
    # torch takes seconds to import (torch.distributed brings it, as torchrun_options did already):
    # only a launch asking for GPUs by name gets here.
    import torch.distributed

    backend = torch.cuda if value == "gpu" else getattr(torch, "xpu", None)
    if backend is None or not backend.is_available():
        kind = "CUDA GPU" if value == "gpu" else "XPU"
        raise UserError(f"{flag} {value}: no {kind} is visible on this machine; give a number of processes, or cpu")


def _check_nnodes(flag: str, value: str) -> None:
    numbers = [n for n in (_whole(b) for b in value.split(":")) if n is not None and n >= 1]
    if len(numbers) != len(value.split(":")) or len(numbers) > 2 or numbers[0] > numbers[-1]:
        raise UserError(f"{flag} must be a positive whole number or MIN:MAX (e.g. 1 or 1:4); got {value!r}")


def _check_typed_value(flag: str, value: str, action: argparse.Action) -> None:
    """A value torchrun's parser would refuse with its usage text (a port that is no number, a
    start method it lacks) becomes one line."""
    if action.choices is not None and value not in action.choices:
        raise UserError(f"{flag} must be one of {', '.join(map(str, action.choices))}; got {value!r}")
    if action.type in (int, float):
        try:
            action.type(value)
        except ValueError:
            kind = "a whole number" if action.type is int else "a number"
            raise UserError(f"{flag} must be {kind}; got {value!r}") from None


def check_launcher_args(launcher: Sequence[str]) -> None:
    """Refuse, with one line, a launcher flag torchrun does not have or a value it cannot use."""
    options = torchrun_options()
    for flag, value in launcher_pairs(launcher):
        action = options.get(flag)
        if action is None:
            suggestion = _suggest_flag(flag, list(options))
            hint = f"; did you mean '{suggestion}'?" if suggestion else ""
            if not suggestion:  # `tune --lr=0.001 full_finetune`: a recipe setting written as a flag
                key = flag.lstrip("-").replace("-", "_")
                hint = f"; a recipe setting goes after the recipe name, without dashes ({key}={value or '...'})"
            raise UserError(f"unknown launcher flag '{flag}'{hint} (tune --help lists the common ones)")
        if flag in _WORKER_START_FLAGS:
            raise UserError(f"{flag}: tune starts each worker on the recipe itself; remove {flag}")
        if action.nargs == 0:
            continue
        if value is None:
            raise UserError(f"launcher flag {flag} needs a value")
        if action.dest == "nproc_per_node":
            _check_nproc_per_node(flag, value)
        elif action.dest == "nnodes":
            _check_nnodes(flag, value)
        else:
            _check_typed_value(flag, value, action)


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


def worker_threads(local_processes: int) -> int:
    """CPU threads per worker: this machine's cores (those the launcher may use) shared among its processes."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, local_processes))


def run_with_torchrun(launcher: list[str], recipe: str, recipe_argv: list[str]) -> int:
    """Launch through torch's elastic launcher; a failed worker becomes an exit status."""
    # torch takes seconds to import: only a multi-process launch needs it, not `tune ls` or a single process.
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import determine_local_world_size, get_args_parser, run

    if recipe.endswith(".py"):
        # Each worker loads the file as a single process does: its main(argv) runs, guard or not.
        target = ["-m", "finetune.cli", recipe]
    else:
        target = ["-m", find_recipe(recipe).module]
    args = get_args_parser().parse_args([*launcher, *target, *recipe_argv])
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_quiet_after_user_error)
    # Unset, torchrun gives every worker one thread and prints a banner saying so on every run; a
    # user's own OMP_NUM_THREADS is left as it is.
    threads_chosen_here = "OMP_NUM_THREADS" not in os.environ
    if threads_chosen_here:
        os.environ["OMP_NUM_THREADS"] = str(worker_threads(determine_local_world_size(args.nproc_per_node)))
    try:
        run(args)
    except ChildFailedError as exc:
        codes = [failure.exitcode for failure in exc.failures.values()]
        return 2 if 2 in codes else (codes[0] if codes and codes[0] > 0 else 1)
    except SignalException as exc:
        # Ctrl-C or SIGTERM reached the launcher, which passed it on: the workers stop after their
        # step and save; the launcher exits as they do, 128 + the signal (130 or 143).
        return 128 + int(exc.sigval)
    finally:
        if threads_chosen_here:
            os.environ.pop("OMP_NUM_THREADS", None)
    return 0
