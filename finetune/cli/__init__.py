"""The `tune` command: resolve a recipe name (or a user's `.py` file) and run it, in this process or
through torchrun when more than one process or node is asked for; also `ls`, `cp`, `validate`, `report`,
`job`, `submit` and `worker`.

The launcher sits above the config layer (`finetune.config`, `finetune.params`) and the recipes:
recipes never import it. It loads recipe modules by name through the registry, so starting it
(and `tune ls`) does not import torch.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from finetune.cli.commands import cmd_cp, cmd_job, cmd_ls, cmd_submit, cmd_validate, cmd_worker, params_class_for
from finetune.cli.registry import load_recipe_module
from finetune.cli.report import cmd_report
from finetune.cli.torchrun import check_launcher_args, needs_torchrun, run_with_torchrun, split_launcher_args

# Kept importable from here, where recipes and user code found them before the config layer split off.
from finetune.config import (  # noqa: F401
    CONFIG_DIR,
    TuneArgumentParser,
    builtin_config_dir,
    recipe_entry_point,
    report_user_errors,
)
from finetune.errors import UserError

USAGE = """usage: tune [torchrun flags] <recipe | path/to/recipe.py> --config X [--override k=v ...] [k=v ...]
       tune run <recipe> ...         same as above
       tune ls                       list recipes and their configs
       tune cp <recipe|config> DEST  copy a recipe file or config out to edit
       tune validate --config X [k=v ...] [--recipe R]   check and print the resolved params
       tune report OUTPUT_DIR        summarise a run; plot its loss and lr to OUTPUT_DIR/report.png
       tune job --job_config_name C [--dataset_id D] [--results_url U] ...   a production job
                                     (train, upload the results; tune job --help for the flags)
       tune submit --broker redis://H:P/N <tune job's flags>   queue a job; prints its id
       tune worker --broker redis://H:P/N [--gpus 0,1]         run queued jobs, one at a time

torchrun flags: --nproc_per_node N|auto|cpu|gpu, --nnodes N|MIN:MAX, --node_rank R, --master_addr A,
                --master_port P, --rdzv_backend B, --rdzv_endpoint H:P, --max_restarts N, ...
"""


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
    if launcher:
        check_launcher_args(launcher)  # before any worker starts, or a single process ignores a misspelt one
    else:
        if command == "ls":
            return cmd_ls()
        if command == "cp":
            return cmd_cp(command_argv)
        if command == "validate":
            return cmd_validate(command_argv)
        if command == "report":
            return cmd_report(command_argv)
        if command == "job":
            return cmd_job(command_argv)
        if command == "submit":
            return cmd_submit(command_argv)
        if command == "worker":
            return cmd_worker(command_argv)
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
