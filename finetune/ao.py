"""The one door to torchao: every torchao import in this package goes through here.

torchao moves its paths between releases, so callers use these small functions and only this
file changes when it does. torchao is imported lazily (it is slow to import and optional).
"""

import contextlib
import importlib
import logging
import os
import sys
import warnings
from types import ModuleType
from typing import Iterable, Iterator, Optional

import torch

from finetune.errors import UserError


@contextlib.contextmanager
def _quiet_loggers(*names: str) -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _import(module: str, feature: str) -> ModuleType:
    if not torch.cuda.is_available():
        # torchao's compiled extensions are CUDA builds; on CPU they only fail to load, noisily.
        os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
    try:
        with _quiet_loggers("torchao", "torch.utils._pytree"):
            return importlib.import_module(module)
    except ImportError as e:
        raise UserError(
            f"{feature} needs torchao, which failed to import ({e}); install it with `pip install torchao`"
        ) from None


def low_bit_adamw(bits: int, params: Iterable, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """torchao's AdamW with optimizer state quantised to `bits` (8 or 4) bits, blockwise."""
    if bits not in (8, 4):
        raise UserError(f"low-bit AdamW has 8 or 4 bits, not {bits}; use optimizer=adamw8bit or adamw4bit")
    optim = _import("torchao.optim", f"optimizer=adamw{bits}bit")
    # Raised by torch.compile on the first step for torchao's state subclasses; not actionable.
    warnings.filterwarnings("ignore", message=r".*does not implement _stable_hash_for_caching")
    cls = optim.AdamW8bit if bits == 8 else optim.AdamW4bit
    return cls(params, lr=lr, weight_decay=weight_decay)


# ----- NF4 (QLoRA base weights) -----

_NF4_MODULE = "torchao.quantization"


def _largest_divisor_at_most(n: int, limit: int) -> int:
    return next(d for d in range(min(n, limit), 0, -1) if n % d == 0)


def to_nf4(tensor: torch.Tensor, block_size: int = 64, scaler_block_size: int = 256) -> torch.Tensor:
    """`tensor` as torchao's NF4Tensor: 4-bit codes per element, an int8 scale per `block_size`
    elements, and the scales double-quantised per `scaler_block_size` scales.

    torchao needs the number of scales to divide evenly into scaler blocks; published Llama
    shapes always do, small test shapes may not, so those get the largest scaler block that fits
    (a few more bytes of scales, the same 4-bit codes).
    """
    if tensor.numel() % block_size != 0:
        raise UserError(
            f"cannot quantize a weight of shape {list(tensor.shape)} to NF4: its {tensor.numel()} elements are not a "
            f"multiple of the block size {block_size}; leave this layer unquantized or use a model with rounder dimensions"
        )
    n_blocks = tensor.numel() // block_size
    scaler_block_size = _largest_divisor_at_most(n_blocks, scaler_block_size)
    quantization = _import(_NF4_MODULE, "quantize_base (QLoRA)")
    return quantization.to_nf4(tensor, block_size, scaler_block_size)


def is_nf4(tensor: torch.Tensor) -> bool:
    """True for torchao's NF4Tensor. Never imports torchao (this runs in every forward): an NF4Tensor
    can only exist once its package has been imported."""
    nf4_class = getattr(sys.modules.get(_NF4_MODULE), "NF4Tensor", None)
    return nf4_class is not None and isinstance(tensor, nf4_class)


def nf4_dequantize(tensor: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """A plain tensor of the NF4 tensor's values, in its original dtype unless `dtype` is given."""
    return tensor.get_original_weight() if dtype is None else tensor.to(dtype)


def nf4_nbytes(tensor: torch.Tensor) -> int:
    """Bytes an NF4 tensor holds: the packed 4-bit codes plus the block scales and lookup table."""
    names, _ = tensor.__tensor_flatten__()
    return sum(getattr(tensor, name).numel() * getattr(tensor, name).element_size() for name in names)


def nf4_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ dequantize(weight).T. F.linear on an NF4Tensor dispatches to torchao's NF4 linear, whose
    backward gives the input its gradient without ever keeping a dequantized copy of the weight."""
    return torch.nn.functional.linear(x, weight)
