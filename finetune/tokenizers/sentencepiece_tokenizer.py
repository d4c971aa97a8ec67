"""Llama 2's SentencePiece tokenizer and its `[INST]` chat format.

Leading spaces: Llama 2's model adds a dummy prefix ("▁", a space) to every string it
encodes, so ids of pieces encoded one by one and concatenated would hold spaces that are not
in the joined text. Two remedies, both exact:

- The chat format is cut only right before a single space of the joined text, and each cut
  piece is encoded without that space, letting the dummy prefix stand for it. No Llama 2
  piece spans a space boundary, so the ids equal those of encoding the whole turn at once
  (the tests pin this) and mask boundaries fall on whole tokens.
- `encode(..., continuation=True)` encodes text that directly follows earlier text (an
  instruct response after its prompt) with no dummy prefix at all.
"""

from pathlib import Path
from typing import Optional, Sequence, Union

import sentencepiece as spm

from finetune.errors import UserError
from finetune.tokenizers.messages import ROLES, Message

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
# Llama 2 has no piece containing a newline (it is always the byte piece <0x0A>), so text
# after one is segmented as if it stood alone without the dummy-prefix space.
_SEPARATOR = "\n"


def parse_model(data: bytes) -> Optional[spm.SentencePieceProcessor]:
    """A processor for a serialized SentencePiece model, or None if `data` is not one."""
    try:
        processor = spm.SentencePieceProcessor(model_proto=data)
    except RuntimeError:
        return None
    # An empty protobuf parses as a model with no pieces; that is no model either.
    return processor if processor.get_piece_size() > 0 else None


class SentencePieceTokenizer:
    """Tokenizer for Llama 2 models (`tokenizer.model` in SentencePiece protobuf format).

    `data` may hold the file's bytes when the caller has already read them.
    """

    family = "llama2"

    def __init__(self, path: Union[str, Path], data: Optional[bytes] = None) -> None:
        self.path = Path(path)
        processor = parse_model(self.path.read_bytes() if data is None else data)
        if processor is None:
            raise UserError(
                f"{self.path} is not a SentencePiece model; point the tokenizer path at the "
                "Llama 2 tokenizer.model that ships with the checkpoint"
            )
        self._sp = processor
        if self._sp.bos_id() < 0 or self._sp.eos_id() < 0:
            raise UserError(
                f"{self.path} defines no <s>/</s> tokens, which Llama 2 needs; use the "
                "tokenizer.model that ships with the Llama 2 checkpoint"
            )
        self._separator_ids: list[int] = self._sp.encode(_SEPARATOR)
        # Control ids (<s>, </s>, ...) never come out of plain text; decode drops them.
        self._special_ids = frozenset(i for i in range(self._sp.get_piece_size()) if self._sp.is_control(i))

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        # Llama 2 defines no pad token; unk (0) is the usual stand-in. Padded positions are
        # masked out of attention and loss, so the id only has to be valid.
        pad = self._sp.pad_id()
        return pad if pad >= 0 else max(self._sp.unk_id(), 0)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def stop_tokens(self) -> list[int]:
        return [self.eos_id]

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True, *, continuation: bool = False) -> list[int]:
        """Ids of `text`. Strings such as "<s>" in the text are plain text, never control ids.

        By default the model's dummy-prefix space is added, as Meta's reference does for
        every string. `continuation=True` is for text that directly continues earlier text
        of the same sequence (a response after its prompt): no space is added, so the ids
        are those the text would get inside the joined string.
        """
        ids = self._encode_continuation(text) if continuation else self._sp.encode(text)
        if add_bos:
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def _encode_continuation(self, text: str) -> list[int]:
        # SentencePiece cannot be told to skip the dummy prefix, so encode behind a
        # separator no piece joins with and cut the separator's ids off again. If some
        # piece did join it with the text, fall back to the dummy-prefixed ids.
        ids: list[int] = self._sp.encode(_SEPARATOR + text)
        n = len(self._separator_ids)
        if ids[:n] == self._separator_ids:
            return ids[n:]
        return self._sp.encode(text)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            return self._sp.decode(ids)
        # SentencePiece always drops control pieces, so write them back in by hand.
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in self._special_ids:
                parts.append(self._sp.decode(run))
                parts.append(self._sp.id_to_piece(i))
                run = []
            else:
                run.append(i)
        parts.append(self._sp.decode(run))
        return "".join(parts)

    def tokenize_messages(self, messages: Sequence[Message], add_eos: bool = True) -> tuple[list[int], list[bool]]:
        """Llama 2 chat layout, one `<s>...</s>` block per user/assistant exchange.

        `<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {assistant} </s>`, then
        `<s>[INST] {user} [/INST] {assistant} </s>` for later turns. Contents are stripped.
        The `<s>[INST] ... [/INST]` part is masked if its user (or system) message is; the
        assistant's ` {content} </s>` follows the assistant message. A final user message
        without an answer leaves the prompt open for generation; `add_eos=False` also leaves
        the last assistant answer open (no trailing space, no `</s>`).
        """
        tokens: list[int] = []
        mask: list[bool] = []
        exchanges = _exchanges(messages)
        for n, (system, user, assistant) in enumerate(exchanges):
            user_text = user.content.strip()
            prompt_masked = user.is_masked
            if system is not None:
                user_text = f"{B_SYS}{system.content.strip()}{E_SYS}{user_text}"
                prompt_masked = prompt_masked or system.is_masked
            prompt = f"{B_INST} {user_text} {E_INST}"
            ids = self.encode(prompt, add_bos=True, add_eos=False)
            tokens += ids
            mask += [prompt_masked] * len(ids)
            if assistant is None:
                continue
            closed = add_eos or n < len(exchanges) - 1
            # The dummy prefix supplies the space after [/INST] (see the module docstring).
            text = assistant.content.strip() + (" " if closed else "")
            ids = self.encode(text, add_bos=False, add_eos=closed)
            tokens += ids
            mask += [assistant.is_masked] * len(ids)
        return tokens, mask


def _exchanges(
    messages: Sequence[Message],
) -> list[tuple[Optional[Message], Message, Optional[Message]]]:
    """Group messages into (system, user, assistant) triples, checking Llama 2's order."""
    for m in messages:
        if m.role not in ROLES:
            raise UserError(f"unknown message role {m.role!r}; use one of {', '.join(ROLES)}")
        if m.role == "ipython":
            raise UserError("the Llama 2 chat format has no 'ipython' role; drop tool messages or use a Llama 3 model")
    rest = list(messages)
    system = rest.pop(0) if rest and rest[0].role == "system" else None
    groups: list[tuple[Optional[Message], Message, Optional[Message]]] = []
    while rest:
        user = rest.pop(0)
        if user.role != "user":
            raise UserError(
                f"the Llama 2 chat format needs user and assistant messages to alternate, "
                f"starting with user (after an optional system message), but found "
                f"{user.role!r} where a user message belongs; fix the conversation's order"
            )
        assistant = rest.pop(0) if rest else None
        if assistant is not None and assistant.role != "assistant":
            raise UserError(
                f"the Llama 2 chat format needs user and assistant messages to alternate, "
                f"but a user message is followed by {assistant.role!r}; fix the "
                "conversation's order"
            )
        groups.append((system if not groups else None, user, assistant))
    if system is not None and not groups:
        raise UserError("a Llama 2 conversation needs a user message after the system message; add one")
    return groups
