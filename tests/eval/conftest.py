"""A small random decoder with the demo tokenizer, saved as a Hugging Face checkpoint."""

from pathlib import Path

import pytest
import torch

from finetune.checkpointing import save_hf_checkpoint
from finetune.models import ModelArgs, TransformerDecoder, build_model
from finetune.params import resolve_path
from finetune.tokenizers import Tokenizer, load_tokenizer

# One intra-op thread: the tensors are tiny and the CPUs are shared.
torch.set_num_threads(1)

TOKENIZER = resolve_path("pkg:data/demo/tokenizer.model")
ARGS = ModelArgs(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, max_seq_len=128)


def random_model(seed: int = 0) -> TransformerDecoder:
    """Weights drawn larger than the training init, so that predictions are far from uniform
    and greedy choices differ between positions."""
    torch.manual_seed(seed)
    model = build_model(ARGS)
    model.reset_parameters(std=0.15)
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return load_tokenizer(TOKENIZER)


@pytest.fixture(scope="session")
def model() -> TransformerDecoder:
    return random_model()


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory, model: TransformerDecoder, tokenizer: Tokenizer) -> Path:
    directory = tmp_path_factory.mktemp("model")
    save_hf_checkpoint(
        model.state_dict(),
        ARGS,
        directory,
        tokenizer_files=[TOKENIZER],
        bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id,
    )
    return directory
