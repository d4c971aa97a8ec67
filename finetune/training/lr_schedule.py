"""Learning-rate schedules: linear warmup, then cosine or linear decay to 0, or constant.

Each is a `LambdaLR` whose multiplier depends only on the step count, so resuming needs just
`scheduler.state_dict()` (the step count and base learning rates).
"""

import math
from typing import Callable, Optional

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from finetune.errors import UserError

SCHEDULES = ("cosine", "linear", "constant")


def _multiplier(name: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    decay_steps = max(1, total_steps - warmup_steps)

    def warmup(step: int) -> float:
        # Step 0 takes a small nonzero lr: a zero first step would waste a batch.
        return (step + 1) / (warmup_steps + 1)

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return warmup(step)
        progress = min(1.0, (step - warmup_steps) / decay_steps)
        if name == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if name == "linear":
            return 1.0 - progress
        return 1.0

    return schedule


def build_lr_scheduler(
    name: str, optimizer: Optimizer, *, warmup_steps: int, total_steps: int, log: Optional[Callable[[str], None]] = None
) -> LambdaLR:
    """Scheduler that multiplies each group's base lr; call `.step()` once per optimizer step.

    A run no longer than its warm-up (a quick trial with max_steps_per_epoch) only warms up.
    """
    if name not in SCHEDULES:
        raise UserError(f"unknown lr_scheduler {name!r}; use one of: {', '.join(SCHEDULES)}")
    if warmup_steps < 0:
        raise UserError(f"warmup_steps must be >= 0, got {warmup_steps}; set warmup_steps=0 or more")
    if total_steps <= warmup_steps and log is not None:
        log(f"the run ({total_steps} steps) ends within warmup_steps ({warmup_steps}): the lr only warms up")
    return LambdaLR(optimizer, _multiplier(name, warmup_steps, total_steps))
