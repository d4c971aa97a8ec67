"""Data for fine-tuning: sources, instruct / chat / text datasets, packing, batching.

`build_dataset` turns a file, folder or Hugging Face dataset into tokenized samples
`{"tokens", "labels"}` with labels already shifted for next-token prediction (or packed
rows that also carry `position_ids` and `document_ids`); `collate`,
`ResumableDistributedSampler` and `build_dataloader` batch them.
"""

from finetune.data.dataset import DATASET_TYPES, TokenizedDataset, build_dataset
from finetune.data.labels import IGNORE_INDEX, shifted_labels, truncate
from finetune.data.loader import build_dataloader, collate
from finetune.data.packing import PackedDataset
from finetune.data.sampler import ResumableDistributedSampler
from finetune.data.sources import Records, load_records
from finetune.data.templates import (
    InstructTemplate,
    get_template,
    register_template,
    template_names,
)

__all__ = [
    "DATASET_TYPES",
    "IGNORE_INDEX",
    "InstructTemplate",
    "PackedDataset",
    "Records",
    "ResumableDistributedSampler",
    "TokenizedDataset",
    "build_dataloader",
    "build_dataset",
    "collate",
    "get_template",
    "load_records",
    "register_template",
    "shifted_labels",
    "template_names",
    "truncate",
]
