"""A small decoder trained for a few seconds on the demo data, so that quantization error shows
up in a perplexity far below the uniform one (a random model's perplexity hides it)."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from finetune.checkpointing import save_hf_checkpoint
from finetune.data import IGNORE_INDEX, build_dataset, collate
from finetune.models import ModelArgs, TransformerDecoder, build_model
from finetune.params import resolve_path
from finetune.tokenizers import Tokenizer, load_tokenizer

# One intra-op thread: the tensors are tiny and the CPUs are shared.
torch.set_num_threads(1)

TOKENIZER = resolve_path("pkg:data/demo/tokenizer.model")
TRAIN = resolve_path("pkg:data/demo/train.jsonl")
HELDOUT = resolve_path("pkg:data/demo/heldout.jsonl")
# Every linear's input width (64 and 128) is a multiple of the group sizes 32 and 64.
ARGS = ModelArgs(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, max_seq_len=64)
TRAIN_STEPS = 150


def demo_tokenizer() -> Tokenizer:
    return load_tokenizer(TOKENIZER)


def heldout_samples(tokenizer: Tokenizer, limit: int = 64) -> list[dict[str, list[int]]]:
    dataset = build_dataset(
        str(HELDOUT), dataset_type="instruct", tokenizer=tokenizer, max_seq_len=64, template="plain"
    )
    return [dataset[i] for i in range(limit)]


def train_small_model(tokenizer: Tokenizer, steps: int = TRAIN_STEPS) -> TransformerDecoder:
    torch.manual_seed(0)
    model = build_model(ARGS)
    dataset = build_dataset(str(TRAIN), dataset_type="instruct", tokenizer=tokenizer, max_seq_len=64, template="plain")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    order = torch.randperm(len(dataset)).tolist()
    for step in range(steps):
        batch = collate([dataset[i] for i in order[step * 16 % len(order) :][:16]], pad_id=tokenizer.pad_id)
        logits = model(batch["tokens"])
        loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return demo_tokenizer()


@pytest.fixture(scope="session")
def trained_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: Tokenizer) -> Path:
    """An fp32 Hugging Face checkpoint of the trained model, with its tokenizer."""
    model = train_small_model(tokenizer)
    directory = tmp_path_factory.mktemp("trained")
    save_hf_checkpoint(
        model.state_dict(),
        ARGS,
        directory,
        tokenizer_files=[TOKENIZER],
        bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id,
    )
    return directory
