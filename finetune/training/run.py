"""What a training run sets up before its training loop: the process group, device, dtype and
seeds, the claimed and locked output folder and the job monitor (`start_run`), the architecture
and tokenizer it trains with (`load_model_source`), and the model itself from a state dict.

Both fine-tuning recipes call these in the same order; what differs between them (adapters,
which weights to start from) stays in the recipe and is handed in.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from tqdm import tqdm

from finetune.checkpointing.atomic import atomic_write_text, remove_leftovers
from finetune.checkpointing.model_configs import resolve_model_args
from finetune.checkpointing.output_lock import OutputDirLock
from finetune.checkpointing.recipe_state import claim_output_dir, seed_everything
from finetune.checkpointing.writers import hf_output_extras
from finetune.config.entry import peer_stopped_on_user_error
from finetune.errors import UserError
from finetune.jobs.events import EventLog, Sink, sinks_for
from finetune.models import ModelArgs, TransformerDecoder
from finetune.params import DummyParams, FullFinetuneParams, resolve_path
from finetune.tokenizers import Tokenizer
from finetune.tokenizers.loader import load_tokenizer_for_model, resolve_tokenizer_path
from finetune.training.distributed import (
    DistInfo,
    destroy_distributed,
    exit_if_launcher_gone,
    init_distributed,
    on_launcher_death,
    resolve_device,
    run_on_rank_zero,
)
from finetune.training.guards import Preempted
from finetune.training.model_setup import ModuleHook, initial_state_dict, prepare_model
from finetune.training.monitor import JobMonitor
from finetune.training.precision import resolve_run_dtype
from finetune.training.resume import ResumePoint, plan_resume


@dataclass
class EarlierRecord:
    """The status.json and events.jsonl a resumed run found in its folder. A resume refused by a
    check that needs the built data comes after both were written to; they are put back, so a
    refused run leaves the earlier run's record as it was."""

    output_dir: Path
    status: Optional[str]
    events_size: Optional[int]

    @classmethod
    def read(cls, output_dir: Path) -> EarlierRecord:
        status, events = output_dir / "status.json", output_dir / "events.jsonl"
        return cls(
            output_dir,
            status.read_text(encoding="utf-8") if status.is_file() else None,
            events.stat().st_size if events.is_file() else None,
        )

    def restore(self) -> None:
        status, events = self.output_dir / "status.json", self.output_dir / "events.jsonl"
        if self.status is None:
            status.unlink(missing_ok=True)
        else:
            atomic_write_text(status, self.status)
        if self.events_size is None:
            events.unlink(missing_ok=True)
        elif events.is_file():
            with events.open("r+b") as f:
                f.truncate(self.events_size)


@dataclass
class RunContext:
    """Where this process trains and what watches it; made once, first thing in `setup`."""

    params: FullFinetuneParams  # or DummyParams: the dummy recipe starts a run the same way
    dist: DistInfo
    device: torch.device
    dtype: torch.dtype
    output_dir: Path
    monitor: JobMonitor
    lock: Optional[OutputDirLock] = None  # rank 0's hold on output_dir; None on the other ranks
    events: EventLog = field(default_factory=EventLog.disabled)  # output_dir/events.jsonl and its sinks
    resume: Optional[ResumePoint] = None  # the checkpoint a resumed run continues from
    earlier_record: Optional[EarlierRecord] = None  # rank 0 of a resumed run: put back if the resume is refused
    writing_results: bool = False  # set by the loop once it writes params.yaml and metrics: no going back
    refused: bool = False
    closers: list[Callable[[], None]] = field(default_factory=list)

    @property
    def rank_zero(self) -> bool:
        return self.dist.rank == 0

    def log(self, message: str) -> None:
        if self.rank_zero:
            tqdm.write(message, file=sys.stderr)

    def load_weights(
        self, args: ModelArgs, weights_dir: Optional[Path], checkpoint_format: str
    ) -> dict[str, torch.Tensor]:
        """The starting weights in the run's dtype, read (or seeded) by rank 0 only; {} elsewhere."""
        return run_on_rank_zero(
            lambda: initial_state_dict(
                args,
                weights_dir=weights_dir,
                checkpoint_format=checkpoint_format,
                dtype=self.dtype,
                seed=self.params.seed,
            ),
            default={},
        )

    def prepare_model(
        self,
        args: ModelArgs,
        state_dict: dict[str, torch.Tensor],
        adapt: Optional[ModuleHook] = None,
        initialize: Optional[ModuleHook] = None,
    ) -> TransformerDecoder:
        """The model on this run's device, with the params' memory features, compiled and sharded."""
        p = self.params
        return prepare_model(
            args,
            state_dict,
            dist=self.dist,
            device=self.device,
            dtype=self.dtype,
            activation_checkpointing=p.enable_activation_checkpointing,
            compile=p.compile,
            reshard_after_forward=p.reshard_after_forward,
            cpu_offload=p.cpu_offload,
            adapt=adapt,
            initialize=initialize,
        )

    def fail(self, error: BaseException) -> None:
        """Record why the run ended before finishing: a stop asked for is no failure."""
        exit_if_launcher_gone()
        if isinstance(error, KeyboardInterrupt):
            self.monitor.stopped("stopped")
        elif isinstance(error, Preempted) and self.dist.is_distributed and peer_stopped_on_user_error():
            # torchrun stops the other workers with SIGTERM when one stops on an input error.
            message = "another process stopped on an input error; its error: line says what to fix"
            self.monitor.fail(message)
            self.events.error(message)
        elif isinstance(error, Preempted):
            self.monitor.stopped("preempted")
        else:
            self.refused = isinstance(error, UserError) and not self.writing_results
            self.monitor.fail(str(error) or type(error).__name__)
            self.events.error(error)

    def record_launcher_death(self, message: str) -> None:
        """The run's end when its launcher died: the worker exits at once after this (no close)."""
        self.monitor.fail(message)
        self.events.error(message)
        self.events.job_end("failed")
        self.events.close(timeout_s=1.0)

    def close(self) -> None:
        for close in self.closers:
            close()
        self.monitor.close()
        self.events.job_end(self.monitor.status.get("state", "failed"))
        self.events.close()
        if self.refused and self.earlier_record is not None:
            self.earlier_record.restore()
        if self.lock is not None:  # last: the monitor's final write is still this run's
            self.lock.release()


def start_run(
    params: FullFinetuneParams | DummyParams,
    adapter_settings: Optional[Sequence[str]] = None,
    recipe_settings: Sequence[str] = (),
) -> RunContext:
    """Join the process group, pick device and dtype, seed, claim and lock output_dir, plan the
    resume (`run.resume`), start the monitor. `adapter_settings`: a LoRA recipe's adapter keys,
    which a resumed run must keep (None for a recipe that trains the whole model); `recipe_settings`:
    the recipe's own keys a resumed run must keep."""
    params.check()  # a notebook may have changed a field since the params were built
    dist = init_distributed(resolve_device(params.device).type)
    device = resolve_device(params.device, dist.local_rank)
    dtype = resolve_run_dtype(params.dtype, device)
    seed_everything(params.seed, dist.rank)
    output_dir = Path(params.output_dir)
    # The event sinks first: a missing optional client fails before the folder is claimed.
    sinks = run_on_rank_zero(lambda: build_sinks(params), default=[])
    # Rank 0 claims the folder for the whole run before anything writes there (the monitor's
    # status.json first); a refusal stops every rank with the same line.
    lock = run_on_rank_zero(lambda: claim_output_dir(output_dir, resume=params.resume_from_checkpoint), default=None)
    try:
        # Every refusal of a resume comes before the first write: the earlier run's record stays as it was.
        resume = None
        if isinstance(params, FullFinetuneParams) and params.resume_from_checkpoint:
            log = partial(tqdm.write, file=sys.stderr) if dist.rank == 0 else _quiet
            resume = plan_resume(
                params,
                output_dir,
                world_size=dist.world_size,
                adapter_settings=adapter_settings,
                log=log,
                recipe_settings=recipe_settings,
            )
        earlier_record = None
        if lock is not None:
            remove_leftovers(output_dir)  # of saves a kill interrupted
            if resume is not None:
                earlier_record = EarlierRecord.read(output_dir)
        monitor = JobMonitor(output_dir, rank=dist.rank, heartbeat_interval_s=params.heartbeat_interval_s)
        events = start_events(params, output_dir, dist.rank, sinks)
    except BaseException:
        for sink in sinks:
            sink.close(timeout_s=0)
        if lock is not None:  # no run holds the folder now (a notebook may start the next one)
            lock.release()
        raise
    run = RunContext(params, dist, device, dtype, output_dir, monitor, lock, events=events, resume=resume)  # type: ignore[arg-type]
    run.earlier_record = earlier_record
    run.closers.append(on_launcher_death(run.record_launcher_death))
    if run.rank_zero:
        run.log(str(params))
    return run


def _quiet(message: str) -> None:
    """Where the other ranks' copies of rank 0's lines go."""


def build_sinks(params: FullFinetuneParams | DummyParams) -> list[Sink]:
    """The event sinks the params ask for: events_webhook, events_redis_url and events_redis_channel."""
    return sinks_for(params.events_webhook, params.events_redis_url, params.events_redis_channel)


def start_events(params: FullFinetuneParams | DummyParams, output_dir: Path, rank: int, sinks: list[Sink]) -> EventLog:
    """The run's event log handing its records to `sinks`, begun with job_start, system and config."""
    events = EventLog(output_dir, rank=rank, sinks=sinks)
    # FullFinetuneParams -> full_finetune, LoraFinetuneParams -> lora_finetune, DummyParams -> dummy
    recipe = re.sub(r"(?<!^)(?=[A-Z])", "_", type(params).__name__.removesuffix("Params")).lower()
    events.job_start(recipe)
    events.system()
    events.config(params.to_dict())
    return events


def close_run(run: Optional[RunContext]) -> None:
    """End what `start_run` began, also after a setup that failed before or after it."""
    if run is not None:
        run.close()
    destroy_distributed()


@dataclass
class ModelSource:
    """The architecture and tokenizer a run trains with, and the checkpoint they came from."""

    args: ModelArgs
    tokenizer: Tokenizer
    tokenizer_file: Path
    checkpoint_dir: Optional[Path]

    def output_extras(self) -> dict:
        """What a written model needs beside its weights to load like its source (tokenizer files,
        generation settings); the keyword arguments of save_hf_checkpoint."""
        t = self.tokenizer
        return hf_output_extras(self.checkpoint_dir, self.tokenizer_file, t.bos_id, t.stop_tokens, t.family)


def load_model_source(params: FullFinetuneParams) -> ModelSource:
    """The model's architecture (from the registry or the checkpoint's config) and its tokenizer."""
    checkpoint_dir = resolve_path(params.checkpoint_dir) if params.checkpoint_dir else None
    args = resolve_model_args(params.model, checkpoint_dir, params.checkpoint_format)
    if params.max_seq_len > args.max_seq_len:
        model = f"model {params.model}" if params.model != "auto" else f"the model in {checkpoint_dir}"
        raise UserError(
            f"max_seq_len={params.max_seq_len} exceeds the {args.max_seq_len} positions {model} was built for "
            f"(max_position_embeddings); set max_seq_len={args.max_seq_len} or less"
        )
    tokenizer_path = resolve_path(params.tokenizer_path or params.checkpoint_dir)  # type: ignore[arg-type]
    tokenizer = load_tokenizer_for_model(tokenizer_path, args.family, args.vocab_size)
    return ModelSource(args, tokenizer, resolve_tokenizer_path(tokenizer_path, args.family), checkpoint_dir)
