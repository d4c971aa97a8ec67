"""Checkpoints in and out: Hugging Face and Meta formats, name mapping between them and ours."""

from finetune.checkpointing.formats import detect_format
from finetune.checkpointing.key_mapping import hf_module_name, our_module_name
from finetune.checkpointing.loader import load_model, load_state_dict
from finetune.checkpointing.model_configs import read_model_args
from finetune.checkpointing.peft import load_peft_adapter, save_peft_adapter  # noqa: F401 (public)
from finetune.checkpointing.writers import save_hf_checkpoint, save_meta_checkpoint

# The architecture a checkpoint describes; reading it is checkpoint work, so it lives here and not in
# finetune.models (which the checkpointing modules build on).
model_args_from_checkpoint = read_model_args

__all__ = [
    "detect_format",
    "hf_module_name",
    "load_model",
    "load_state_dict",
    "model_args_from_checkpoint",
    "our_module_name",
    "read_model_args",
    "save_hf_checkpoint",
    "save_meta_checkpoint",
]
