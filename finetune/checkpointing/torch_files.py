"""Reading `torch.save` files (pytorch_model*.bin, consolidated.NN.pth) without running pickled code,
and writing them so that a full disk is an OSError that names its cause."""

import pickle
import zipfile
from pathlib import Path
from typing import Any, Optional

import torch

from finetune.errors import UserError

_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def _unpickling_reason(error: Exception) -> str:
    # torch's message is mostly advice; the line saying what stopped the unpickler is the useful part.
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    specific = [line for line in lines if not line.startswith(_BOILERPLATE)]
    return specific[0] if specific else "objects other than tensors"


def load_torch_file(path: Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} dict from a torch.save file, with `weights_only=True`.

    mmap=True maps the file instead of reading it (used to list names and shapes cheaply);
    files in the pre-zip legacy format cannot be mapped and are read whole.
    """
    mmap = mmap and zipfile.is_zipfile(path)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        reason = _unpickling_reason(e)
        if "GLOBAL" in reason:  # the pickle asks to import and call something
            raise UserError(
                f"refusing to load {path}: it needs arbitrary pickled code to unpickle ({reason}); "
                "get a safetensors copy, or convert it with a tool you trust"
            ) from None
        raise UserError(f"{path} is not a readable PyTorch checkpoint ({reason}); re-download it") from None
    except Exception as e:  # torch raises assorted types for a damaged or foreign file
        raise UserError(
            f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {e}); re-download it"
        ) from None
    if not isinstance(loaded, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    ):
        raise UserError(f"{path} does not hold a flat name -> tensor dict; save the model's state_dict() instead")
    return loaded


def owned_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor itself when it owns exactly its storage, else a compact copy (a view into a
    bigger shared storage would keep all of that storage alive)."""
    if tensor.is_contiguous() and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size():
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


class _KeptWriteError:
    """A binary file that keeps the OSError of a failed write: torch.save reports a full disk or a
    file-size limit as a RuntimeError about its zip writer, without the errno."""

    def __init__(self, file: Any) -> None:
        self._file = file
        self.error: Optional[OSError] = None

    def write(self, data: Any) -> int:
        try:
            return self._file.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self._file.flush()


def save_torch_file(obj: Any, path: Path) -> None:
    """torch.save `obj` to `path`; a failed write raises the OSError (ENOSPC, EFBIG, ...) behind it."""
    with open(path, "wb") as f:
        writer = _KeptWriteError(f)
        try:
            torch.save(obj, writer)  # type: ignore[arg-type]
        except RuntimeError:
            if writer.error is not None:
                raise writer.error from None
            raise
