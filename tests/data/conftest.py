"""Fixtures for the data tests: real tokenizers and small data files."""

import pytest

from finetune.data.demo import demo_path
from finetune.tokenizers import Tokenizer, load_tokenizer
from tests.tokenizer_fixtures import write_llama3_ranks


@pytest.fixture(scope="session")
def sp_tokenizer() -> Tokenizer:
    """The demo's 512-piece SentencePiece (Llama 2 family) tokenizer."""
    return load_tokenizer(demo_path("tokenizer.model"))


@pytest.fixture(scope="session")
def llama3_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return load_tokenizer(write_llama3_ranks(tmp_path_factory.mktemp("llama3") / "tokenizer.model"))
