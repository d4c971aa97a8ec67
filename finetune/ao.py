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
            f"multiple of the block size {block_size}; "
            "leave this layer unquantized or use a model with rounder dimensions"
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


# ----- Post-training quantization (tune quantize) -----

_QUANT = "torchao.quantization"
_SAFETENSORS = "torchao.prototype.safetensors.safetensors_support"
_INT4_MIN, _INT4_MAX = -8, 7


def torchao_version() -> str:
    return getattr(_import("torchao", "quantization"), "__version__", "unknown")


def ptq_config(scheme: str, group_size: int, device: torch.device):
    """torchao's config for a post-training scheme: int8_weight_only, int8_dynamic or int4_weight_only.

    int4 has two routes: on CUDA torchao's tinygemm kernel (bf16 weights, packed 4-bit); on CPU
    torchao's intx weights (4-bit values kept one per int8, asymmetric per group, dequantized
    in the matmul), the only int4 layout whose kernels run there.
    """
    q = _import(_QUANT, f"scheme={scheme}")
    if scheme == "int8_weight_only":
        return q.Int8WeightOnlyConfig()
    if scheme == "int8_dynamic":
        return q.Int8DynamicActivationInt8WeightConfig()
    if scheme == "int4_weight_only":
        if device.type == "cuda":
            return q.Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d")
        return q.IntxWeightOnlyConfig(
            weight_dtype=torch.int4, granularity=q.PerGroup(group_size), mapping_type=q.MappingType.ASYMMETRIC
        )
    raise ValueError(f"no torchao config for scheme {scheme!r}")


def hf_quantization_config(config) -> dict:
    """The `quantization_config` of config.json with which transformers loads torchao's
    flattened safetensors of `config`'s scheme (its torchao quantizer, `quant_method` torchao)."""
    core = _import("torchao.core.config", "quantization")
    return {
        "quant_method": "torchao",
        "quant_type": {"default": core.config_to_dict(config)},
        "modules_to_not_convert": None,
        "include_input_output_embeddings": False,
        "untie_embedding_weights": False,
    }


def quantize_modules_(model: torch.nn.Module, config, filter_fn) -> None:
    """torchao's `quantize_` on the modules for which `filter_fn(module, fqn)` is true (in place)."""
    q = _import(_QUANT, "quantization")
    q.quantize_(model, config, filter_fn=filter_fn)


def is_quantized(tensor: torch.Tensor) -> bool:
    """True for a torchao quantized weight (any of its tensor subclasses)."""
    utils = sys.modules.get("torchao.utils")
    base = getattr(utils, "TorchAOBaseTensor", None)
    return base is not None and isinstance(tensor, base)


def quantized_nbytes(tensor: torch.Tensor) -> int:
    """Bytes a (possibly quantized) tensor holds in memory: its inner tensors for torchao's."""
    if not is_quantized(tensor):
        return tensor.numel() * tensor.element_size()
    names, _ = tensor.__tensor_flatten__()
    return sum(quantized_nbytes(getattr(tensor, name)) for name in names if getattr(tensor, name) is not None)


def flatten_quantized(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """(plain tensors, string metadata, names of int4 code tensors) for a safetensors file.

    torchao writes each quantized weight `a.b.weight` as `a.b._weight_<part>` tensors plus a
    JSON description under `a.b.weight`; the int4 codes it keeps one per byte are named so
    that the caller can pack them two per byte on disk.
    """
    support = _import(_SAFETENSORS, "saving a quantized checkpoint")
    tensors, metadata = support.flatten_tensor_state_dict(state_dict)
    int4_codes = []
    for name, tensor in state_dict.items():
        if getattr(tensor, "target_dtype", None) == torch.int4 and hasattr(tensor, "qdata"):
            module, _, leaf = name.rpartition(".")
            int4_codes.append(f"{module}._{leaf}_qdata")
    return tensors, metadata, int4_codes


def unflatten_quantized(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, torch.Tensor]:
    """Inverse of `flatten_quantized` (after the caller unpacked any int4 codes)."""
    support = _import(_SAFETENSORS, "loading a quantized checkpoint")
    state_dict, leftover = support.unflatten_tensor_state_dict(tensors, metadata)
    if leftover:
        raise ValueError(f"tensors without a description in the metadata: {sorted(leftover)[:3]}")
    return state_dict


# ----- GPTQ -----
# torchao 0.18's GPTQ collects each linear's input Hessian with an observer tensor that runs on any
# device, but its convert step asserts CUDA and its int4 target needs the `mslk` package. The
# observer is used as is; the GPTQ column updates (finetune.quantization) quantize onto the same
# int4 grid as int4_weight_only on CPU through the primitives below, so the result is an ordinary
# torchao int4 weight that saves, loads and runs like one.


def gptq_observe_(linear: torch.nn.Module) -> None:
    """Make `linear` record the Hessian 2·XᵀX/n of its inputs in later forwards (outputs unchanged)."""
    observer = _import("torchao.prototype.gptq.observer", "scheme=gptq_int4").GPTQObserverTensor
    linear.weight = torch.nn.Parameter(observer.from_hp(linear.weight.detach().contiguous()), requires_grad=False)


def gptq_observed(linear: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(original weight, Hessian, number of forward calls seen) of an observed linear."""
    weight = linear.weight
    return weight.hp_data, weight.hessian, int(weight.total_batches.sum())


def int4_group_grid(group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric int4 scale and zero point for each row of `group` [N, g]: both [N, 1]."""
    primitives = _import("torchao.quantization.quant_primitives", "scheme=gptq_int4")
    return primitives.choose_qparams_affine(
        group,
        _import(_QUANT, "scheme=gptq_int4").MappingType.ASYMMETRIC,
        (1, group.shape[1]),
        target_dtype=torch.int8,
        quant_min=_INT4_MIN,
        quant_max=_INT4_MAX,
        zero_point_dtype=torch.int8,
        keepdim=True,
    )


def int4_round(
    column: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(int4 codes as int8, their dequantized values) of `column` [N, 1] on the grid (scale, zero_point)."""
    primitives = _import("torchao.quantization.quant_primitives", "scheme=gptq_int4")
    codes = primitives.quantize_affine(column, (1, 1), scale, zero_point, torch.int8, _INT4_MIN, _INT4_MAX)
    values = primitives.dequantize_affine(
        codes, (1, 1), scale, zero_point, torch.int8, _INT4_MIN, _INT4_MAX, output_dtype=torch.float32
    )
    return codes, values


def int4_weight(
    codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, group_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """torchao's int4 weight (the CPU int4_weight_only layout) from codes [N, K] and per-group grids [N, K/g]."""
    q = _import(_QUANT, "scheme=gptq_int4")
    return q.IntxUnpackedToInt8Tensor(
        qdata=codes,
        scale=scale.to(dtype),
        zero_point=zero_point,
        target_dtype=torch.int4,
        block_size=(1, group_size),
        dtype=dtype,
        activation_quantization=None,
    )
