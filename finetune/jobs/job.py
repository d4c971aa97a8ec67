"""`tune job`: a production job as the pipeline starts one, turned into a recipe run.

The pipeline this library replaces starts a job as
`<runner> torchtunewrapper --job_config_name llm_llama3_1_8b --dataset_id <path> --batch_size 2 ...`
and then trains, uploads the results and optionally deletes the local weights. `parse_job_args`
reads those flags into a `JobSpec`; `resolve_job_config`, `choose_recipe` and `recipe_argv` turn
it into a recipe name and its command line (`--config <file> key=value ...`); `finish_job` uploads
the output folder and records it in events.jsonl. The launcher (`finetune/cli/commands.py`) runs
the recipe between the two. This module imports no torch.

A job is its id: its folder is `<jobs_dir>/<user_id>/<job_id>`, where `job.json` records the flags
that define what it trains. Running a job whose folder already holds that record is another attempt
of it: with the same flags it resumes from the newest checkpoint there (a preempted or killed job is
resumed by running the same command again); a job already done only finishes its upload; other
flags are refused.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from finetune.config.coercion import bool_from_text
from finetune.config.files import CONFIG_DIR, resolve_config_path
from finetune.errors import UserError
from finetune.jobs import events, storage

# Exit statuses of `tune job` besides the recipe's own (0 done, 2 bad input, 130 stopped, 143 preempted, 1).
EXIT_NOT_UPLOADED = 3  # trained (status done, results kept locally) but the upload or the deletion after it failed

JOB_RECORD = "job.json"
# The flags that say what a job trains: another attempt of the job must repeat them to resume it.
DEFINING_FLAGS = (
    "job_config_name",
    "dataset_id",
    "batch_size",
    "num_epochs",
    "use_lora",
    "use_qlora",
    "lr",
    "seed",
    "shuffle",
    "overrides",
)

DUMMY = "dummy"  # --job_config_name dummy: the dummy recipe with its defaults (no model, no data)
STATES = {0: "done", 2: "failed", 130: "stopped", 143: "preempted"}


@dataclass(frozen=True)
class JobSpec:
    """One job as the pipeline describes it; None means the config's own value."""

    job_config_name: str
    job_id: str
    user_id: str
    dataset_id: Optional[str] = None
    batch_size: Optional[int] = None
    num_epochs: Optional[int] = None
    use_lora: Optional[bool] = None
    use_qlora: bool = False
    lr: Optional[float] = None
    seed: Optional[int] = None
    shuffle: Optional[bool] = None
    num_gpus: int = 1
    results_url: Optional[str] = None
    delete_weights_after_upload: bool = False
    overrides: tuple[str, ...] = field(default_factory=tuple)

    def output_dir(self, jobs_dir: Optional[Path] = None) -> Path:
        """`<jobs_dir>/<user_id>/<job_id>`; jobs_dir defaults to $FINETUNE_JOBS_DIR or ./jobs."""
        root = jobs_dir or Path(os.environ.get("FINETUNE_JOBS_DIR") or "jobs")
        return root / self.user_id / self.job_id

    def results_location(self) -> Optional[str]:
        """`<results_url>/<user_id>/<job_id>`, where the output folder is uploaded, or None."""
        if not self.results_url:
            return None
        return f"{self.results_url.rstrip('/')}/{self.user_id}/{self.job_id}"


def parse_bool(text: str) -> bool:
    flag = bool_from_text(text)
    if flag is None:
        raise argparse.ArgumentTypeError(f"expected true/false/yes/no/1/0, got '{text}'")
    return flag


def _number(text: str, kind: type, minimum: float, strict: bool) -> Any:
    try:
        value = kind(text)
    except ValueError:
        expected = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {expected}, got '{text}'") from None
    if value < minimum or (strict and value == minimum):
        raise argparse.ArgumentTypeError(f"must be {'above' if strict else 'at least'} {minimum:g}, got {text}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, 1, strict=False)


def non_negative_int(text: str) -> int:
    return _number(text, int, 0, strict=False)


def positive_float(text: str) -> float:
    return _number(text, float, 0, strict=True)


def key_value(text: str) -> str:
    if "=" not in text or text.startswith("="):
        raise argparse.ArgumentTypeError(f"'{text}' is not KEY=VALUE")
    return text


def new_job_id() -> str:
    """A short id that sorts by time: `YYYYmmdd-HHMMSS-<6 hex>`."""
    return f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"


def default_user_id() -> str:
    return os.environ.get("USER") or "anonymous"


class _JobArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are UserErrors (one `error:` line, exit 2), with no abbreviations."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"tune job: {message}")


def job_parser() -> _JobArgumentParser:
    p = _JobArgumentParser(prog="tune job", allow_abbrev=False, add_help=True)
    p.add_argument("--job_config_name", required=True, help="a shipped config name, llm_<model>, dummy, or a YAML path")
    p.add_argument("--dataset_id", help="the training data: a local path, a Hub name, or a URL (fetched first)")
    p.add_argument("--batch_size", type=positive_int)
    p.add_argument("--num_epochs", type=positive_int)
    p.add_argument(
        "--use_lora", type=parse_bool, nargs="?", const=True, help="LoRA (lora_finetune; dpo: use_lora); false: full"
    )
    p.add_argument("--use_qlora", type=parse_bool, nargs="?", const=True, default=False, help="QLoRA: NF4 base")
    p.add_argument("--lr", type=positive_float)
    p.add_argument("--seed", type=non_negative_int)
    p.add_argument("--shuffle", type=parse_bool, nargs="?", const=True)
    p.add_argument("--num_gpus", type=non_negative_int, default=1, help="more than 1: torchrun on this node")
    p.add_argument("--job_id", help="generated when absent")
    p.add_argument("--user_id", help="$USER or 'anonymous' when absent")
    p.add_argument("--results_url", help="upload the output folder to <results_url>/<user_id>/<job_id>/")
    p.add_argument("--delete_weights_after_upload", type=parse_bool, nargs="?", const=True, default=False)
    p.add_argument("--override", type=key_value, nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    return p


def _flag_names(parser: argparse.ArgumentParser) -> list[str]:
    return [name for action in parser._actions for name in action.option_strings if name.startswith("--")]


def parse_job_args(argv: Sequence[str]) -> JobSpec:
    """The job's flags (`--flag value` or `--flag=value`); anything else is a UserError naming it."""
    parser = job_parser()
    known = _flag_names(parser)
    for token in argv:
        if token.startswith("-") and token not in ("-h",):
            name = token.split("=", 1)[0]
            if name.startswith("--") and name not in known and not _is_number(token):
                close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
                hint = f"; did you mean {close[0]}?" if close else f"; flags: {', '.join(known)}"
                raise UserError(f"tune job: unknown flag {name}{hint}")
    args = parser.parse_args(list(argv))
    for name in ("job_id", "user_id"):
        value = getattr(args, name)
        if value is not None and (not value or "/" in value or value in (".", "..")):
            raise UserError(f"tune job: --{name} '{value}' must be a non-empty name without '/'")
    if args.use_qlora and args.use_lora is False:
        raise UserError("tune job: --use_qlora true needs LoRA; drop --use_lora false")
    return JobSpec(
        job_config_name=args.job_config_name,
        job_id=args.job_id or new_job_id(),
        user_id=args.user_id or default_user_id(),
        dataset_id=args.dataset_id,
        batch_size=args.batch_size,
        num_epochs=args.num_epochs,
        use_lora=args.use_lora,
        use_qlora=args.use_qlora,
        lr=args.lr,
        seed=args.seed,
        shuffle=args.shuffle,
        num_gpus=args.num_gpus,
        results_url=args.results_url,
        delete_weights_after_upload=args.delete_weights_after_upload,
        overrides=tuple(args.override),
    )


def _is_number(token: str) -> bool:
    try:
        float(token)
        return True
    except ValueError:
        return False


def resolve_job_config(spec: JobSpec) -> Optional[Path]:
    """The config file a job runs with (None for the dummy).

    A shipped config name or a YAML path as is; the old pipeline's `llm_<model>` names map to
    `<model>_qlora` (--use_qlora), `<model>_lora` (--use_lora true) or `<model>_full`, if shipped.
    """
    name = spec.job_config_name
    if name == DUMMY:
        return None
    try:
        return resolve_config_path(name)
    except UserError:
        if not name.startswith("llm_"):
            raise
    model = name.removeprefix("llm_")
    kind = "qlora" if spec.use_qlora else "lora" if spec.use_lora else "full"
    candidate = CONFIG_DIR / f"{model}_{kind}.yaml"
    if candidate.is_file():
        return candidate
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    close = [n for n in names if n.startswith(model)] or difflib.get_close_matches(model, names, n=3)
    raise UserError(
        f"--job_config_name {name}: no config {model}_{kind}; "
        + (f"close: {', '.join(close)}" if close else f"configs: {', '.join(names)}")
    )


def choose_recipe(spec: JobSpec, config_recipes: Sequence[str]) -> str:
    """dpo for a DPO config (the LoRA flags become its keys); otherwise lora_finetune for
    --use_lora/--use_qlora, full_finetune for --use_lora false, else what the config's
    `# recipe:` line names (full_finetune when it names none)."""
    if spec.job_config_name == DUMMY:
        return DUMMY
    if "dpo" in config_recipes:
        return "dpo"
    trainers = [r for r in config_recipes if r in ("full_finetune", "lora_finetune")]
    if spec.use_lora or spec.use_qlora:
        recipe = "lora_finetune"
    elif spec.use_lora is False:
        recipe = "full_finetune"
    else:
        recipe = trainers[0] if trainers else "full_finetune"
    if trainers and recipe not in trainers:
        flag = "--use_lora false" if recipe == "full_finetune" else "--use_lora true"
        raise UserError(
            f"--job_config_name {spec.job_config_name} is a {trainers[0]} config, but {flag} asks for "
            f"{recipe}; choose a config for {recipe} or drop the flag"
        )
    return recipe


def recipe_argv(
    spec: JobSpec,
    recipe: str,
    config: Optional[Path],
    dataset: Optional[str],
    output_dir: Path,
    resume: bool = False,
) -> list[str]:
    """The recipe's command line: `--config <file>` then key=value overrides, --override ones last.

    The dummy has no data: dataset and shuffle are not passed to it.
    """
    argv = ["--config", str(config)] if config is not None else []
    values: dict[str, object] = {"output_dir": output_dir}
    if resume:
        values["resume_from_checkpoint"] = True
    if dataset is not None and recipe != DUMMY:
        values["dataset"] = dataset
    values.update(batch_size=spec.batch_size, epochs=spec.num_epochs, lr=spec.lr, seed=spec.seed)
    if recipe != DUMMY:
        values["shuffle"] = spec.shuffle
    if recipe == "dpo" and (spec.use_lora is not None or spec.use_qlora):
        values["use_lora"] = bool(spec.use_lora or spec.use_qlora)  # one recipe, LoRA or full by this key
    if spec.use_qlora:
        values["quantize_base"] = True
    if spec.num_gpus == 0:
        values["device"] = "cpu"
    for key, value in values.items():
        if value is not None:
            text = str(value).lower() if isinstance(value, bool) else str(value)
            argv.append(f"{key}={text}")
    return [*argv, *spec.overrides]


def local_dataset(dataset_id: Optional[str], log: storage.Log) -> Optional[str]:
    """The dataset as the recipe reads it: a URL fetched into $FINETUNE_CACHE_DIR (default
    ~/.cache/finetune/inputs) first; a local path or a Hub name as given."""
    if dataset_id is None or not storage.is_url(dataset_id):
        return dataset_id
    cache = Path(os.environ.get("FINETUNE_CACHE_DIR") or Path.home() / ".cache" / "finetune" / "inputs")
    return str(storage.fetch(dataset_id, cache, log))


def state_for(code: int) -> str:
    return STATES.get(code, "failed")


def job_record(spec: JobSpec) -> dict[str, Any]:
    """What `job.json` holds: the job's ids and the flags that define what it trains."""
    record: dict[str, Any] = {"job_id": spec.job_id, "user_id": spec.user_id}
    for name in DEFINING_FLAGS:
        value = getattr(spec, name)
        record[name] = list(value) if isinstance(value, tuple) else value
    return record


def begin_attempt(spec: JobSpec, output_dir: Path) -> Optional[str]:
    """Record the job in its folder, or recognise an earlier attempt of it there.

    Returns None on a first attempt, `resume` when an earlier attempt of the same job left its
    record (it resumes from the newest checkpoint there, or starts over when there is none), and
    `done` when that attempt trained to the end. A record with other flags is a UserError.
    """
    earlier = storage.read_json(output_dir / JOB_RECORD)
    mine = job_record(spec)
    if earlier is None:
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
            storage.write_json_atomic(output_dir / JOB_RECORD, mine)
        except OSError as exc:
            where = output_dir / JOB_RECORD
            raise UserError(f"cannot write {where} ({exc.strerror}); set a writable FINETUNE_JOBS_DIR") from None
        return None
    changed = [name for name in DEFINING_FLAGS if earlier.get(name) != mine[name]]
    if changed:
        was = ", ".join(f"{name} {earlier.get(name)!r}" for name in changed)
        raise UserError(
            f"job {spec.job_id} in {output_dir} was started with {was}; repeat its flags to resume it, "
            "or choose another --job_id"
        )
    status = storage.read_json(output_dir / "status.json") or {}
    return "done" if status.get("state") == "done" else "resume"


def is_uploaded(spec: JobSpec, output_dir: Path) -> bool:
    """Whether the folder holds the manifest of an upload to this job's results location."""
    manifest = storage.read_json(output_dir / storage.MANIFEST_NAME) or {}
    return spec.results_location() is None or manifest.get("url") == spec.results_location()


def finish_job(spec: JobSpec, code: int, output_dir: Path, log: storage.Log = print) -> int:
    """After the recipe: on success upload (and with --delete_weights_after_upload delete the local
    weights), append the `upload` and `job_end` events, and print `job <id>: <state>; results in ...`.

    Exit status 3 means trained but not all done after: the final line says which (`done, not
    uploaded` or `done, uploaded, weights kept`), as does the `error` record before job_end.
    A run that did not end done has written its own job_end. Returns the job's exit status.
    """
    url = spec.results_location()
    state = state_for(code)
    uploaded = False
    if code == 0 and output_dir.is_dir():
        event_log = events.reopen(output_dir)
        try:
            if url:
                try:
                    report = storage.upload(output_dir, url, log)
                    files = [*report.uploaded, *report.skipped]
                    num_bytes = sum((output_dir / rel).stat().st_size for rel in files if (output_dir / rel).is_file())
                    event_log.upload(url, files, num_bytes)
                    uploaded = True
                except UserError as exc:
                    _report(exc, event_log)
                    code, state = EXIT_NOT_UPLOADED, "done, not uploaded"
            if uploaded and spec.delete_weights_after_upload:
                try:
                    storage.delete_local_weights(output_dir, log)
                except UserError as exc:
                    _report(exc, event_log)
                    code, state = EXIT_NOT_UPLOADED, "done, uploaded, weights kept"
            event_log.job_end("done", exit_status=code, uploaded_to=url if uploaded else None)
        finally:
            event_log.close()
        if uploaded:
            try:  # events.jsonl again, now with its upload and job_end records
                storage.upload_again(output_dir, url, [events.EVENTS_FILE], lambda _: None)  # type: ignore[arg-type]
            except UserError as exc:
                print(f"warning: {exc}; the results themselves are uploaded", file=sys.stderr, flush=True)
    if output_dir.is_dir():
        where = f"{output_dir}" + (f" and {url}" if uploaded else "")
        print(f"job {spec.job_id}: {state}; results in {where}", flush=True)
    return code


def _report(error: UserError, event_log: events.EventLog) -> None:
    print(f"error: {error}", file=sys.stderr, flush=True)
    event_log.error(error)


class job_environment:
    """FINETUNE_JOB_ID set for the run (events.jsonl's job_start reads it), and the run's job_end
    left to the job (events.JOB_END_AFTER_UPLOAD); both restored after."""

    def __init__(self, job_id: str) -> None:
        self.values = {"FINETUNE_JOB_ID": job_id, events.JOB_END_AFTER_UPLOAD: "1"}
        self._old: dict[str, Optional[str]] = {}

    def __enter__(self) -> None:
        self._old = {name: os.environ.get(name) for name in self.values}
        os.environ.update(self.values)

    def __exit__(self, *exc: object) -> None:
        for name, old in self._old.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old
