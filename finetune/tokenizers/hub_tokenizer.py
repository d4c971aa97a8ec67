"""Tokenizers of Mistral, Qwen and Gemma checkpoints, read from a Hub snapshot's `tokenizer.json`
(and `tokenizer_config.json` for the special tokens) with the `tokenizers` library, the one
transformers uses: ids equal transformers' by construction. The chat formats are ours
(`chat_formats.py`), rendered as the families' Hub templates write them.
"""

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

from tokenizers import Tokenizer as FastTokenizer

from finetune.errors import UserError
from finetune.tokenizers.chat_formats import CHAT_FORMATS, STOP_TOKENS
from finetune.tokenizers.messages import Message

TOKENIZER_CONFIG = "tokenizer_config.json"
# SentencePiece-style tokenizers write a leading space as this piece.
_SPACE_PIECE = "▁"


def _token_text(value) -> Optional[str]:
    """A special token as tokenizer_config.json gives it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class HubTokenizer:
    """A `tokenizer.json` with its family's chat format (`family`: mistral, qwen2, qwen3, gemma3)."""

    def __init__(self, path: Union[str, Path], family: str) -> None:
        self.path = Path(path)
        self.family = family
        self._format = CHAT_FORMATS[family]
        try:
            self._tok = FastTokenizer.from_file(str(self.path))
        except Exception as e:  # the library raises a bare Exception for unreadable files
            raise UserError(
                f"{self.path} is not a tokenizer.json the tokenizers library reads ({e}); "
                "use the tokenizer files that ship with the checkpoint"
            ) from None
        config = self._read_config()
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.pad_token = _token_text(config.get("pad_token"))
        self._adds_bos = bool(config.get("add_bos_token", self.bos_token is not None and family != "qwen2"))
        if self.eos_token is None or self._tok.token_to_id(self.eos_token) is None:
            raise UserError(
                f"{self.path.parent / TOKENIZER_CONFIG} names no eos_token of {self.path.name}; "
                "use the tokenizer files of the checkpoint's Hub snapshot"
            )
        self._adds_prefix_space = (self._tok.encode("a", add_special_tokens=False).tokens or [""])[0].startswith(
            _SPACE_PIECE
        )
        self._special_ids = frozenset(self._tok.token_to_id(t) for t in self._special_tokens())

    def _read_config(self) -> dict:
        path = self.path.parent / TOKENIZER_CONFIG
        if not path.is_file():
            raise UserError(
                f"{path} is missing; a {self.family} tokenizer.json needs its tokenizer_config.json beside it "
                "(the Hub snapshot has both)"
            )
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise UserError(f"{path} is not valid JSON ({e}); re-download it") from None

    def _special_tokens(self) -> list[str]:
        return [a.content for a in self._tok.get_added_tokens_decoder().values() if a.special]

    def _id(self, token: Optional[str]) -> Optional[int]:
        return None if token is None else self._tok.token_to_id(token)

    @property
    def bos_id(self) -> int:
        # Qwen has no bos token; its <|endoftext|> stands in where an id is needed.
        found = self._id(self.bos_token)
        return found if found is not None else self.eos_id

    @property
    def eos_id(self) -> int:
        return self._id(self.eos_token)  # type: ignore[return-value]  # checked in __init__

    @property
    def pad_id(self) -> int:
        # Padded positions carry no loss and no attention; the id only has to be valid.
        found = self._id(self.pad_token)
        return found if found is not None else 0

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def stop_tokens(self) -> list[int]:
        ids = [self.eos_id]
        for token in STOP_TOKENS.get(self.family, ()):
            found = self._id(token)
            if found is not None and found not in ids:
                ids.append(found)
        return ids

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True, *, continuation: bool = False) -> list[int]:
        """Ids of `text`, as transformers' tokenizer gives them without special tokens added.

        `continuation=True` drops the leading space a SentencePiece-style tokenizer (Mistral) adds,
        for text that directly follows earlier text of the same sequence.
        """
        ids = self._encode_continuation(text) if continuation else self._plain(text)
        if add_bos and self._adds_bos:
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def _plain(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def _encode_continuation(self, text: str) -> list[int]:
        if not self._adds_prefix_space:
            return self._plain(text)
        # Encode behind a newline, which no piece joins with the text, and cut its ids off again.
        separator = self._plain("\n")
        ids = self._plain("\n" + text)
        return ids[len(separator) :] if ids[: len(separator)] == separator else self._plain(text)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def tokenize_messages(self, messages: Sequence[Message], add_eos: bool = True) -> tuple[list[int], list[bool]]:
        """The family's chat format (see chat_formats.py); a token is masked when every character it
        covers is masked."""
        segments = self._format(messages, self.bos_token or "", self.eos_token or "", add_eos)
        text = "".join(part for part, _ in segments)
        masked_chars: list[bool] = []
        for part, masked in segments:
            masked_chars += [masked] * len(part)
        encoding = self._tok.encode(text, add_special_tokens=False)
        mask = []
        for start, end in encoding.offsets:
            covered = masked_chars[start:end] if end > start else masked_chars[start : start + 1]
            mask.append(all(covered) if covered else True)
        return encoding.ids, mask
