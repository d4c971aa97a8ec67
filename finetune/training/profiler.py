"""torch.profiler over a few training steps, written as a Chrome trace.

Traces land in `output_dir/profile/` (open in chrome://tracing or Perfetto). Call `.step()`
once per optimizer step; the schedule skips `wait` steps, warms up for `warmup`, then
records `active` steps once.
"""

from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile, schedule


class NoOpProfiler:
    def __enter__(self) -> "NoOpProfiler":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def step(self) -> None:
        pass


def build_profiler(
    enabled: bool,
    output_dir: Path | str,
    *,
    wait: int = 1,
    warmup: int = 1,
    active: int = 2,
    rank: Optional[int] = None,
) -> Any:
    """A context manager with `.step()`; a no-op object when `enabled` is false.

    Each rank writes its own trace file (`rank` defaults to this process's distributed rank).
    """
    if not enabled:
        return NoOpProfiler()
    if rank is None:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    trace_dir = Path(output_dir) / "profile"
    trace_dir.mkdir(parents=True, exist_ok=True)
    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)

    def write_trace(prof: profile) -> None:
        prof.export_chrome_trace(str(trace_dir / f"rank{rank}_step{prof.step_num}.json"))

    return profile(
        activities=activities,
        schedule=schedule(wait=wait, warmup=warmup, active=active, repeat=1),
        on_trace_ready=write_trace,
        record_shapes=True,
        profile_memory=True,
        with_stack=False,
    )
