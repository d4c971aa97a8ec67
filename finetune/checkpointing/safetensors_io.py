"""Minimal safetensors reader and writer that stream tensor bytes straight to and from files.

The format: an 8-byte little-endian header length, a JSON header mapping each name to
dtype, shape and [begin, end) byte offsets into the data block that follows, then the data.
Reading with `readinto` into freshly allocated tensors keeps memory at one copy of the
weights (a memory map would add the file's pages to the process on top of the copy), and
writing from each tensor's own buffer avoids serialising a whole shard in memory first.
"""

import json
import os
import struct
from collections.abc import Iterator, Mapping
from typing import Optional, Union

import torch

from finetune.checkpointing.lazy import lazy, nbytes
from finetune.errors import UserError

PathLike = Union[str, os.PathLike]

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_MAX_HEADER_BYTES = 100 * 1024 * 1024


def read_header(path: PathLike) -> tuple[dict[str, dict], int]:
    """The per-tensor entries of a safetensors file and the byte offset where its data starts."""
    try:
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) != 8:
                raise ValueError("file is shorter than the 8-byte header length")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > _MAX_HEADER_BYTES:
                raise ValueError(f"header length {header_len} is implausible")
            raw = f.read(header_len)
            if len(raw) != header_len:
                raise ValueError("file ends inside the header")
            header = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not a valid safetensors file ({e}); re-download or re-export it") from None
    if not isinstance(header, dict):
        raise UserError(f"{path} is not a valid safetensors file (header is not a JSON object); re-download it")
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    file_size = os.path.getsize(path)
    for name, entry in header.items():
        try:
            begin, end = entry["data_offsets"]
            dtype_name, shape = entry["dtype"], entry["shape"]
        except (KeyError, TypeError, ValueError):
            raise UserError(
                f"{path}: header entry for tensor {name!r} is malformed; re-download or re-export the file"
            ) from None
        if dtype_name not in _DTYPES:
            raise UserError(
                f"{path}: tensor {name!r} has unsupported dtype {dtype_name}; convert it to F32, F16 or BF16"
            )
        itemsize = torch.empty((), dtype=_DTYPES[dtype_name]).element_size()
        numel = 1
        for size in shape:
            numel *= size
        if end - begin != numel * itemsize or begin < 0 or data_start + end > file_size:
            raise UserError(
                f"{path}: tensor {name!r} points outside the file or has the wrong byte size; "
                "the file is truncated or corrupt"
            )
    return header, data_start


def _read_exact(f, buffer: memoryview) -> None:
    filled = 0
    while filled < len(buffer):
        n = f.readinto(buffer[filled:])
        if not n:
            raise EOFError("unexpected end of file")
        filled += n


def iter_safetensors(path: PathLike, names: Optional[set[str]] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, CPU tensor) in file order, each read into its own fresh memory."""
    header, data_start = read_header(path)
    entries = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
    with open(path, "rb", buffering=0) as f:
        for name, entry in entries:
            if names is not None and name not in names:
                continue
            begin, end = entry["data_offsets"]
            raw = torch.empty(end - begin, dtype=torch.uint8)
            f.seek(data_start + begin)
            try:
                _read_exact(f, memoryview(raw.numpy()))
            except EOFError:
                raise UserError(
                    f"{path}: file ends inside tensor {name!r}; the file is truncated, re-download it"
                ) from None
            yield name, raw.view(_DTYPES[entry["dtype"]]).reshape(entry["shape"])


def load_safetensors(path: PathLike) -> dict[str, torch.Tensor]:
    return dict(iter_safetensors(path))


def tensor_nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: PathLike, metadata: Optional[dict[str, str]] = None
) -> None:
    """Write tensors (any device, contiguous or not) to `path`, one tensor in flight at a time.

    A `LazyStateDict` is read once per tensor, while it is written: the header comes from its specs."""
    entries = lazy(tensors)
    header: dict[str, dict] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for name in entries:
        shape, dtype = entries.spec(name)
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"cannot store tensor {name!r} of dtype {dtype} in safetensors")
        size = nbytes((shape, dtype))
        header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # data block starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for name in entries:
            cpu = entries[name].detach().to("cpu").contiguous()
            if (tuple(cpu.shape), cpu.dtype) != entries.spec(name):
                raise ValueError(f"tensor {name!r} was made as {cpu.dtype} {list(cpu.shape)}, not as its spec says")
            if cpu.numel():
                f.write(memoryview(cpu.reshape(-1).view(torch.uint8).numpy()))
            del cpu
