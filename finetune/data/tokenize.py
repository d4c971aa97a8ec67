"""One record to training samples, and the one report of what tokenization did.

Shared by the in-memory path (`build_dataset` without a cache) and the cache builder
(finetune/data/build.py), so both give the same samples, the same counts and the same
messages for the same data.
"""

from dataclasses import dataclass, fields
from typing import Any, Literal, Mapping, Optional

from finetune.data.labels import has_targets, shifted_labels, truncate
from finetune.data.templates import InstructTemplate
from finetune.data.transforms import chat_messages, text_chunks, tokenize_instruct
from finetune.errors import UserError
from finetune.tokenizers import Tokenizer

DATASET_TYPES = ("instruct", "chat", "text")
DatasetType = Literal[DATASET_TYPES]  # type: ignore[valid-type]  # one list: Params reads this too

Sample = tuple[list[int], list[int]]


@dataclass(frozen=True)
class TokenizeSpec:
    """Everything besides the tokenizer that decides a record's tokens."""

    dataset_type: str
    max_seq_len: int
    template: Optional[InstructTemplate]  # instruct data only
    train_on_input: bool


@dataclass
class TokenizeStats:
    """What tokenization did to the records, for the one report at start."""

    records: int = 0
    truncated: int = 0
    longest: int = 0
    no_targets: int = 0

    def merge(self, other: "TokenizeStats") -> None:
        self.records += other.records
        self.truncated += other.truncated
        self.longest = max(self.longest, other.longest)
        self.no_targets += other.no_targets

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def tokenize_record(
    record: Mapping[str, Any], where: str, tokenizer: Tokenizer, spec: TokenizeSpec, stats: TokenizeStats
) -> list[Sample]:
    """The (tokens, shifted labels) samples of one record: none when nothing is left to learn,
    one for instruct and chat records, and one per `max_seq_len` chunk of a text document."""
    stats.records += 1
    if spec.dataset_type == "text":
        chunks = text_chunks(record, where, tokenizer, spec.max_seq_len)
        return [(chunk, shifted_labels(chunk, [False] * len(chunk))) for chunk in chunks]
    template = spec.template
    if template is not None:
        tokens, mask = tokenize_instruct(record, where, tokenizer, template, spec.train_on_input)
    else:
        tokens, mask = tokenizer.tokenize_messages(chat_messages(record, where, spec.train_on_input), add_eos=True)
    if len(tokens) > spec.max_seq_len:
        stats.truncated += 1
        stats.longest = max(stats.longest, len(tokens))
        prompt = _prompt_mask(record, where, tokenizer, template) if spec.train_on_input else None
        tokens, mask = truncate(tokens, mask, spec.max_seq_len, prompt)
    labels = shifted_labels(tokens, mask)
    if not has_targets(labels):
        stats.no_targets += 1
        return []
    return [(tokens, labels)]


def _prompt_mask(
    record: Mapping[str, Any], where: str, tokenizer: Tokenizer, template: Optional[InstructTemplate]
) -> list[bool]:
    """True on the prompt tokens of a record (what train_on_input=False would mask): where
    truncation must not teach the closing token."""
    if template is not None:
        return tokenize_instruct(record, where, tokenizer, template, train_on_input=False)[1]
    return tokenizer.tokenize_messages(chat_messages(record, where, train_on_input=False), add_eos=True)[1]


def summary(source: str, spec: TokenizeSpec, stats: TokenizeStats, num_samples: int, num_tokens: int) -> str:
    """The line a run logs about its dataset; raises when no sample is left to train on."""
    if spec.dataset_type == "text":
        if not num_samples:
            raise UserError(f"dataset {source} holds no text; add text to its 'text' column")
        return (
            f"dataset {source}: {stats.records} documents -> {num_samples} samples of at "
            f"most max_seq_len={spec.max_seq_len} tokens, {num_tokens} tokens"
        )
    if not num_samples:
        raise UserError(
            f"no sample of {source} has a token to learn from after masking and "
            f"truncation to max_seq_len={spec.max_seq_len}; raise max_seq_len or unmask some turns"
        )
    message = f"dataset {source}: {num_samples} samples, {num_tokens} tokens"
    if stats.truncated:
        message += (
            f"; {stats.truncated} of {stats.records} samples were longer than "
            f"max_seq_len={spec.max_seq_len} and were truncated (longest {stats.longest} tokens)"
        )
    if stats.no_targets:
        message += f"; {stats.no_targets} samples with nothing left to learn were skipped"
    return message
