"""The shared tokenizer fixture files: deterministic, in the real formats, and loadable."""

from pathlib import Path

import pytest
import sentencepiece as spm
import tiktoken.load

from finetune.tokenizers import load_tokenizer
from finetune.tokenizers.tiktoken_tokenizer import LLAMA3_PATTERN
from tests import tokenizer_fixtures as fx


def test_sentencepiece_is_deterministic_and_llama2_shaped(tmp_path: Path) -> None:
    fx._sentencepiece_bytes.cache_clear()
    a = fx.train_sentencepiece(tmp_path / "a.model").read_bytes()
    fx._sentencepiece_bytes.cache_clear()
    b = fx.train_sentencepiece(tmp_path).read_bytes()  # a directory gets tokenizer.model
    assert a == b == (tmp_path / "tokenizer.model").read_bytes()
    sp = spm.SentencePieceProcessor(model_proto=a)
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert sp.id_to_piece(3) == "<0x00>"  # byte fallback pieces follow the control ids


def test_llama3_ranks_are_deterministic_and_readable_by_tiktoken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fx.learn_bpe_ranks.cache_clear()
    path = fx.write_llama3_ranks(tmp_path / "tokenizer.model")
    fx.learn_bpe_ranks.cache_clear()
    assert fx.write_llama3_ranks(tmp_path / "again.model").read_bytes() == path.read_bytes()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # keep tiktoken's loader from caching
    ranks = tiktoken.load.load_tiktoken_bpe(str(path))
    assert len(ranks) == 512
    assert all(ranks[bytes([b])] == b for b in range(256))
    assert load_tokenizer(path)._enc._mergeable_ranks == ranks  # type: ignore[attr-defined]


def test_small_corpus_stops_early(tmp_path: Path) -> None:
    path = fx.write_llama3_ranks(tmp_path / "t.model", texts=["ab ab"], vocab_size=1000)
    # " ab" and "ab" pre-tokenize apart: merges "ab" then " ab" exhaust the corpus.
    assert load_tokenizer(path).vocab_size == 258 + 256


def test_llama3_encoding_matches_hugging_face(tt_path: Path) -> None:
    convert = pytest.importorskip("transformers.convert_slow_tokenizer")
    fast = pytest.importorskip("transformers").PreTrainedTokenizerFast
    converter = convert.TikTokenConverter(str(tt_path), pattern=LLAMA3_PATTERN)
    hf = fast(tokenizer_object=converter.converted())
    ours = load_tokenizer(tt_path)
    for text in ["Hello world!", "  spaces  ", "it's 12345!!\n\n x", "Grüße 😀 中文", "a\r\nb"]:
        expected = hf.encode(text, add_special_tokens=False)
        assert ours.encode(text, add_bos=False, add_eos=False) == expected
