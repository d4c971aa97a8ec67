"""Writing a state dict (our names) as a Hugging Face or a Meta checkpoint directory.

Writes here are plain file writes; callers that need all-or-nothing directories wrap them
with the atomic-directory helper.
"""

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch

from finetune.checkpointing.formats import SAFETENSORS_INDEX
from finetune.checkpointing.key_mapping import is_rotary_projection, rotate_half_to_meta, to_hf_name, to_meta_name
from finetune.checkpointing.lazy import LazyStateDict, lazy, nbytes
from finetune.checkpointing.model_configs import (
    HF_CONFIG,
    META_PARAMS,
    hf_config_from_model_args,
    meta_params_from_model_args,
)
from finetune.checkpointing.safetensors_io import save_safetensors
from finetune.checkpointing.torch_files import owned_tensor, save_torch_file
from finetune.errors import UserError
from finetune.models import ModelArgs

PathLike = Union[str, os.PathLike]

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
TOKENIZER_CONFIG = "tokenizer_config.json"
HF_TOKENIZER_FILES = ("tokenizer.json", TOKENIZER_CONFIG, "special_tokens_map.json", "chat_template.jinja")
GENERATION_CONFIG = "generation_config.json"


def _checkpoint_tensors(state_dict: Mapping[str, torch.Tensor], args: ModelArgs) -> LazyStateDict:
    """The state dict minus the tied output layer (saved once, as the embeddings); nothing is read."""
    tensors = lazy(state_dict)
    return tensors.select([name for name in tensors if not (args.tie_embeddings and name == "output.weight")])


def _renamed(tensors: LazyStateDict, rename, format_name: str) -> LazyStateDict:
    for name in tensors:
        if rename(name) is None:
            raise ValueError(
                f"state dict entry {name!r} has no {format_name} name; is it a TransformerDecoder state dict?"
            )
    return tensors.select(list(tensors), rename)


def _stored_dtype(tensor: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.dtype:
    return dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype


def _cast(tensor: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    return tensor.to(_stored_dtype(tensor, dtype))


def _shards(tensors: LazyStateDict, max_shard_bytes: int) -> list[list[str]]:
    """Greedy split in name order; a tensor bigger than the limit gets a shard of its own."""
    shards: list[list[str]] = [[]]
    current = 0
    for name in tensors:
        size = nbytes(tensors.spec(name))
        if shards[-1] and current + size > max_shard_bytes:
            shards.append([])
            current = 0
        shards[-1].append(name)
        current += size
    return shards


def save_hf_checkpoint(
    state_dict: Mapping[str, torch.Tensor],
    args: ModelArgs,
    out_dir: PathLike,
    *,
    dtype: Optional[torch.dtype] = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    **beside: Any,
) -> list[Path]:
    """Write model.safetensors (or model-0000k-of-0000n shards + index), then what
    `write_beside_weights` writes from `beside` (tokenizer_files, bos_token_id, eos_token_id,
    generation_defaults, tokenizer_config).

    dtype=None keeps the state dict's dtype. Returns the files written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Lazy throughout: each tensor is read (cast, or made: see LazyStateDict) only as it is written.
    tensors = _renamed(
        _checkpoint_tensors(state_dict, args), lambda name: to_hf_name(name, args.sandwich_norms), "Hugging Face"
    ).cast(dtype)
    shards = _shards(tensors, max_shard_bytes)
    written = []
    if len(shards) == 1:
        path = out / "model.safetensors"
        save_safetensors(tensors.select(shards[0]), path)
        written.append(path)
    else:
        weight_map = {}
        for index, names in enumerate(shards, start=1):
            path = out / f"model-{index:05d}-of-{len(shards):05d}.safetensors"
            save_safetensors(tensors.select(names), path)
            weight_map.update({name: path.name for name in names})
            written.append(path)
        total = sum(nbytes(tensors.spec(name)) for name in tensors)
        index_path = out / SAFETENSORS_INDEX
        _write_json(index_path, {"metadata": {"total_size": total}, "weight_map": weight_map})
        written.append(index_path)
    first_float = next((d for _, d in tensors.specs.values() if d.is_floating_point), torch.float32)
    stored_dtype = dtype if dtype is not None else first_float
    written += write_beside_weights(out, args, stored_dtype, **beside)
    return written


def write_beside_weights(
    out: Path,
    args: ModelArgs,
    dtype: torch.dtype,
    *,
    tokenizer_files: Sequence[PathLike] = (),
    bos_token_id: Optional[int] = None,
    eos_token_id: Optional[Union[int, list[int]]] = None,
    generation_defaults: Optional[Mapping] = None,
    tokenizer_config: Optional[Mapping] = None,
) -> list[Path]:
    """config.json, generation_config.json when bos/eos are known (with `generation_defaults`, e.g.
    the source's sampling settings), copies of `tokenizer_files` and `tokenizer_config` as
    tokenizer_config.json: what transformers reads beside the weights. Returns the files written."""
    written = [_write_json(out / HF_CONFIG, hf_config_from_model_args(args, dtype, bos_token_id, eos_token_id))]
    if bos_token_id is not None or eos_token_id is not None:
        generation = {**(generation_defaults or {}), "bos_token_id": bos_token_id, "eos_token_id": eos_token_id}
        written.append(_write_json(out / GENERATION_CONFIG, generation))
    written += copy_tokenizer_files(tokenizer_files, out)
    if tokenizer_config is not None:
        written.append(_write_json(out / TOKENIZER_CONFIG, dict(tokenizer_config)))
    return written


def _write_json(path: Path, values: dict) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(values, f, indent=2)
        f.write("\n")
    return path


def copy_tokenizer_files(files: Sequence[PathLike], out_dir: Path) -> list[Path]:
    copied = []
    for file in files:
        source = Path(file)
        if not source.is_file():
            raise UserError(f"tokenizer file {source} does not exist; check the tokenizer path")
        target = out_dir / source.name
        if source.resolve() != target.resolve():
            shutil.copyfile(source, target)
        copied.append(target)
    return copied


# transformers reads a lone SentencePiece tokenizer.model without BOS or the leading-space piece
# unless a tokenizer_config.json names the slow Llama tokenizer.
LLAMA2_TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "add_bos_token": True,
    "add_eos_token": False,
    "legacy": False,
}


def hf_output_extras(
    source_dir: Optional[Path], tokenizer_file: Path, bos_id: int, stop_ids: Sequence[int], family: str = "llama3"
) -> dict:
    """The keyword arguments of save_hf_checkpoint that make an output directory load like its source.

    transformers reads the fast tokenizer (tokenizer.json, with the chat template and special tokens
    in tokenizer_config.json) before tokenizer.model, so those files travel from beside the tokenizer
    file (or its checkpoint, for a file in `original/`). Generation stops at every eos id: the source's
    and every stop token of ours, since a base model fine-tuned on chat data ends its turns with one.
    """
    tokenizer_dir = tokenizer_file.parent
    if tokenizer_dir.name == "original":
        tokenizer_dir = tokenizer_dir.parent
    beside = [tokenizer_dir / name for name in HF_TOKENIZER_FILES if name != tokenizer_file.name]
    files = [tokenizer_file, *(f for f in beside if f.is_file())]
    generation: dict = {}
    if source_dir is not None:
        for name in (HF_CONFIG, GENERATION_CONFIG):  # the generation config wins where both say
            path = source_dir / name
            if path.is_file():
                values = json.loads(path.read_text(encoding="utf-8"))
                keep = (
                    values
                    if name == GENERATION_CONFIG
                    else {k: values[k] for k in ("bos_token_id", "eos_token_id") if k in values}
                )
                generation.update(keep)
    source_eos = generation.get("eos_token_id")
    eos = list(source_eos) if isinstance(source_eos, list) else [] if source_eos is None else [source_eos]
    eos += [i for i in stop_ids if i not in eos]
    generation.pop("transformers_version", None)
    has_config = any(f.name == TOKENIZER_CONFIG for f in files)
    return {
        "tokenizer_files": files,
        "bos_token_id": generation.pop("bos_token_id", bos_id),
        "eos_token_id": eos[0] if len(eos) == 1 else eos,
        "generation_defaults": {k: v for k, v in generation.items() if k != "eos_token_id"},
        "tokenizer_config": LLAMA2_TOKENIZER_CONFIG if family == "llama2" and not has_config else None,
    }


def save_meta_checkpoint(
    state_dict: Mapping[str, torch.Tensor], args: ModelArgs, out_dir: PathLike, *, dtype: Optional[torch.dtype] = None
) -> list[Path]:
    """Write consolidated.00.pth + params.json, loadable by Meta's reference code.

    A tied model still gets an `output.weight` (a copy of the embeddings), as Meta's code expects one.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        if args.tie_embeddings and name == "output.weight":
            continue
        tensor = _cast(tensor.detach(), dtype).to("cpu")
        if is_rotary_projection(name):
            n_heads = args.n_heads if "q_proj" in name else args.n_kv_heads
            tensor = rotate_half_to_meta(tensor, n_heads)
        theirs = to_meta_name(name)
        if theirs is None:
            raise ValueError(f"state dict entry {name!r} has no Meta name; is it a TransformerDecoder state dict?")
        tensors[theirs] = owned_tensor(tensor)  # torch.save would write a view's whole storage
    if args.tie_embeddings:
        tensors["output.weight"] = tensors["tok_embeddings.weight"].clone()
    weights_path = out / "consolidated.00.pth"
    save_torch_file(tensors, weights_path)
    params_path = _write_json(out / META_PARAMS, meta_params_from_model_args(args))
    return [weights_path, params_path]
