"""Our Mistral, Qwen and Gemma tokenizers against transformers', on the files of a Hub snapshot:
plain text (Unicode, code, whitespace) and the chat formats, masks included."""

import pytest

from finetune.tokenizers import Message
from finetune.tokenizers.loader import load_tokenizer_for_model
from tests.families.hub_tokenizers import TEXTS, make_hub_tokenizer

FAMILIES = ("mistral", "qwen2", "qwen3", "gemma3")

CORPUS = TEXTS + (
    "",
    " ",
    "   leading and trailing spaces   ",
    "\n\nnewlines first",
    "tabs\tin\tthe\tmiddle\t",
    "emoji 😀🚀 and CJK 日本語のテキスト, Hangul 한국어, Arabic العربية, Devanagari हिन्दी",
    "combining e\u0301 vs \u00e9, NFC matters; ﬁ ligature; zero\u200bwidth",
    "class A:\r\n    def f(self) -> int:\r\n        return 1\r\n",
    'json = {"a": [1, 2.5e-3, null], "b": "x\\ny"}',
    "x" * 300,
)

CONVERSATIONS = (
    [Message("user", "What is 2 + 2?"), Message("assistant", "It is 4.")],
    [
        Message("system", "You answer briefly."),
        Message("user", "  Name a colour. "),
        Message("assistant", "Blue.\n"),
        Message("user", "Another one, in 日本語?"),
        Message("assistant", "赤 (red) 😀"),
    ],
    [Message("user", "def f():\n    return 1\n\nExplain."), Message("assistant", "It returns 1.")],
)


@pytest.fixture(scope="module", params=FAMILIES)
def tokenizers(request, tmp_path_factory):
    family = request.param
    snapshot, theirs = make_hub_tokenizer(family, tmp_path_factory.mktemp(family))
    ours = load_tokenizer_for_model(snapshot, family, vocab_size=1024)
    return family, ours, theirs


def _as_dicts(messages):
    return [{"role": m.role, "content": m.content} for m in messages]


def test_plain_text_ids_match_transformers(tokenizers):
    family, ours, theirs = tokenizers
    for text in CORPUS:
        assert ours.encode(text, add_bos=False, add_eos=False) == theirs(text, add_special_tokens=False).input_ids
        assert ours.encode(text, add_bos=True, add_eos=False) == theirs(text).input_ids, text
        ids = theirs(text, add_special_tokens=False).input_ids
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids)


def test_chat_ids_match_the_chat_template(tokenizers):
    family, ours, theirs = tokenizers
    for messages in CONVERSATIONS:
        tokens, mask = ours.tokenize_messages(messages, add_eos=True)
        expected = theirs.apply_chat_template(_as_dicts(messages), tokenize=True, return_dict=False)
        assert tokens == expected
        assert len(mask) == len(tokens)
        prompt, _ = ours.tokenize_messages([*messages[:-1], Message("assistant", "")], add_eos=False)
        expected_prompt = theirs.apply_chat_template(
            _as_dicts(messages[:-1]), tokenize=True, add_generation_prompt=True, return_dict=False
        )
        assert prompt == expected_prompt


def test_chat_masks_train_on_answers_and_their_closing_token(tokenizers):
    family, ours, theirs = tokenizers
    messages = CONVERSATIONS[1]
    tokens, mask = ours.tokenize_messages(messages, add_eos=True)
    learned = ours.decode([t for t, m in zip(tokens, mask) if not m], skip_special_tokens=False)
    closing = {"mistral": "</s>", "gemma3": "<end_of_turn>"}.get(family, "<|im_end|>")
    for answer in ("Blue.", "赤 (red) 😀"):
        assert answer + closing in learned
    assert "Name a colour" not in learned and "briefly" not in learned
    stops = [theirs.convert_tokens_to_ids(closing)]
    assert set(stops) <= set(ours.stop_tokens)
