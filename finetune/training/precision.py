"""Training dtype: fp32, or bf16 everywhere.

The policy, as torchtune's: with `dtype=bf16` the model weights, their gradients and the
optimizer state are all bf16. There is no fp32 master copy and no autocast; the model is cast
once after loading and every step computes and updates in bf16. This halves memory for weights,
grads and optimizer state against fp32, at the cost of rounding in the update, which is fine for
fine-tuning at usual learning rates. Numerically sensitive reductions upcast locally (for
example, the loss computes cross-entropy in fp32, one chunk at a time).

`fp32` is the reference and what CPU runs use: bf16 matmuls on CPUs without native bf16 units
are emulated and many times slower, though they are correct.
"""

import torch

from finetune.errors import UserError

# What a config's `dtype` may say; "auto" is bf16 on a GPU and fp32 on a CPU (see resolve_run_dtype).
DTYPES = ("auto", "fp32", "bf16")

_NAMES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """Map a config's dtype name to a torch.dtype, checking that `device` can compute in it."""
    dtype = _NAMES.get(name)
    if dtype is None:
        raise UserError(f"unknown dtype {name!r}; use fp32 or bf16")
    if dtype is torch.bfloat16 and device.type == "cuda":
        # Emulated bf16 (pre-Ampere GPUs) runs but is slower than fp32: treat it as unsupported.
        if not torch.cuda.is_bf16_supported(including_emulation=False):
            gpu = torch.cuda.get_device_name(device)
            raise UserError(f"dtype=bf16 was requested but GPU {gpu} has no bf16 support; set dtype=fp32")
    return dtype


def resolve_run_dtype(name: str, device: torch.device) -> torch.dtype:
    """Like `resolve_dtype`, plus "auto": bf16 on a GPU, fp32 on a CPU, where bf16 matmuls are
    emulated and ~20x slower without bf16 units."""
    if name == "auto":
        name = "bf16" if device.type == "cuda" else "fp32"
    return resolve_dtype(name, device)
