"""Llama 3 tokenizer: special-token ids, round trips, the header chat layout and its mask."""

import pytest

from finetune.tokenizers import Message, TikTokenTokenizer, Tokenizer
from finetune.tokenizers import tiktoken_tokenizer as tt

TEXTS = [
    "Hello world!",
    "  leading spaces and trailing  ",
    "Grüße aus Köln, naïve café",
    "中文 and Русский",
    "emoji 😀🚀 as bytes",
    "tabs\tand\nnewlines\n\n",
    "",
]
BASE = 512  # base ranks in the fixture file


def test_special_token_table_matches_llama3() -> None:
    assert len(tt.SPECIAL_TOKENS) == 256
    assert tt.SPECIAL_TOKENS[:11] == [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>",
        "<|step_id|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",
        "<|eot_id|>",
        "<|python_tag|>",
    ]
    assert tt.SPECIAL_TOKENS[11] == "<|reserved_special_token_2|>"
    assert tt.SPECIAL_TOKENS[-1] == "<|reserved_special_token_246|>"
    # With Llama 3's 128000 base ranks these are the published ids.
    ids = {tok: 128000 + i for i, tok in enumerate(tt.SPECIAL_TOKENS)}
    assert ids["<|eot_id|>"] == 128009 and ids["<|finetune_right_pad_id|>"] == 128004
    assert ids["<|reserved_special_token_246|>"] == 128255


def test_special_ids(tt_tok: TikTokenTokenizer) -> None:
    assert isinstance(tt_tok, Tokenizer)
    assert tt_tok.family == "llama3"
    assert tt_tok.num_base_tokens == BASE
    assert tt_tok.vocab_size == BASE + 256
    assert (tt_tok.bos_id, tt_tok.eos_id, tt_tok.pad_id) == (BASE, BASE + 1, BASE + 4)
    assert (tt_tok.start_header_id, tt_tok.end_header_id) == (BASE + 6, BASE + 7)
    assert (tt_tok.eom_id, tt_tok.eot_id) == (BASE + 8, BASE + 9)
    assert tt_tok.stop_tokens == [BASE + 1, BASE + 9, BASE + 8]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tt_tok: TikTokenTokenizer, text: str) -> None:
    ids = tt_tok.encode(text)
    assert ids[0] == BASE and ids[-1] == BASE + 1
    assert all(i < BASE for i in ids[1:-1])
    assert tt_tok.decode(ids) == text


def test_bytes_and_merges(tt_tok: TikTokenTokenizer) -> None:
    # Unseen characters fall back to their UTF-8 bytes, whose ranks are the byte values.
    assert tt_tok.encode("😀", add_bos=False, add_eos=False) == [0xF0, 0x9F, 0x98, 0x80]
    # A word from the training corpus is merged into fewer tokens than its bytes.
    assert len(tt_tok.encode(" assistant", add_bos=False, add_eos=False)) < len(" assistant")


def test_special_strings_in_text_are_plain(tt_tok: TikTokenTokenizer) -> None:
    text = "<|begin_of_text|><|eot_id|> <|start_header_id|>user<|end_header_id|>"
    ids = tt_tok.encode(text, add_bos=False, add_eos=False)
    assert all(i < BASE for i in ids)
    assert tt_tok.decode(ids) == text


def test_decode_special_tokens(tt_tok: TikTokenTokenizer) -> None:
    ids = tt_tok.encode("Hi") + [tt_tok.eot_id]
    assert tt_tok.decode(ids) == "Hi"
    assert tt_tok.decode(ids, skip_special_tokens=False) == ("<|begin_of_text|>Hi<|end_of_text|><|eot_id|>")


def _plain(tok: TikTokenTokenizer, text: str) -> list[int]:
    return tok.encode(text, add_bos=False, add_eos=False)


def _header(tok: TikTokenTokenizer, role: str) -> list[int]:
    return [BASE + 6, *_plain(tok, role), BASE + 7, *_plain(tok, "\n\n")]


def test_chat_layout_with_system(tt_tok: TikTokenTokenizer) -> None:
    messages = [
        Message("system", "Be brief."),
        Message("user", " Capital of France? "),
        Message("assistant", "Paris."),
    ]
    tokens, mask = tt_tok.tokenize_messages(messages)
    eot = BASE + 9
    sys_h, sys_c = _header(tt_tok, "system"), _plain(tt_tok, "Be brief.")
    usr_h, usr_c = _header(tt_tok, "user"), _plain(tt_tok, "Capital of France?")
    ast_h, ast_c = _header(tt_tok, "assistant"), _plain(tt_tok, "Paris.")
    assert tokens == [BASE, *sys_h, *sys_c, eot, *usr_h, *usr_c, eot, *ast_h, *ast_c, eot]
    n_prompt = 1 + len(sys_h) + len(sys_c) + 1 + len(usr_h) + len(usr_c) + 1 + len(ast_h)
    assert mask == [True] * n_prompt + [False] * (len(ast_c) + 1)
    rendered = (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nCapital of France?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nParis.<|eot_id|>"
    )
    assert tt_tok.decode(tokens, skip_special_tokens=False) == rendered
    # Same ids as tiktoken gives the rendered template with special tokens allowed.
    assert tokens == tt_tok._enc.encode(rendered, allowed_special="all")


def test_chat_layout_multi_turn(tt_tok: TikTokenTokenizer) -> None:
    messages = [
        Message("user", "Hi"),
        Message("assistant", "Hello! How can I help?"),
        Message("user", "Capital of France?"),
        Message("assistant", "Paris."),
    ]
    tokens, mask = tt_tok.tokenize_messages(messages)
    eot = BASE + 9
    u1, a1 = _plain(tt_tok, "Hi"), _plain(tt_tok, "Hello! How can I help?")
    u2, a2 = _plain(tt_tok, "Capital of France?"), _plain(tt_tok, "Paris.")
    uh, ah = _header(tt_tok, "user"), _header(tt_tok, "assistant")
    assert tokens == [BASE, *uh, *u1, eot, *ah, *a1, eot, *uh, *u2, eot, *ah, *a2, eot]
    expected_mask = (
        [True] * (1 + len(uh) + len(u1) + 1 + len(ah))
        + [False] * (len(a1) + 1)
        + [True] * (len(uh) + len(u2) + 1 + len(ah))
        + [False] * (len(a2) + 1)
    )
    assert mask == expected_mask


def test_chat_unmasked_user_and_ipython(tt_tok: TikTokenTokenizer) -> None:
    messages = [
        Message("user", "Hi", masked=False),
        Message("assistant", "ok", masked=True),
        Message("ipython", "42"),
    ]
    tokens, mask = tt_tok.tokenize_messages(messages)
    n_user = len(_header(tt_tok, "user")) + len(_plain(tt_tok, "Hi")) + 1
    n_asst = len(_header(tt_tok, "assistant")) + len(_plain(tt_tok, "ok")) + 1
    assert mask == [True] + [False] * n_user + [True] * (len(tokens) - 1 - n_user)
    n_tool = len(_header(tt_tok, "ipython")) + len(_plain(tt_tok, "42")) + 1
    assert len(tokens) == 1 + n_user + n_asst + n_tool
    assert tt_tok.decode(tokens[-n_tool:], skip_special_tokens=False) == (
        "<|start_header_id|>ipython<|end_header_id|>\n\n42<|eot_id|>"
    )


def test_chat_generation_prompt(tt_tok: TikTokenTokenizer) -> None:
    tokens, _ = tt_tok.tokenize_messages([Message("user", "Hi"), Message("assistant", "")], add_eos=False)
    assert tt_tok.decode(tokens, skip_special_tokens=False) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_split_for_encoding(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tt, "MAX_RUN_CHARS", 10)
    monkeypatch.setattr(tt, "MAX_ENCODE_CHARS", 30)
    text = "a" * 25 + " word" * 10 + " " * 12 + "end"
    pieces = list(tt.split_for_encoding(text))
    assert "".join(pieces) == text
    assert pieces[:3] == ["a" * 10, "a" * 10, "a" * 5]
    assert all(len(p) <= 30 for p in pieces)
    assert " " * 10 in pieces  # the long whitespace run is cut too


def test_split_keeps_ordinary_text_ids(tt_tok: TikTokenTokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    text = "Hello world! How are you today? " * 20
    whole = _plain(tt_tok, text)
    monkeypatch.setattr(tt, "MAX_ENCODE_CHARS", 50)
    assert len(list(tt.split_for_encoding(text))) > 10
    assert _plain(tt_tok, text) == whole


def test_long_run_without_whitespace(tt_tok: TikTokenTokenizer) -> None:
    text = "ab" * 30_000 + " done"
    assert tt_tok.decode(tt_tok.encode(text)) == text
