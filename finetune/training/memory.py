"""Peak memory, reported with the training metrics."""

import resource
import sys

import torch


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process in GiB: CUDA max allocated, or peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is KiB on Linux and bytes on macOS.
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20


def reset_peak_memory(device: torch.device) -> None:
    """Start a new CUDA peak window (CPU peak RSS cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
