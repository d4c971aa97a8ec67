"""Tokenizers built once per test session from the shared fixture files."""

from pathlib import Path

import pytest

from finetune.tokenizers import SentencePieceTokenizer, TikTokenTokenizer
from tests.tokenizer_fixtures import train_sentencepiece, write_llama3_ranks


@pytest.fixture(scope="session")
def sp_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_sentencepiece(tmp_path_factory.mktemp("llama2") / "tokenizer.model")


@pytest.fixture(scope="session")
def tt_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_llama3_ranks(tmp_path_factory.mktemp("llama3") / "tokenizer.model")


@pytest.fixture(scope="session")
def sp_tok(sp_path: Path) -> SentencePieceTokenizer:
    return SentencePieceTokenizer(sp_path)


@pytest.fixture(scope="session")
def tt_tok(tt_path: Path) -> TikTokenTokenizer:
    return TikTokenTokenizer(tt_path)
