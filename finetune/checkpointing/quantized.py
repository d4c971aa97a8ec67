"""Quantized checkpoints in and out: what `tune quantize` writes and `generate` / `eleuther_eval` load.

A quantized checkpoint directory holds
  model.safetensors   torchao's flattened tensors under Hugging Face names, with their JSON
                      descriptions in the file's metadata (no pickle: loading runs no code);
                      int4 codes, which torchao keeps one per byte on CPU, packed two per byte
  quantization.json   scheme, group size, torchao version, dtype and the measured numbers
  config.json, generation_config.json, tokenizer files   so the directory describes itself;
                      for the int8 schemes config.json carries transformers' torchao
                      `quantization_config`, so AutoModelForCausalLM loads the directory as is

Every torchao call goes through `finetune.ao`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors import safe_open

from finetune import ao
from finetune.checkpointing.formats import detect_format, hf_weight_files, meta_weight_files
from finetune.checkpointing.key_mapping import from_hf_name, to_hf_name
from finetune.checkpointing.model_configs import HF_CONFIG, model_args_from_hf_config, read_json
from finetune.checkpointing.safetensors_io import iter_safetensors, read_header, save_safetensors
from finetune.checkpointing.writers import write_beside_weights
from finetune.errors import UserError
from finetune.models import ModelArgs, TransformerDecoder
from finetune.quantization import SCHEMES

HF_LOADABLE_SCHEMES = ("int8_weight_only", "int8_dynamic")  # transformers loads these outputs as they are
QUANTIZATION_FILE = "quantization.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1
_PACKED_INT4 = "finetune.packed_int4"  # safetensors metadata key: names of int4 codes stored two per byte


# ----------------------------------------------------------------------------------------------
# int4 codes on disk
# ----------------------------------------------------------------------------------------------


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-8, 7], last dim even -> uint8 with two codes per byte (low nibble first)."""
    unsigned = (codes.to(torch.int16) + 8).to(torch.uint8)
    return unsigned[..., 0::2] | (unsigned[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    low, high = packed & 0xF, packed >> 4
    return torch.stack([low, high], dim=-1).flatten(-2).to(torch.int8) - 8


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


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
    state = {
        name: tensor
        for name, tensor in model.state_dict().items()
        if not (args.tie_embeddings and name == "output.weight")
    }
    hf_state = {to_hf_name(k, args.sandwich_norms): v for k, v in state.items()}
    tensors, metadata, int4_codes = ao.flatten_quantized(hf_state)
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
        scheme_config = ao.ptq_config(record["scheme"], 0, torch.device("cpu"))
        config["quantization_config"] = ao.hf_quantization_config(scheme_config)
        _write_json(out / HF_CONFIG, config)
    _write_json(
        out / QUANTIZATION_FILE,
        {
            "format_version": FORMAT_VERSION,
            "torchao_version": ao.torchao_version(),
            "dtype": str(dtype).removeprefix("torch."),
            "weights": WEIGHTS_FILE,
            "size_bytes": size,
            **record,
        },
    )
    return out


def _write_json(path: Path, values: dict[str, Any]) -> None:
    path.write_text(json.dumps(values, indent=2) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


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
        raise UserError(
            f"{path} names scheme {record.get('scheme')!r}, not one of {', '.join(SCHEMES)}; the file is damaged"
        )
    return record


def _read_metadata(path: Path) -> dict[str, str]:
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
        raise UserError(
            f"quantized checkpoint {directory} has no {weights.name}; the directory is incomplete, quantize again"
        )
    metadata = _read_metadata(weights)
    packed = set(json.loads(metadata.pop(_PACKED_INT4, "[]")))
    metadata.pop("format", None)
    tensors = {}
    for name, tensor in iter_safetensors(weights):
        tensors[name] = (unpack_int4(tensor) if name in packed else tensor).to(device)
    try:
        state = ao.unflatten_quantized(tensors, metadata)
    except ValueError as exc:
        raise UserError(
            f"{weights} is not a quantized checkpoint this version can read ({exc}); quantize again"
        ) from None
    ours = {}
    for name, tensor in state.items():
        our_name = from_hf_name(name, args.sandwich_norms)
        if our_name is None:
            raise UserError(f"{weights} holds tensor {name!r}, which is not part of a Llama model; quantize again")
        ours[our_name] = tensor
    with torch.device("meta"):
        model = TransformerDecoder(args)
    missing, unexpected = model.load_state_dict(ours, strict=False, assign=True)
    missing = [m for m in missing if not (args.tie_embeddings and m == "output.weight")]
    if missing or unexpected:
        raise UserError(
            f"{weights} does not fit the model in {HF_CONFIG}: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}; quantize again"
        )
    model.tie_weights()
    model.init_rope(device)
    model.requires_grad_(False)  # for inference only: torchao's weights have no gradients
    return model.eval(), record


# ----------------------------------------------------------------------------------------------
# Size on disk
# ----------------------------------------------------------------------------------------------


def weights_size(directory: Union[str, Path]) -> int:
    """Bytes of a checkpoint's weight files (Hugging Face, Meta or quantized)."""
    directory = Path(directory)
    if is_quantized_checkpoint(directory):
        return (directory / WEIGHTS_FILE).stat().st_size
    files = hf_weight_files(directory) if detect_format(directory) == "hf" else meta_weight_files(directory)
    return sum(p.stat().st_size for p in files)
