"""The chat formats of Mistral, Qwen (ChatML) and Gemma 3, written as text with loss masks.

Each format renders a conversation to the string the family's Hub chat template writes, as
(text, masked) segments; `HubTokenizer` encodes the joined string once, as transformers'
`apply_chat_template` does, and masks each token by the segments it covers. Contents are
stripped. An assistant turn's header (the role line) is masked; its content and closing token
are learned, so the model learns when to stop. `add_eos=False` leaves the last message open;
with an empty last assistant message that is the prompt for generation, as the Hub templates
write it with `add_generation_prompt`.
"""

from collections.abc import Sequence

from finetune.errors import UserError
from finetune.tokenizers.messages import ROLES, Message

Segments = list[tuple[str, bool]]


def _check_roles(messages: Sequence[Message], format_name: str) -> None:
    for m in messages:
        if m.role not in ROLES:
            raise UserError(f"unknown message role {m.role!r}; use one of {', '.join(ROLES)}")
        if m.role == "ipython":
            raise UserError(f"the {format_name} chat format has no 'ipython' role; drop tool messages")


def _split_system(messages: Sequence[Message]) -> tuple[Message | None, list[Message]]:
    rest = list(messages)
    system = rest.pop(0) if rest and rest[0].role == "system" else None
    return system, rest


def chatml(messages: Sequence[Message], bos: str, eos: str, add_eos: bool) -> Segments:
    """Qwen 2.5 / Qwen 3: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message.

    Qwen 2.5's Hub template also adds a default system message when there is none; it is
    written here only when the data holds it.
    """
    _check_roles(messages, "ChatML")
    segments: Segments = []
    for n, m in enumerate(messages):
        last = n == len(messages) - 1
        segments.append((f"<|im_start|>{m.role}\n", m.is_masked or m.role == "assistant"))
        closing = "<|im_end|>" if add_eos or not last else ""
        segments.append((m.content.strip() + closing, m.is_masked))
        if closing:
            segments.append(("\n", True))
    return segments


def mistral(messages: Sequence[Message], bos: str, eos: str, add_eos: bool) -> Segments:
    """Mistral v0.3: `<s>[INST] {user}[/INST] {assistant}</s>[INST] ...`; a system message goes
    before the last user message, after a blank line."""
    _check_roles(messages, "Mistral")
    system, rest = _split_system(messages)
    last_user = max((i for i, m in enumerate(rest) if m.role == "user"), default=-1)
    segments: Segments = [(bos, True)]
    for n, m in enumerate(rest):
        expected = "user" if n % 2 == 0 else "assistant"
        if m.role != expected:
            raise UserError(
                f"the Mistral chat format needs user and assistant messages to alternate, starting with user "
                f"(after an optional system message), but found {m.role!r} where {expected!r} belongs"
            )
        if m.role == "user":
            text = m.content.strip()
            masked = m.is_masked
            if system is not None and n == last_user:
                text = f"{system.content.strip()}\n\n{text}"
                masked = masked or system.is_masked
            segments.append((f"[INST] {text}[/INST]", masked))
        else:
            closing = eos if add_eos or n < len(rest) - 1 else ""
            content = m.content.strip()
            if content or closing:  # an empty open answer is the generation prompt: nothing after [/INST]
                segments.append((" " + content + closing, m.is_masked))
    if system is not None and last_user < 0:
        raise UserError("a Mistral conversation needs a user message after the system message; add one")
    return segments


def gemma(messages: Sequence[Message], bos: str, eos: str, add_eos: bool) -> Segments:
    """Gemma 3: `<bos><start_of_turn>{user|model}\\n{content}<end_of_turn>\\n` per message; a system
    message is written at the start of the first user turn, followed by a blank line."""
    _check_roles(messages, "Gemma")
    system, rest = _split_system(messages)
    segments: Segments = [(bos, True)]
    for n, m in enumerate(rest):
        last = n == len(rest) - 1
        role = "model" if m.role == "assistant" else m.role
        masked = m.is_masked
        segments.append((f"<start_of_turn>{role}\n", masked or m.role == "assistant"))
        if n == 0 and system is not None:
            segments.append((system.content.strip() + "\n\n", system.is_masked or masked))
        closing = "<end_of_turn>" if add_eos or not last else ""
        segments.append((m.content.strip() + closing, masked))
        if closing:
            segments.append(("\n", True))
    return segments


CHAT_FORMATS = {"qwen2": chatml, "qwen3": chatml, "mistral": mistral, "gemma3": gemma}
# Tokens that end a turn, beside the tokenizer's eos.
STOP_TOKENS = {
    "qwen2": ("<|im_end|>", "<|endoftext|>"),
    "qwen3": ("<|im_end|>", "<|endoftext|>"),
    "gemma3": ("<end_of_turn>",),
}
