"""One record to tokens and a loss mask, for each kind of data: instruct, chat and text.

Each function checks the record it reads, so a bad value is reported with the column and
the record's place in its file. Masks follow the tokenizer's convention: True = no loss.
"""

from typing import Any, Mapping, Optional, Sequence

from finetune.data.templates import InstructTemplate
from finetune.errors import UserError
from finetune.tokenizers import Message, Tokenizer

# ShareGPT speaker names and the roles they mean.
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant"}
CHAT_ROLES = ("system", "user", "assistant")


def missing_column(column: str, record: Mapping[str, Any], where: str) -> UserError:
    found = ", ".join(map(str, record)) or "none"
    return UserError(
        f"column '{column}' is missing from {where}; columns found: {found}; "
        f"rename it or pass column_map={{{column}: <your column>}}"
    )


def text_column(record: Mapping[str, Any], column: str, where: str, required: bool = True) -> str:
    """The string in `record[column]`; an absent optional column (or null) reads as ''."""
    if column not in record:
        if required:
            raise missing_column(column, record, where)
        return ""
    value = record[column]
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise UserError(
            f"column '{column}' of {where} holds {_describe(value)}, expected text; "
            "fix the record or map another column with column_map"
        )
    return _checked_text(value, f"column '{column}' of {where}")


def tokenize_instruct(
    record: Mapping[str, Any],
    where: str,
    tokenizer: Tokenizer,
    template: InstructTemplate,
    train_on_input: bool,
) -> tuple[list[int], list[bool]]:
    """bos + prompt + response + eos; the prompt is masked unless `train_on_input`.

    The response is encoded as a continuation of the prompt, so its ids are the ones the
    joined text would get (SentencePiece would otherwise prefix a space): what the model
    learns matches how evaluation harnesses and Hugging Face tokenize prompt + answer.
    """
    instruction = text_column(record, "instruction", where)
    input = text_column(record, "input", where, required=False)
    output = text_column(record, "output", where)
    prompt = tokenizer.encode(template.format(instruction, input), add_bos=True, add_eos=False)
    response = tokenizer.encode(output, add_bos=False, add_eos=True, continuation=True)
    return prompt + response, [not train_on_input] * len(prompt) + [False] * len(response)


def chat_messages(record: Mapping[str, Any], where: str, train_on_input: bool) -> list[Message]:
    """Messages of an OpenAI-style (`messages`) or ShareGPT-style (`conversations`) record."""
    if "messages" in record:
        turns = _turns(record, "messages", where, ("role", "content"))
        roles = [_role(t["role"], CHAT_ROLES, "role", where, i) for i, t in enumerate(turns)]
        contents = [_content(t, "content", where, i) for i, t in enumerate(turns)]
        weights = [_weight(t, where, i) for i, t in enumerate(turns)]
    elif "conversations" in record:
        turns = _turns(record, "conversations", where, ("from", "value"))
        roles = [SHAREGPT_ROLES[_role(t["from"], tuple(SHAREGPT_ROLES), "from", where, i)] for i, t in enumerate(turns)]
        contents = [_content(t, "value", where, i) for i, t in enumerate(turns)]
        weights = [_weight(t, where, i) for i, t in enumerate(turns)]
    else:
        raise missing_column("messages", record, where)
    check_turn_order(roles, where)
    messages = []
    for role, content, weight in zip(roles, contents, weights):
        # An explicit per-turn weight (OpenAI's fine-tuning format, also read on ShareGPT turns)
        # wins over train_on_input.
        masked = (weight == 0) if weight is not None else (False if train_on_input else None)
        messages.append(Message(role=role, content=content, masked=masked))
    return messages


def check_turn_order(roles: Sequence[str], where: str) -> None:
    """An optional system turn, then user and assistant alternating, starting with user."""
    rule = "turns must alternate user, assistant, ... after an optional first system message"
    expected = "user"
    for i, role in enumerate(roles):
        if role == "system":
            if i != 0:
                raise UserError(
                    f"conversation in {where} has a system message at turn {i + 1}; "
                    f"only the first turn may be a system message; {rule}"
                )
            continue
        if role != expected:
            if i > 0 and roles[i - 1] == role:
                problem = f"two {role} turns in a row (turns {i} and {i + 1})"
            else:
                problem = f"turn {i + 1} from {role} where {expected} was expected"
            raise UserError(f"conversation in {where} has {problem}; {rule}")
        expected = "assistant" if role == "user" else "user"
    if "assistant" not in roles:
        raise UserError(
            f"conversation in {where} has no assistant turn, so nothing to learn; "
            "add the assistant's reply or remove the record"
        )


def text_chunks(record: Mapping[str, Any], where: str, tokenizer: Tokenizer, max_seq_len: int) -> list[list[int]]:
    """bos + text + eos, cut into pieces of at most `max_seq_len` tokens.

    A last piece of one token is dropped: it has nothing to predict.
    """
    tokens = tokenizer.encode(text_column(record, "text", where), add_bos=True, add_eos=True)
    chunks = [tokens[i : i + max_seq_len] for i in range(0, len(tokens), max_seq_len)]
    return [chunk for chunk in chunks if len(chunk) > 1]


def _turns(record: Mapping[str, Any], column: str, where: str, keys: tuple[str, str]) -> list[Mapping[str, Any]]:
    turns = record[column]
    if not isinstance(turns, list) or not turns:
        raise UserError(
            f"column '{column}' of {where} holds {_describe(turns)}, expected a non-empty list "
            f"of {{{keys[0]}: ..., {keys[1]}: ...}} objects; fix the record"
        )
    for i, turn in enumerate(turns):
        missing = [k for k in keys if not isinstance(turn, Mapping) or k not in turn]
        if missing:
            raise UserError(
                f"turn {i + 1} of column '{column}' in {where} holds {_describe(turn)} without "
                f"'{missing[0]}'; each turn needs '{keys[0]}' and '{keys[1]}'"
            )
    return turns


def _role(value: Any, allowed: Sequence[str], key: str, where: str, i: int) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise UserError(f"turn {i + 1} of {where} has {key} {value!r}; use one of {', '.join(allowed)}")
    return value


def _content(turn: Mapping[str, Any], key: str, where: str, i: int) -> str:
    value = turn[key]
    if not isinstance(value, str):
        raise UserError(
            f"turn {i + 1} of {where} has '{key}' holding {_describe(value)}, expected text; fix the record"
        )
    return _checked_text(value, f"'{key}' of turn {i + 1} in {where}")


def _checked_text(value: str, what: str) -> str:
    """`value`, if it is text a tokenizer can read. JSON's \\ud800-style escapes can decode to a
    lone UTF-16 surrogate, which is no character: SentencePiece fails on it and tiktoken
    silently turns it into U+FFFD."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UserError(
            f"{what} holds a lone UTF-16 surrogate {value[exc.start]!r} at character {exc.start + 1}, which "
            "is not text (a broken \\uXXXX escape); remove it or re-export the data"
        ) from None
    return value


def _weight(turn: Mapping[str, Any], where: str, i: int) -> Optional[int]:
    weight = turn.get("weight")
    if weight is None:
        return None
    if weight not in (0, 1):
        raise UserError(f"turn {i + 1} of {where} has weight {weight!r}; use 0 or 1")
    return int(weight)


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{type(value).__name__} {text}"
