"""The interface every tokenizer in finetune satisfies."""

from typing import Protocol, Sequence, runtime_checkable

from finetune.tokenizers.messages import Message


@runtime_checkable
class Tokenizer(Protocol):
    """Text <-> token ids, plus the model family's own chat format.

    `tokenize_messages` returns (tokens, mask) of equal length; mask True means the token
    carries no loss (masked turns and their format tokens). An unmasked assistant turn is
    trained on including its closing token, so the model learns when to stop.
    """

    family: str  # "llama2", "llama3", or the model family whose chat format it writes (mistral, qwen2, ...)

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True, *, continuation: bool = False) -> list[int]:
        """Ids of `text`. `continuation=True` marks text that directly follows earlier text of
        the same sequence, so no leading space is added (Llama 2's dummy prefix)."""
        ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    @property
    def bos_id(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    @property
    def pad_id(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def stop_tokens(self) -> list[int]: ...

    def tokenize_messages(self, messages: Sequence[Message], add_eos: bool = True) -> tuple[list[int], list[bool]]: ...
