"""Post-training quantization: the schemes, which layers they quantize, and GPTQ.

Every torchao call goes through `finetune.ao`; this module holds what is ours: which layers
are quantized and the GPTQ column updates. Quantized checkpoints are written and read by
`finetune.checkpointing.quantized`; perplexity is measured by `finetune.evaluation.perplexity`.
"""

from __future__ import annotations

import difflib
from typing import Callable, Optional, Sequence

import torch
from torch import nn
from tqdm import tqdm

from finetune import ao
from finetune.errors import UserError
from finetune.models import TransformerDecoder

SCHEMES = ("int8_weight_only", "int8_dynamic", "int4_weight_only", "gptq_int4")
GROUPED_SCHEMES = ("int4_weight_only", "gptq_int4")
GROUP_SIZES = (32, 64, 128, 256)  # input weights sharing one scale in the int4 schemes

Log = Callable[[str], None]


def check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        close = difflib.get_close_matches(scheme, SCHEMES, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise UserError(f"quantization scheme '{scheme}' is unknown; choose one of {', '.join(SCHEMES)}{hint}")
    return scheme


# ----------------------------------------------------------------------------------------------
# Which layers, and quantizing them
# ----------------------------------------------------------------------------------------------


def linears_to_quantize(model: TransformerDecoder) -> list[str]:
    """Every linear layer, the output head included unless it shares the embeddings' weight
    (quantizing it would untie it and keep a full-precision copy for the embedding lookup)."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    return [n for n in names if not (n == "output" and model.args.tie_embeddings)]


def check_group_size(model: TransformerDecoder, names: Sequence[str], group_size: int) -> None:
    widths = sorted({model.get_submodule(name).in_features for name in names})
    for name in names:
        in_features = model.get_submodule(name).in_features
        if in_features % group_size:
            fitting = [str(g) for g in GROUP_SIZES if all(w % g == 0 for w in widths)]
            raise UserError(
                f"group_size={group_size} does not divide the {in_features} input features of layer {name}; "
                f"use a group size that divides every layer's input width"
                + (f": {', '.join(fitting)}" if fitting else "")
            )


def check_scheme_device(scheme: str, device: torch.device, dtype: torch.dtype) -> None:
    """Combinations torchao cannot run, caught before any weight is read."""
    if scheme == "int4_weight_only" and device.type == "cuda" and dtype != torch.bfloat16:
        raise UserError(
            "int4_weight_only on a GPU runs torchao's tinygemm kernel, which needs bf16 weights; set dtype=bf16"
        )


def quantize_model(
    model: TransformerDecoder,
    scheme: str,
    *,
    group_size: int,
    calibration: Sequence[torch.Tensor] = (),
    percdamp: float = 0.01,
    log: Optional[Log] = None,
) -> list[str]:
    """Quantize the model's linear layers in place; returns their names.

    `calibration` (token-id rows on the model's device) is what GPTQ minimises the layers'
    output error on; the other schemes round each weight on its own and ignore it.
    """
    check_scheme(scheme)
    names = linears_to_quantize(model)
    if scheme in GROUPED_SCHEMES:
        check_group_size(model, names, group_size)
    if scheme == "gptq_int4":
        if not calibration:
            raise UserError(
                "scheme=gptq_int4 needs calibration data; set calibration_dataset (and calibration_samples)"
            )
        gptq_quantize_(model, calibration, names, group_size=group_size, percdamp=percdamp, log=log)
        return names
    device = model.tok_embeddings.weight.device
    check_scheme_device(scheme, device, model.tok_embeddings.weight.dtype)
    wanted = set(names)
    ao.quantize_modules_(model, ao.ptq_config(scheme, group_size, device), lambda module, fqn: fqn in wanted)
    return names


# ----------------------------------------------------------------------------------------------
# GPTQ (Frantar et al. 2022): quantize a weight column by column, each rounding error spread over
# the columns not yet quantized, weighted by the inverse Hessian of the layer's inputs, so that
# the layer's outputs on the calibration data move as little as possible.
# ----------------------------------------------------------------------------------------------


def gptq_int4_weight(
    weight: torch.Tensor, hessian: torch.Tensor, group_size: int, *, percdamp: float = 0.01, block_size: int = 128
) -> torch.Tensor:
    """torchao int4 weight for `weight` [N, K], given the Hessian [K, K] of the layer's inputs.

    Each group's grid (scale and zero point) is fixed when GPTQ reaches the group's first
    column, from the weights as already updated by earlier rounding errors.
    """
    dtype = weight.dtype
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    n_rows, n_cols = w.shape
    dead = h.diagonal() == 0  # inputs that were always zero: any weight there is as good as 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h.diagonal().add_(percdamp * h.diagonal().mean())
    # Upper Cholesky factor of H^-1: row i holds the update that column i's error spreads forward.
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    codes = torch.empty(n_rows, n_cols, dtype=torch.int8, device=w.device)
    scales = torch.empty(n_rows, n_cols // group_size, dtype=torch.float32, device=w.device)
    zeros = torch.empty(n_rows, n_cols // group_size, dtype=torch.int8, device=w.device)
    block = max(1, block_size // group_size) * group_size  # whole groups per block
    for start in range(0, n_cols, block):
        end = min(start + block, n_cols)
        w_block = w[:, start:end]  # a view: updates land in w
        errors = torch.zeros_like(w_block)
        h_inv_block = h_inv[start:end, start:end]
        for i in range(end - start):
            column = start + i
            if column % group_size == 0:
                scale, zero = ao.int4_group_grid(w_block[:, i : i + group_size])
                scale = scale.to(dtype).float()  # the precision the model will dequantize with
                scales[:, column // group_size], zeros[:, column // group_size] = scale[:, 0], zero[:, 0]
            q, dq = ao.int4_round(w_block[:, i : i + 1], scale, zero)
            codes[:, column] = q[:, 0]
            error = (w_block[:, i] - dq[:, 0]) / h_inv_block[i, i]
            w_block[:, i:] -= error[:, None] * h_inv_block[i, i:][None, :]
            errors[:, i] = error
        w[:, end:] -= errors @ h_inv[start:end, end:]
    return ao.int4_weight(codes, scales, zeros, group_size, dtype)


def _gptq_convert_(model: nn.Module, names: Sequence[str], group_size: int, percdamp: float) -> None:
    for name in names:
        linear = model.get_submodule(name)
        weight, hessian, seen = ao.gptq_observed(linear)
        if seen == 0:
            raise RuntimeError(f"GPTQ saw no inputs for {name}")
        quantized = gptq_int4_weight(weight, hessian, group_size, percdamp=percdamp)
        linear.weight = nn.Parameter(quantized, requires_grad=False)


@torch.no_grad()
def gptq_quantize_(
    model: TransformerDecoder,
    calibration: Sequence[torch.Tensor],
    names: Sequence[str],
    *,
    group_size: int,
    percdamp: float = 0.01,
    log: Optional[Log] = None,
) -> None:
    """GPTQ one decoder layer at a time: each layer is calibrated on the outputs of the layers
    before it *after* they were quantized, so later layers learn to absorb earlier errors.
    Samples run one at a time: no padding reaches the Hessians."""
    hidden = [model.tok_embeddings(tokens[None]) for tokens in calibration]
    ropes = [model.rope(torch.arange(len(t), device=t.device)[None], h.dtype) for t, h in zip(calibration, hidden)]
    for index, layer in enumerate(tqdm(model.layers, desc="gptq", disable=log is None)):
        layer_names = [n for n in names if n.startswith(f"layers.{index}.")]
        for name in layer_names:
            ao.gptq_observe_(model.get_submodule(name))
        for h, rope in zip(hidden, ropes):
            layer(h, rope)
        _gptq_convert_(model, layer_names, group_size, percdamp)
        hidden = [layer(h, rope) for h, rope in zip(hidden, ropes)]
    if "output" in names:
        ao.gptq_observe_(model.output)
        for h in hidden:
            model.output(model.norm(h))
        _gptq_convert_(model, ["output"], group_size, percdamp)
