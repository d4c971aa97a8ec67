"""load_tokenizer: kind detection, directories, and one-line errors for bad files."""

import base64
import shutil
from pathlib import Path

import pytest

from finetune.errors import UserError
from finetune.tokenizers import SentencePieceTokenizer, TikTokenTokenizer, load_tokenizer
from tests.tokenizer_fixtures import write_llama3_ranks


def _error(path, family=None) -> str:
    with pytest.raises(UserError) as err:
        load_tokenizer(path, family)
    message = str(err.value)
    assert "\n" not in message and not message.lower().startswith("error")
    return message


def test_detects_each_kind(sp_path: Path, tt_path: Path) -> None:
    assert isinstance(load_tokenizer(sp_path), SentencePieceTokenizer)
    assert isinstance(load_tokenizer(tt_path), TikTokenTokenizer)
    assert load_tokenizer(str(sp_path), "llama2").family == "llama2"
    assert load_tokenizer(tt_path, "llama3").family == "llama3"


@pytest.mark.parametrize("family", ["llama3_1_8b", "Llama-3.2", "llama3_2_1b"])
def test_model_names_count_as_family(tt_path: Path, family: str) -> None:
    assert load_tokenizer(tt_path, family).family == "llama3"


def test_unknown_family(tt_path: Path) -> None:
    assert "mistral" in _error(tt_path, "mistral")


def test_directory(tmp_path: Path, sp_path: Path, tt_path: Path) -> None:
    shutil.copy(sp_path, tmp_path / "tokenizer.model")
    assert isinstance(load_tokenizer(tmp_path), SentencePieceTokenizer)
    # Hugging Face Llama 3 repos keep Meta's file under original/.
    hf = tmp_path / "hf"
    (hf / "original").mkdir(parents=True)
    shutil.copy(tt_path, hf / "original" / "tokenizer.model")
    assert isinstance(load_tokenizer(hf, "llama3"), TikTokenTokenizer)


def test_directory_without_tokenizer(tmp_path: Path) -> None:
    message = _error(tmp_path)
    assert str(tmp_path) in message and "tokenizer.model" in message


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.model"
    message = _error(path)
    assert str(path) in message and "does not exist" in message


@pytest.mark.parametrize("content", [b"", b"garbage\x00\xff\x01 not a model", b"hello world\n", b"\x0a\x05hello"])
def test_garbage_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "tokenizer.model"
    path.write_bytes(content)
    message = _error(path)
    assert str(path) in message and "neither" in message


def test_hf_json_file(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_text('{"version": "1.0", "model": {}}')
    assert "tokenizer.json" in _error(path)


def test_wrong_kind_for_family(sp_path: Path, tt_path: Path) -> None:
    message = _error(sp_path, "llama3")
    assert str(sp_path) in message
    assert "SentencePiece" in message and "llama3" in message and "tiktoken" in message
    message = _error(tt_path, "llama2")
    assert str(tt_path) in message and "tiktoken" in message and "SentencePiece" in message


def test_damaged_ranks_file(tmp_path: Path, tt_path: Path) -> None:
    lines = tt_path.read_text().splitlines()
    path = tmp_path / "tokenizer.model"
    path.write_text("\n".join(lines[:300] + ["not-base64!! 300"]) + "\n")
    assert "line 301" in _error(path)
    path.write_text("\n".join(lines[:100] + lines[101:]) + "\n")  # rank 100 missing
    assert "ranks" in _error(path)
    path.write_text("\n".join(lines[1:]) + "\n")  # byte 0 missing, ranks 1..
    assert str(path) in _error(path)


def test_ranks_without_all_bytes(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.model"
    tokens = [bytes([b]) for b in range(255)] + [b"ab"]  # byte 255 missing
    path.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(tokens)))
    assert "256 single-byte" in _error(path)


def test_replaced_file_is_reread(tmp_path: Path) -> None:
    # A file rewritten at the same path must not be served from any cache.
    path = tmp_path / "tokenizer.model"
    write_llama3_ranks(path, texts=["aaaa bbbb"], vocab_size=258)
    assert load_tokenizer(path).vocab_size == 258 + 256
    write_llama3_ranks(path, texts=["aaaa bbbb"], vocab_size=260)
    assert load_tokenizer(path).vocab_size == 260 + 256
