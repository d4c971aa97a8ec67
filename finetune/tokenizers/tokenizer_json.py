"""Reading a Hugging Face `tokenizer.json` that holds Llama 3's byte-level BPE as tiktoken ranks.

Many Llama 3 checkpoints ship only tokenizer.json (no `original/tokenizer.model`). Its vocabulary
is the same ranked byte-level BPE written in GPT-2's printable-character alphabet, so the ranks
are its ids and tiktoken encodes exactly as the fast tokenizer does. Anything else (Llama 2's
SentencePiece BPE, another pre-tokenizer, merges out of rank order) is refused, not approximated.
"""

import json
from pathlib import Path

from finetune.errors import UserError
from finetune.tokenizers.tiktoken_tokenizer import LLAMA3_PATTERN, SPECIAL_TOKENS

# Special tokens whose ids the Llama 3 chat format relies on; stable across 3.0, 3.1 and 3.2.
_CHECKED_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
)


def is_json(data: bytes) -> bool:
    return data.lstrip()[:1] == b"{"


def printable_byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet: each byte as a printable character, {character: byte}."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    alphabet = {chr(b): b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in printable:
            alphabet[chr(256 + shifted)] = b
            shifted += 1
    return alphabet


def _refuse(path: Path, why: str) -> UserError:
    return UserError(
        f"{path} {why}; only Llama 3's byte-level BPE tokenizer.json is read, point the tokenizer path "
        "at the checkpoint's tokenizer.model instead"
    )


def _pre_tokenizer_patterns(spec: dict) -> list[str]:
    steps = spec.get("pretokenizers", [spec]) if spec else []
    return [s.get("pattern", {}).get("Regex", "") for s in steps if s.get("type") == "Split"]


def read_tokenizer_json_ranks(path: Path, data: bytes) -> dict[bytes, int]:
    """{token bytes: rank} from a Llama 3 tokenizer.json, after checking it is one."""
    try:
        spec = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(
            f"{path} is not valid JSON ({e}); use the tokenizer files that ship with the checkpoint"
        ) from None
    model = spec.get("model") if isinstance(spec, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise _refuse(path, "is not a BPE tokenizer.json")
    if model.get("byte_fallback"):
        raise _refuse(path, "is a SentencePiece-style BPE with byte fallback (Llama 2)")
    if _pre_tokenizer_patterns(spec.get("pre_tokenizer") or {}) != [LLAMA3_PATTERN]:
        raise _refuse(path, "does not split text with Llama 3's pre-tokenizer pattern")

    alphabet = printable_byte_alphabet()
    ranks: dict[bytes, int] = {}
    for token, rank in model["vocab"].items():
        if any(c not in alphabet for c in token):
            raise _refuse(path, f"has vocabulary entry {token!r} outside the byte-level alphabet")
        ranks[bytes(alphabet[c] for c in token)] = rank
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise _refuse(path, f"does not number its vocabulary 0..{len(model['vocab']) - 1}")
    if any(bytes([b]) not in ranks for b in range(256)):
        raise _refuse(path, "lacks some of the 256 single-byte tokens")
    # tiktoken merges the pair whose result ranks lowest; the fast tokenizer follows the merges list.
    last = -1
    for merge in model.get("merges", []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        merged = model["vocab"].get(left + right)
        if merged is None or merged < last:
            raise _refuse(path, f"has merges that are not in rank order (at {left!r} + {right!r})")
        last = merged

    specials = {t["content"]: t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    for name in _CHECKED_SPECIAL_TOKENS:
        expected = len(ranks) + SPECIAL_TOKENS.index(name)
        if specials.get(name) != expected:
            raise _refuse(path, f"gives {name} id {specials.get(name)}, not {expected} (right after the vocabulary)")
    return ranks
