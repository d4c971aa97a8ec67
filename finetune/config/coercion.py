"""Value coercion: a CLI string or a YAML value becomes a Params field's type, or one clear error.

The annotations handled are the simple ones Params classes use: bool, int, float, str, `Literal`,
`Optional`, `list[...]` and `dict[..., ...]`. `matches_type` and `describe_type` are shared with
the Params classes, which check notebook-built values the same way.
"""

from __future__ import annotations

import typing
from typing import Any, Literal, Optional

import yaml

from finetune.errors import UserError

_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}
_NONE = {"none", "null", "~", ""}
_INVALID = object()


def bool_from_text(text: str) -> Optional[bool]:
    """true/yes/1/on or false/no/0/off, in any case; None for anything else."""
    word = text.strip().lower()
    return True if word in _TRUE else False if word in _FALSE else None


def matches_type(value: Any, tp: Any) -> bool:
    """True when `value` is an instance of the (simple) annotation `tp`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return True
    if origin is typing.Union:
        return any(matches_type(value, a) for a in args)
    if tp is type(None):
        return value is None
    if origin is Literal:
        return value in args
    if origin is list:
        return isinstance(value, list) and all(matches_type(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(
            matches_type(k, args[0]) and matches_type(v, args[1]) for k, v in value.items()
        )
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def describe_type(tp: Any) -> str:
    """A short human name for an annotation: `int`, `one of a|b`, `list of str`, `... or none`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:
        inner = [a for a in args if a is not type(None)]
        text = " or ".join(describe_type(a) for a in inner)
        return f"{text} or none" if type(None) in args else text
    if origin is Literal:
        return "one of " + "|".join(map(str, args))
    if origin is list:
        return f"list of {describe_type(args[0])}"
    if origin is dict:
        return f"mapping of {describe_type(args[0])} to {describe_type(args[1])}"
    return getattr(tp, "__name__", str(tp))


def coerce(key: str, value: Any, tp: Any, source: str, hint: str = "") -> Any:
    """Convert a CLI string or a YAML value to the field's type, or raise a UserError."""
    try:
        result = _coerce(value, tp)
    except (ValueError, TypeError, AttributeError, yaml.YAMLError):  # malformed lists and mappings too
        result = _INVALID
    if result is _INVALID or not matches_type(result, tp):
        raise UserError(
            f"{key}={value!r} ({source}) is not valid: expected {describe_type(tp)}" + (f" ({hint})" if hint else "")
        )
    return result


def _coerce(value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:
        if isinstance(value, str) and value.strip().lower() in _NONE and type(None) in args:
            return None
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        for choice in inner[:-1]:  # `Union[bool, str]`: true/false first, any other word a str
            try:
                result = _coerce(value, choice)
            except (ValueError, TypeError):
                continue
            if result is not _INVALID and matches_type(result, choice):
                return result
        return _coerce(value, inner[-1])
    if not isinstance(value, str):
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # YAML read `output_dir: 2024` as a number
        if origin is list and isinstance(value, list):
            return [_coerce(v, args[0]) for v in value]
        if origin is dict and isinstance(value, dict):
            return {_coerce(k, args[0]): _coerce(v, args[1]) for k, v in value.items()}
        return value
    text = value.strip()
    if tp is bool:
        flag = bool_from_text(text)
        return _INVALID if flag is None else flag
    if tp is int:
        return int(text)
    if tp is float:
        return float(text)
    if tp is str:
        return value
    if origin is Literal:
        for choice in args:
            if str(choice) == text:
                return choice
        return _INVALID
    if origin is list:
        if text.startswith("["):
            items = yaml.safe_load(text)
        else:
            items = [t.strip() for t in text.split(",") if t.strip()]
        return [_coerce(item, args[0]) for item in items]
    if origin is dict:
        if text.startswith("{"):
            mapping = yaml.safe_load(text)
        else:
            mapping = dict(pair.split(":", 1) for pair in text.split(",") if pair.strip())
        return {_coerce(str(k).strip(), args[0]): _coerce(str(v).strip(), args[1]) for k, v in mapping.items()}
    return _INVALID
