"""Messages about the data, said once by rank 0 rather than once per process."""

import logging
from typing import Callable, Optional

import torch.distributed as dist

LogFn = Callable[[str], None]

logger = logging.getLogger("finetune.data")


def is_rank_zero() -> bool:
    """True outside distributed runs and on the first process of one."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def rank_zero_log(log: Optional[LogFn]) -> LogFn:
    """`log` (default: the `finetune.data` logger) on rank 0, silence elsewhere."""
    if not is_rank_zero():
        return lambda message: None
    return log if log is not None else logger.info
