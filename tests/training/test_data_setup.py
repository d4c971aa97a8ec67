"""From params to loaders: the eval data is checked against the training data, and a
dataset_subset applies to the dataset it names, not to an eval_dataset from elsewhere."""

from pathlib import Path

import pytest

from finetune.params import FullFinetuneParams
from finetune.tokenizers import load_tokenizer
from finetune.training.data_setup import build_eval_data, eval_overlaps_training
from finetune.training.distributed import DistInfo
from tests.data.helpers import ALPACA_RECORDS, write_jsonl
from tests.recipes.helpers import TINY

ONE_PROCESS = DistInfo(rank=0, world_size=1, local_rank=0, is_distributed=False)


def params(**overrides) -> FullFinetuneParams:
    return FullFinetuneParams(**{**TINY, "output_dir": "unused", **overrides})


@pytest.mark.parametrize(
    "split, eval_split, overlaps",
    [
        ("train", "train", True),
        ("train[:90%]", "train[90%:]", False),
        ("train[:90%]", "train[80%:]", True),
        ("train", "train[95%:]", True),
        ("train[100:]", "train[:100]", False),
        ("train[:90%]", "train[-10:]", False),  # not known without counting: no note
        ("train", "test", False),
    ],
)
def test_eval_overlap_is_found_from_the_splits(split, eval_split, overlaps):
    p = params(dataset="data.jsonl", eval_dataset="data.jsonl", split=split, eval_split=eval_split)
    assert eval_overlaps_training(p) is overlaps
    assert eval_overlaps_training(params(dataset="data.jsonl", eval_dataset="other.jsonl")) is False


def test_eval_on_the_training_data_is_noted_and_a_subset_stays_with_its_dataset(tmp_path: Path):
    data = tmp_path / "hub_copy"
    for subset in ("main", "socratic"):
        (data / subset).mkdir(parents=True)
        write_jsonl(data / subset / "train.jsonl", ALPACA_RECORDS)
    held_out = write_jsonl(tmp_path / "held_out.jsonl", ALPACA_RECORDS[:2])
    tokenizer = load_tokenizer(Path(__file__).parents[2] / "finetune/data/demo/tokenizer.model")
    notes: list[str] = []
    same = params(dataset=str(data), dataset_subset="main", eval_dataset=str(data), max_seq_len=512)
    loader = build_eval_data(same, tokenizer, ONE_PROCESS, log=notes.append)
    assert loader is not None and len(loader.dataset) == len(ALPACA_RECORDS)
    assert notes[0].startswith(
        f"note: the eval data overlaps the training data ({data}, split=train, eval_split=train)"
    )
    notes.clear()
    elsewhere = params(dataset=str(data), dataset_subset="main", eval_dataset=str(held_out), max_seq_len=512)
    loader = build_eval_data(elsewhere, tokenizer, ONE_PROCESS, log=notes.append)
    assert loader is not None and len(loader.dataset) == 2
    assert not [note for note in notes if note.startswith("note:")]
