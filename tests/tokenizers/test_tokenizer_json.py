"""A Llama 3 tokenizer.json (what many checkpoints ship instead of tokenizer.model) loads and
encodes exactly as the tokenizer.model it was made from and as transformers' fast tokenizer."""

import json
import shutil

import pytest

from finetune.errors import UserError
from finetune.tokenizers import TikTokenTokenizer
from finetune.tokenizers.loader import load_tokenizer, resolve_tokenizer_path
from finetune.tokenizers.messages import Message
from tests.tokenizer_fixtures import DEFAULT_TEXTS, save_llama3_fast_tokenizer, train_sentencepiece

TEXTS = [*DEFAULT_TEXTS, "  leading spaces\n\n\ttabs\r\nand 1234567 digits", "emoji 🙂🙃 and ünïcödé", ""]


@pytest.fixture(scope="module")
def json_only_dir(tmp_path_factory, tt_path):
    directory = tmp_path_factory.mktemp("json_only")
    save_llama3_fast_tokenizer(tt_path, directory)
    assert not (directory / "tokenizer.model").exists()
    return directory


def test_a_directory_with_only_tokenizer_json_loads_as_llama3(json_only_dir, tt_tok):
    assert resolve_tokenizer_path(json_only_dir).name == "tokenizer.json"
    tokenizer = load_tokenizer(json_only_dir, family="llama3_2_1b")
    assert isinstance(tokenizer, TikTokenTokenizer)
    assert (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id, tokenizer.eot_id) == (
        tt_tok.vocab_size,
        tt_tok.bos_id,
        tt_tok.eos_id,
        tt_tok.eot_id,
    )
    for text in TEXTS:
        assert tokenizer.encode(text) == tt_tok.encode(text)
    messages = [Message("system", "Be brief."), Message("user", "What is 2+2?"), Message("assistant", "4")]
    assert tokenizer.tokenize_messages(messages) == tt_tok.tokenize_messages(messages)


def test_tokenizer_json_encodes_as_transformers_does(json_only_dir):
    from transformers import AutoTokenizer

    ours = load_tokenizer(json_only_dir / "tokenizer.json")
    theirs = AutoTokenizer.from_pretrained(json_only_dir)
    for text in TEXTS:
        assert ours.encode(text, add_bos=False, add_eos=False) == theirs.encode(text, add_special_tokens=False)
    chat = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
    expected = theirs(theirs.apply_chat_template(chat, tokenize=False), add_special_tokens=False)["input_ids"]
    tokens, _ = ours.tokenize_messages([Message("user", "What is 2+2?"), Message("assistant", "4")])
    assert tokens[: len(expected)] == expected


def test_tokenizer_json_with_merges_out_of_rank_order_is_refused(json_only_dir, tmp_path):
    spec = json.loads((json_only_dir / "tokenizer.json").read_text())
    merges = spec["model"]["merges"]
    merges[0], merges[-1] = merges[-1], merges[0]
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(UserError, match="merges that are not in rank order"):
        load_tokenizer(tmp_path)


def test_llama2_tokenizer_json_is_refused_naming_tokenizer_model(tmp_path):
    from transformers import LlamaTokenizerFast

    model_file = train_sentencepiece(tmp_path / "sp" / "tokenizer.model")
    LlamaTokenizerFast(vocab_file=str(model_file)).save_pretrained(tmp_path / "hf")
    shutil.rmtree(tmp_path / "sp")
    (tmp_path / "hf" / "tokenizer.model").unlink(missing_ok=True)
    with pytest.raises(UserError, match="byte fallback .*tokenizer.model"):
        load_tokenizer(tmp_path / "hf")
