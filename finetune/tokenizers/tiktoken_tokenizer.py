"""Llama 3's tiktoken tokenizer and its header/`<|eot_id|>` chat format.

The same file format and special tokens serve Llama 3, 3.1 and 3.2 text models.
"""

import base64
import binascii
import re
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import tiktoken

from finetune.errors import UserError
from finetune.tokenizers.messages import ROLES, Message

# Llama 3's pre-tokenizer split pattern.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

NUM_SPECIAL_TOKENS = 256
_NAMED_SPECIAL_TOKENS = [
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
# Ids follow the base ranks in this order: <|begin_of_text|> is 128000 for the real vocab.
SPECIAL_TOKENS: list[str] = _NAMED_SPECIAL_TOKENS + [
    f"<|reserved_special_token_{i}|>" for i in range(2, 2 + NUM_SPECIAL_TOKENS - len(_NAMED_SPECIAL_TOKENS))
]

# tiktoken's regex backtracks badly (and can overflow its stack) on very long runs of
# whitespace or of non-whitespace, and large inputs are best fed in pieces.
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000

_LINE = re.compile(rb"([A-Za-z0-9+/]+=*) (\d+)")


def is_ranks_file(data: bytes) -> bool:
    """Whether `data` starts like a tiktoken ranks file: `<base64 token> <rank>` lines."""
    first = data[:4096].split(b"\n", 1)[0].rstrip(b"\r")
    return _LINE.fullmatch(first) is not None


def read_ranks(path: Path, data: Optional[bytes] = None) -> dict[bytes, int]:
    """Parse a ranks file into {token bytes: rank}, checking it is a usable byte-level BPE.

    Parsed here rather than with `tiktoken.load.load_tiktoken_bpe`, which caches even local
    files by path in a temporary directory and would serve a stale copy after the file at
    that path is replaced.
    """
    if data is None:
        data = path.read_bytes()
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        m = _LINE.fullmatch(line.strip())
        try:
            if m is None:
                raise ValueError(line)
            token = base64.b64decode(m.group(1), validate=True)
        except (ValueError, binascii.Error):
            raise UserError(
                f"{path} line {lineno} is not '<base64 token> <rank>'; the file is damaged "
                "or not a Llama 3 tokenizer.model, use the one that ships with the checkpoint"
            ) from None
        ranks[token] = int(m.group(2))
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise UserError(
            f"{path} ranks are not unique and numbered 0..{len(ranks) - 1}; the file is "
            "damaged, use the tokenizer.model that ships with the checkpoint"
        )
    if any(bytes([b]) not in ranks for b in range(256)):
        raise UserError(
            f"{path} lacks some of the 256 single-byte tokens a byte-level BPE needs; use "
            "the tokenizer.model that ships with the Llama 3 checkpoint"
        )
    return ranks


def split_for_encoding(text: str) -> Iterator[str]:
    """Cut `text` into pieces tiktoken handles safely.

    Runs of more than MAX_RUN_CHARS whitespace or non-whitespace characters are cut into
    slices, and pieces are kept under MAX_ENCODE_CHARS, cut before a space where one exists
    so that ordinary text tokenizes exactly as it would whole.
    """
    start = 0
    for m in re.finditer(r"\S{%d,}|\s{%d,}" % (MAX_RUN_CHARS + 1, MAX_RUN_CHARS + 1), text):
        yield from _split_at_spaces(text[start : m.start()])
        for i in range(m.start(), m.end(), MAX_RUN_CHARS):
            yield text[i : min(i + MAX_RUN_CHARS, m.end())]
        start = m.end()
    yield from _split_at_spaces(text[start:])


def _split_at_spaces(text: str) -> Iterator[str]:
    while len(text) > MAX_ENCODE_CHARS:
        cut = text.rfind(" ", 1, MAX_ENCODE_CHARS)
        if cut <= 0:
            cut = MAX_ENCODE_CHARS
        yield text[:cut]
        text = text[cut:]
    if text:
        yield text


class TikTokenTokenizer:
    """Tokenizer for Llama 3 / 3.1 / 3.2 models (`tokenizer.model` of base64 ranks).

    `data` may hold the file's bytes when the caller has already read them; `ranks` the ranks
    when they come from elsewhere (a tokenizer.json).
    """

    family = "llama3"

    def __init__(
        self, path: Union[str, Path], data: Optional[bytes] = None, ranks: Optional[dict[bytes, int]] = None
    ) -> None:
        self.path = Path(path)
        ranks = ranks if ranks is not None else read_ranks(self.path, data)
        self.num_base_tokens = len(ranks)
        self.special_tokens = {tok: self.num_base_tokens + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self._enc = tiktoken.Encoding(
            name=f"llama3:{self.path}",
            pat_str=LLAMA3_PATTERN,
            mergeable_ranks=ranks,
            special_tokens=self.special_tokens,
        )
        self.start_header_id = self.special_tokens["<|start_header_id|>"]
        self.end_header_id = self.special_tokens["<|end_header_id|>"]
        self.eot_id = self.special_tokens["<|eot_id|>"]
        self.eom_id = self.special_tokens["<|eom_id|>"]
        self.python_tag_id = self.special_tokens["<|python_tag|>"]

    @property
    def bos_id(self) -> int:
        return self.special_tokens["<|begin_of_text|>"]

    @property
    def eos_id(self) -> int:
        return self.special_tokens["<|end_of_text|>"]

    @property
    def pad_id(self) -> int:
        return self.special_tokens["<|finetune_right_pad_id|>"]

    @property
    def vocab_size(self) -> int:
        return self.num_base_tokens + NUM_SPECIAL_TOKENS

    @property
    def stop_tokens(self) -> list[int]:
        return [self.eos_id, self.eot_id, self.eom_id]

    def _encode_plain(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in split_for_encoding(text):
            # Special-token strings inside user text stay plain text.
            ids += self._enc.encode(piece, allowed_special=set(), disallowed_special=())
        return ids

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True, *, continuation: bool = False) -> list[int]:
        """Ids of `text`; special-token strings in it are plain text, never special ids.

        `continuation` exists for interface parity: tiktoken adds no leading space anyway.
        """
        ids = self._encode_plain(text)
        if add_bos:
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i < self.num_base_tokens]
        return self._enc.decode(ids)

    def tokenize_header(self, role: str) -> list[int]:
        """`<|start_header_id|>{role}<|end_header_id|>\\n\\n` as ids."""
        return [
            self.start_header_id,
            *self._encode_plain(role),
            self.end_header_id,
            *self._encode_plain("\n\n"),
        ]

    def tokenize_messages(self, messages: Sequence[Message], add_eos: bool = True) -> tuple[list[int], list[bool]]:
        """Llama 3 chat layout: `<|begin_of_text|>` then, per message,
        `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>`.

        Contents are stripped. A message's tokens follow its mask, except an assistant's
        header, which is always masked: at generation time the prompt supplies it, so only the
        content and `<|eot_id|>` are learned. `<|begin_of_text|>` is masked (nothing predicts
        it). `add_eos=False` leaves the last message open (no `<|eot_id|>`); with an empty
        final assistant message that gives the prompt for generation.
        """
        tokens = [self.bos_id]
        mask = [True]
        for n, message in enumerate(messages):
            if message.role not in ROLES:
                raise UserError(f"unknown message role {message.role!r}; use one of {', '.join(ROLES)}")
            header = self.tokenize_header(message.role)
            tokens += header
            mask += [message.is_masked or message.role == "assistant"] * len(header)
            body = self._encode_plain(message.content.strip())
            if add_eos or n < len(messages) - 1:
                body.append(self.eot_id)
            tokens += body
            mask += [message.is_masked] * len(body)
        return tokens, mask
