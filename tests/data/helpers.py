"""Small records, file writers and the user-error check shared by the data tests."""

import json
from pathlib import Path

import pytest

from finetune.errors import UserError

ALPACA_RECORDS = [
    {"instruction": "Add the two numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Count from 1 to 3.", "input": "", "output": "1 2 3"},
    {"instruction": "Reverse the order of the words.", "input": "cat dog", "output": "dog cat"},
]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def user_error(fn, *args, **kwargs) -> str:  # type: ignore[no-untyped-def]
    """The one-line message of the UserError that `fn(*args, **kwargs)` raises."""
    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and not message.lower().startswith("error")
    return message
