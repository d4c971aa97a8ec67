"""Llama 2 tokenizer: round trips, the [INST] chat layout and its mask."""

import pytest

from finetune.errors import UserError
from finetune.tokenizers import Message, SentencePieceTokenizer, Tokenizer

TEXTS = [
    "Hello world!",
    "  leading spaces and trailing  ",
    "Grüße aus Köln, naïve café",
    "中文 and Русский",
    "emoji 😀🚀 by byte fallback",
    "tabs\tand\nnewlines\n\n",
    "",
]


def test_special_ids(sp_tok: SentencePieceTokenizer) -> None:
    assert isinstance(sp_tok, Tokenizer)
    assert sp_tok.family == "llama2"
    assert (sp_tok.bos_id, sp_tok.eos_id) == (1, 2)
    assert sp_tok.pad_id == 0  # the model has no pad: unk stands in
    assert sp_tok.stop_tokens == [2]
    assert sp_tok.vocab_size == 512


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(sp_tok: SentencePieceTokenizer, text: str) -> None:
    ids = sp_tok.encode(text)
    assert ids[0] == 1 and ids[-1] == 2
    assert sp_tok.decode(ids) == text


def test_emoji_uses_byte_pieces(sp_tok: SentencePieceTokenizer) -> None:
    ids = sp_tok.encode("😀", add_bos=False, add_eos=False)
    pieces = [sp_tok._sp.id_to_piece(i) for i in ids]
    assert pieces == ["▁", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]


def test_bos_eos_flags(sp_tok: SentencePieceTokenizer) -> None:
    plain = sp_tok.encode("hi there", add_bos=False, add_eos=False)
    assert sp_tok.encode("hi there", add_bos=True, add_eos=False) == [1] + plain
    assert sp_tok.encode("hi there", add_bos=False, add_eos=True) == plain + [2]


def test_special_strings_in_text_are_plain(sp_tok: SentencePieceTokenizer) -> None:
    ids = sp_tok.encode("<s> x </s>", add_bos=False, add_eos=False)
    assert 1 not in ids and 2 not in ids
    assert sp_tok.decode(ids) == "<s> x </s>"


def test_decode_special_tokens(sp_tok: SentencePieceTokenizer) -> None:
    ids = sp_tok.encode("Hello world!")
    assert sp_tok.decode(ids, skip_special_tokens=True) == "Hello world!"
    assert sp_tok.decode(ids, skip_special_tokens=False) == "<s>Hello world!</s>"


def test_continuation_has_no_leading_space(sp_tok: SentencePieceTokenizer) -> None:
    prompt, response = "### Response:\n", "The answer is 42."
    joined = sp_tok.encode(prompt + response, add_bos=False, add_eos=False)
    head = sp_tok.encode(prompt, add_bos=False, add_eos=False)
    tail = sp_tok.encode(response, add_bos=False, add_eos=False, continuation=True)
    assert head + tail == joined
    # Without it, SentencePiece's dummy prefix puts a space before the response.
    assert sp_tok.decode(head + sp_tok.encode(response, False, False)) == prompt + " " + response
    assert sp_tok.decode(head + tail) == prompt + response


def _turn(tok: SentencePieceTokenizer, text: str) -> list[int]:
    return tok.encode(text, add_bos=False, add_eos=False)


def test_chat_layout_with_system(sp_tok: SentencePieceTokenizer) -> None:
    messages = [
        Message("system", "Be brief."),
        Message("user", " Capital of France? "),
        Message("assistant", "Paris."),
    ]
    tokens, mask = sp_tok.tokenize_messages(messages)
    prompt = _turn(sp_tok, "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nCapital of France? [/INST]")
    answer = _turn(sp_tok, "Paris. ")  # its dummy prefix is the space after [/INST]
    assert tokens == [1] + prompt + answer + [2]
    assert mask == [True] * (1 + len(prompt)) + [False] * (len(answer) + 1)
    # Same ids as encoding the whole turn in one go, as Meta's reference does.
    whole = "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nCapital of France? [/INST] Paris. "
    assert tokens == sp_tok.encode(whole)
    assert sp_tok.decode(tokens, skip_special_tokens=False) == "<s>" + whole + "</s>"
    pieces = [sp_tok._sp.id_to_piece(i) for i in tokens[-len(answer) - 1 :]]
    assert "".join(pieces) == "▁Paris.▁</s>"


def test_chat_layout_multi_turn(sp_tok: SentencePieceTokenizer) -> None:
    messages = [
        Message("user", "Hi"),
        Message("assistant", "Hello! How can I help?"),
        Message("user", "Capital of France?"),
        Message("assistant", "Paris."),
    ]
    tokens, mask = sp_tok.tokenize_messages(messages)
    p1, a1 = _turn(sp_tok, "[INST] Hi [/INST]"), _turn(sp_tok, "Hello! How can I help? ")
    p2, a2 = _turn(sp_tok, "[INST] Capital of France? [/INST]"), _turn(sp_tok, "Paris. ")
    assert tokens == [1, *p1, *a1, 2, 1, *p2, *a2, 2]
    expected_mask = [True] * (1 + len(p1)) + [False] * (len(a1) + 1) + [True] * (1 + len(p2)) + [False] * (len(a2) + 1)
    assert mask == expected_mask
    assert sp_tok.decode(tokens, skip_special_tokens=False) == (
        "<s>[INST] Hi [/INST] Hello! How can I help? </s><s>[INST] Capital of France? [/INST] Paris. </s>"
    )


def test_chat_masks_follow_messages(sp_tok: SentencePieceTokenizer) -> None:
    messages = [
        Message("user", "Hi", masked=False),
        Message("assistant", "Hello", masked=True),
    ]
    tokens, mask = sp_tok.tokenize_messages(messages)
    n_prompt = 1 + len(_turn(sp_tok, "[INST] Hi [/INST]"))
    assert mask == [False] * n_prompt + [True] * (len(tokens) - n_prompt)


def test_chat_open_ends_for_generation(sp_tok: SentencePieceTokenizer) -> None:
    prompt = _turn(sp_tok, "[INST] Hi [/INST]")
    tokens, mask = sp_tok.tokenize_messages([Message("user", "Hi")])
    assert tokens == [1, *prompt] and mask == [True] * len(tokens)
    tokens, _ = sp_tok.tokenize_messages([Message("user", "Hi"), Message("assistant", "Hel")], add_eos=False)
    assert tokens == [1, *prompt, *_turn(sp_tok, "Hel")]


@pytest.mark.parametrize(
    "roles",
    [
        ["assistant", "user"],
        ["user", "user"],
        ["system", "user", "assistant", "system", "user"],
        ["user", "ipython"],
        ["system"],
    ],
)
def test_chat_rejects_bad_order(sp_tok: SentencePieceTokenizer, roles: list[str]) -> None:
    with pytest.raises(UserError) as err:
        sp_tok.tokenize_messages([Message(r, "x") for r in roles])  # type: ignore[arg-type]
    assert "\n" not in str(err.value)
