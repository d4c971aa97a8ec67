"""Post-training quantization: schemes, GPTQ, perplexity, and quantized checkpoints in and out.

Every torchao call goes through `finetune.ao`; this module holds what is ours: which layers
are quantized, the GPTQ column updates, the on-disk layout, and how a quantized directory is
loaded back by `generate` and `eleuther_eval`.

A quantized checkpoint directory holds
  model.safetensors   torchao's flattened tensors under Hugging Face names, with their JSON
                      descriptions in the file's metadata (no pickle: loading runs no code);
                      int4 codes, which torchao keeps one per byte on CPU, packed two per byte
  quantization.json   scheme, group size, torchao version, dtype and the measured numbers
  config.json, generation_config.json, tokenizer files   so the directory describes itself;
                      for the int8 schemes config.json carries transformers' torchao
                      `quantization_config`, so AutoModelForCausalLM loads the directory as is
"""

from __future__ import annotations

import difflib
import json
import math
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from finetune import ao
from finetune.checkpointing.formats import detect_format, hf_weight_files, meta_weight_files
from finetune.checkpointing.key_mapping import from_hf_name, to_hf_name
from finetune.checkpointing.model_configs import HF_CONFIG, model_args_from_hf_config, read_json
from finetune.checkpointing.safetensors_io import iter_safetensors, read_header, save_safetensors
from finetune.checkpointing.writers import write_beside_weights
from finetune.data import IGNORE_INDEX, collate
from finetune.errors import UserError
from finetune.models import ModelArgs, TransformerDecoder
from finetune.params import GROUP_SIZES

SCHEMES = ("int8_weight_only", "int8_dynamic", "int4_weight_only", "gptq_int4")
GROUPED_SCHEMES = ("int4_weight_only", "gptq_int4")
HF_LOADABLE_SCHEMES = ("int8_weight_only", "int8_dynamic")  # transformers loads these outputs as they are
QUANTIZATION_FILE = "quantization.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1
_PACKED_INT4 = "finetune.packed_int4"  # safetensors metadata key: names of int4 codes stored two per byte

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
        raise UserError("int4_weight_only on a GPU runs torchao's tinygemm kernel, which needs bf16 weights; set dtype=bf16")


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
            raise UserError("scheme=gptq_int4 needs calibration data; set calibration_dataset (and calibration_samples)")
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


# ----------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------


@torch.inference_mode()
def perplexity(model: TransformerDecoder, samples: Sequence[dict[str, list[int]]], *, batch_size: int, pad_id: int) -> tuple[float, int]:
    """(exp of the mean next-token loss over labelled tokens, number of those tokens).

    Logits are computed only where there is a label, a chunk at a time: with a 128k vocabulary
    a whole batch of fp32 logits would not fit beside an 8B model.
    """
    device = model.tok_embeddings.weight.device
    total, count = 0.0, 0
    for start in range(0, len(samples), batch_size):
        batch = collate(samples[start : start + batch_size], pad_id=pad_id)
        labels = batch["labels"].to(device)
        hidden = model(batch["tokens"].to(device), return_hidden=True)
        keep = labels != IGNORE_INDEX
        for h, y in zip(hidden[keep].split(1024), labels[keep].split(1024)):
            total += F.cross_entropy(model.output(h).float(), y, reduction="sum").item()
        count += int(keep.sum())
    if count == 0:
        raise UserError("the evaluation data has no labelled tokens to measure perplexity on; check eval_dataset")
    return math.exp(total / count), count


def weights_size(directory: Union[str, Path]) -> int:
    """Bytes of a checkpoint's weight files (Hugging Face, Meta or quantized)."""
    directory = Path(directory)
    if is_quantized_checkpoint(directory):
        return (directory / WEIGHTS_FILE).stat().st_size
    files = hf_weight_files(directory) if detect_format(directory) == "hf" else meta_weight_files(directory)
    return sum(p.stat().st_size for p in files)


def format_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    size, unit = next((n / 1024**k, u) for k, u in ((3, "GiB"), (2, "MiB"), (1, "KiB")) if n >= 1024**k)
    return f"{size:.1f} {unit}"


# ----------------------------------------------------------------------------------------------
# Saving and loading
# ----------------------------------------------------------------------------------------------


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-8, 7], last dim even -> uint8 with two codes per byte (low nibble first)."""
    unsigned = (codes.to(torch.int16) + 8).to(torch.uint8)
    return unsigned[..., 0::2] | (unsigned[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    low, high = packed & 0xF, packed >> 4
    return torch.stack([low, high], dim=-1).flatten(-2).to(torch.int8) - 8


def save_quantized_checkpoint(
    model: TransformerDecoder,
    out_dir: Union[str, Path],
    record: dict[str, Any],
    **beside: Any,
) -> Path:
    """Write the quantized model and its description into `out_dir` (see the module docstring);
    `beside` is what `write_beside_weights` takes (tokenizer files, bos/eos ids, ...)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    args = model.args
    state = {name: tensor for name, tensor in model.state_dict().items()
             if not (args.tie_embeddings and name == "output.weight")}
    tensors, metadata, int4_codes = ao.flatten_quantized({to_hf_name(k): v for k, v in state.items()})
    packed = [name for name in int4_codes if tensors[name].shape[-1] % 2 == 0]
    for name in packed:
        tensors[name] = pack_int4(tensors[name])
    if packed:
        metadata[_PACKED_INT4] = json.dumps(packed)
    save_safetensors(tensors, out / WEIGHTS_FILE, metadata=metadata)
    size = (out / WEIGHTS_FILE).stat().st_size

    dtype = model.tok_embeddings.weight.dtype
    write_beside_weights(out, args, dtype, **beside)
    if record["scheme"] in HF_LOADABLE_SCHEMES:
        # int8 weights are torchao's own layout, which transformers reads given this entry. The
        # int4 codes are packed two per byte, a layout of ours: those load here only.
        config = read_json(out / HF_CONFIG)
        config["quantization_config"] = ao.hf_quantization_config(ao.ptq_config(record["scheme"], 0, torch.device("cpu")))
        _write_json(out / HF_CONFIG, config)
    _write_json(out / QUANTIZATION_FILE, {
        "format_version": FORMAT_VERSION, "torchao_version": ao.torchao_version(),
        "dtype": str(dtype).removeprefix("torch."), "weights": WEIGHTS_FILE, "size_bytes": size, **record,
    })
    return out


def _write_json(path: Path, values: dict[str, Any]) -> None:
    path.write_text(json.dumps(values, indent=2) + "\n", encoding="utf-8")


def is_quantized_checkpoint(directory: Union[str, Path]) -> bool:
    return (Path(directory) / QUANTIZATION_FILE).is_file()


def read_quantization_record(directory: Union[str, Path]) -> dict[str, Any]:
    path = Path(directory) / QUANTIZATION_FILE
    record = read_json(path)
    version = record.get("format_version")
    if version != FORMAT_VERSION:
        raise UserError(
            f"{path} has format_version {version!r}, this finetune reads {FORMAT_VERSION}; "
            "quantize the original checkpoint again with this version"
        )
    if record.get("scheme") not in SCHEMES:
        raise UserError(f"{path} names scheme {record.get('scheme')!r}, not one of {', '.join(SCHEMES)}; the file is damaged")
    return record


def _read_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    read_header(path)  # a damaged file is one error line, not safetensors' traceback
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def load_quantized_model(
    directory: Union[str, Path], *, device: Union[str, torch.device] = "cpu", args: Optional[ModelArgs] = None
) -> tuple[TransformerDecoder, dict[str, Any]]:
    """(the quantized model on `device`, its quantization.json record), in eval mode.

    The model computes in the dtype it was quantized in. The int4_weight_only GPU layout
    (torchao's tinygemm tiles) only loads on a GPU.
    """
    directory = Path(directory)
    record = read_quantization_record(directory)
    if args is None:
        args = model_args_from_hf_config(read_json(directory / HF_CONFIG), directory / HF_CONFIG)
    device = torch.device(device)
    weights = directory / record.get("weights", WEIGHTS_FILE)
    if not weights.is_file():
        raise UserError(f"quantized checkpoint {directory} has no {weights.name}; the directory is incomplete, quantize again")
    metadata = _read_metadata(weights)
    packed = set(json.loads(metadata.pop(_PACKED_INT4, "[]")))
    metadata.pop("format", None)
    tensors = {}
    for name, tensor in iter_safetensors(weights):
        tensors[name] = (unpack_int4(tensor) if name in packed else tensor).to(device)
    try:
        state = ao.unflatten_quantized(tensors, metadata)
    except ValueError as exc:
        raise UserError(f"{weights} is not a quantized checkpoint this version can read ({exc}); quantize again") from None
    ours = {}
    for name, tensor in state.items():
        our_name = from_hf_name(name)
        if our_name is None:
            raise UserError(f"{weights} holds tensor {name!r}, which is not part of a Llama model; quantize again")
        ours[our_name] = tensor
    with torch.device("meta"):
        model = TransformerDecoder(args)
    missing, unexpected = model.load_state_dict(ours, strict=False, assign=True)
    missing = [m for m in missing if not (args.tie_embeddings and m == "output.weight")]
    if missing or unexpected:
        raise UserError(
            f"{weights} does not fit the model in {HF_CONFIG}: missing {missing[:3]}, unexpected {unexpected[:3]}; quantize again"
        )
    model.tie_weights()
    model.init_rope(device)
    model.requires_grad_(False)  # for inference only: torchao's weights have no gradients
    return model.eval(), record
