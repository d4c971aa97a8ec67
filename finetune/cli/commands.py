"""`tune` subcommands: `ls` (recipes and their configs), `cp` (copy one out to edit),
`validate` (check a config and print the params it resolves to), `job` (a production job), `submit`
(queue one) and `worker` (run queued ones)."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Optional, Sequence

from finetune.cli.registry import available_recipes, config_recipes, configs_for, find_recipe, load_recipe_module
from finetune.cli.torchrun import launcher_flag, run_with_torchrun
from finetune.config import CONFIG_DIR, TuneArgumentParser, read_config, resolve_config_path
from finetune.errors import UserError
from finetune.jobs.job import (
    JobSpec,
    begin_attempt,
    choose_recipe,
    finish_job,
    is_uploaded,
    job_environment,
    job_parser,
    local_dataset,
    parse_job_args,
    recipe_argv,
    resolve_job_config,
)
from finetune.jobs.worker import (
    SUBMIT_USAGE,
    parse_worker_args,
    run_worker,
    split_queue_flags,
    submit_job,
    worker_parser,
)


def cmd_ls() -> int:
    rows = [("RECIPE", "ALIASES", "CONFIGS")]
    for entry in available_recipes():
        rows.append((entry.name, ", ".join(entry.aliases) or "-", ", ".join(configs_for(entry)) or "-"))
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
            source = find_recipe(name.removesuffix(".py")).path
        except UserError:
            raise UserError(f"'{name}' is neither a config nor a recipe; run `tune ls` to see both") from None
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
    """The recipe a config is for: as its `# recipe:` line says, or by its keys for a file of the user's."""
    positional = [a for a in argv if "=" not in a and not a.startswith("-")]
    config = launcher_flag(argv, "--config") or (positional[0] if positional else None)
    if config is None:
        return "full_finetune"
    try:
        path = resolve_config_path(config)
        named = config_recipes(path)
        if named:
            return named[0]
        keys = set(read_config(path))
    except (UserError, OSError):
        return "full_finetune"  # the parser reports what is wrong with the file
    full, lora = params_class_for("full_finetune"), params_class_for("lora_finetune")
    assert full is not None and lora is not None
    lora_only = {f.name for f in dataclasses.fields(lora)} - {f.name for f in dataclasses.fields(full)}
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
    # Params classes say what a run would read; a user's own PARAMS_CLASS may not.
    check_before_run = getattr(params, "check_before_run", None)
    notes = check_before_run() if check_before_run is not None else []
    print(params)
    for note in notes:
        print(note)
    print("config is valid")
    return 0


def params_class_for(recipe: str) -> Optional[type]:
    """The Params dataclass a recipe reads; a user's recipe file may declare PARAMS_CLASS."""
    if recipe.endswith(".py"):
        return getattr(load_recipe_module(recipe), "PARAMS_CLASS", None)
    return find_recipe(recipe).params_class()


def plan_job(spec: JobSpec) -> tuple[str, Optional[Path]]:
    """The recipe and config file a job runs with. A bad name, flag or --override is a UserError
    now, before the job's folder is made (or the job is queued)."""
    config = resolve_job_config(spec)
    recipe = choose_recipe(spec, config_recipes(config) if config is not None else ())
    params_cls = params_class_for(recipe)
    if params_cls is not None:
        TuneArgumentParser(params_cls).parse_args(recipe_argv(spec, recipe, config, spec.dataset_id, spec.output_dir()))
    return recipe, config


def cmd_job(argv: Sequence[str]) -> int:
    """`tune job`: the pipeline's job flags -> a recipe run (here, or torchrun for --num_gpus > 1),
    then the upload of its results (finetune/jobs/job.py). With --broker it is queued instead, for
    a `tune worker` (finetune/jobs/worker.py)."""
    if {"-h", "--help"} & set(argv):
        job_parser().print_help()
        print("\nwith --broker redis://HOST:PORT/N [--queue Q] the job is queued for `tune worker` (tune submit)")
        return 0
    if any(a == "--broker" or a.startswith("--broker=") for a in argv):
        return cmd_submit(argv)
    spec = parse_job_args(argv)
    recipe, config = plan_job(spec)
    output_dir = spec.output_dir()
    attempt = begin_attempt(spec, output_dir)
    if attempt == "done":
        print(f"job {spec.job_id}: already trained (status.json says done)", flush=True)
        if is_uploaded(spec, output_dir):
            print(f"job {spec.job_id}: done; results in {output_dir}", flush=True)
            return 0
        return finish_job(spec, 0, output_dir)
    if attempt == "resume":
        print(f"job {spec.job_id}: resuming the earlier attempt in {output_dir}", flush=True)
    dataset = local_dataset(spec.dataset_id, print)
    recipe_args = recipe_argv(spec, recipe, config, dataset, output_dir, resume=attempt == "resume")
    with job_environment(spec.job_id):
        if spec.num_gpus > 1:
            code = run_with_torchrun(["--nproc_per_node", str(spec.num_gpus)], recipe, recipe_args)
        else:
            code = load_recipe_module(recipe).main(recipe_args) or 0
    return finish_job(spec, code, output_dir)


def cmd_submit(argv: Sequence[str]) -> int:
    """`tune submit` (or `tune job ... --broker URL`): check the job's flags, queue it for a
    `tune worker` and print its id."""
    if {"-h", "--help"} & set(argv):
        print(SUBMIT_USAGE)
        job_parser().print_help()
        return 0
    broker, queue, job_argv = split_queue_flags(argv)
    spec = parse_job_args(job_argv)
    plan_job(spec)  # a bad config name or flag is refused here, not later on the worker
    submit_job(broker, queue, spec, job_argv)
    print(spec.job_id, flush=True)
    return 0


def cmd_worker(argv: Sequence[str]) -> int:
    """`tune worker --broker URL [--gpus 0,1] [--queue Q] [--jobs_dir DIR]`: run queued jobs, one at a time."""
    if {"-h", "--help"} & set(argv):
        worker_parser().print_help()
        return 0
    return run_worker(parse_worker_args(argv))
