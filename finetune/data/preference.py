"""Preference pairs for DPO-style training: a prompt, a chosen and a rejected response.

Records come from the same sources as supervised data (`load_records`: local files, dataset
folders, the Hub) in the layouts preference datasets on the Hub use:

- text: `prompt`, `chosen`, `rejected` strings; or `instruction` (+ `input`) rendered with an
  instruct template in place of `prompt`; or only `chosen` and `rejected` holding the whole
  text, the prompt being their common beginning (Anthropic HH);
- conversations: `chosen` and `rejected` as message lists ({role, content}), with `prompt` as
  a message list, or without one, the prompt being the turns both lists begin with
  (UltraFeedback's binarized layout, whose `prompt` string then goes unused).

Each side of a pair is tokenized as prompt + response with the prompt masked, so its labels
train the response only; both sides of a pair always travel in one batch (`collate_pairs`:
the chosen rows first, then the rejected rows in the same order).
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from finetune.data.labels import has_targets, shifted_labels, truncate
from finetune.data.loader import collate
from finetune.data.reporting import LogFn, is_rank_zero, rank_zero_log
from finetune.data.sources import Records, load_records
from finetune.data.templates import InstructTemplate, get_template
from finetune.data.transforms import chat_messages, missing_column, text_column
from finetune.errors import UserError
from finetune.tokenizers import Message, Tokenizer

Sample = tuple[list[int], list[int]]  # tokens, labels


class PreferenceDataset(Dataset):
    """Tokenized pairs; item i is {"chosen": {tokens, labels}, "rejected": {...}, "index": i}."""

    def __init__(self) -> None:
        self._tokens = array("i")
        self._labels = array("i")
        self._offsets = array("q", [0])  # two sequences per pair: chosen, then rejected

    def append(self, chosen: Sample, rejected: Sample) -> None:
        for tokens, labels in (chosen, rejected):
            self._tokens.extend(tokens)
            self._labels.extend(labels)
            self._offsets.append(len(self._tokens))

    def __len__(self) -> int:
        return (len(self._offsets) - 1) // 2

    def _sequence(self, k: int) -> dict[str, list[int]]:
        start, end = self._offsets[k], self._offsets[k + 1]
        return {"tokens": self._tokens[start:end].tolist(), "labels": self._labels[start:end].tolist()}

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"pair {index} out of range for {len(self)} pairs")
        return {"chosen": self._sequence(2 * index), "rejected": self._sequence(2 * index + 1), "index": index}

    @property
    def num_tokens(self) -> int:
        return len(self._tokens)


def collate_pairs(pairs: Sequence[Mapping[str, Any]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """A batch of 2B rows padded to the longest: the B chosen sequences, then the B rejected ones
    in the same order, plus `pair_index` [B], each pair's place in its dataset."""
    batch = collate([p["chosen"] for p in pairs] + [p["rejected"] for p in pairs], pad_id=pad_id)
    batch["pair_index"] = torch.tensor([p["index"] for p in pairs], dtype=torch.long)
    return batch


@dataclass
class PairStats:
    records: int = 0
    truncated: int = 0
    no_targets: int = 0


def build_preference_dataset(
    source: str,
    *,
    chat: bool,
    tokenizer: Tokenizer,
    max_seq_len: int,
    template: str | InstructTemplate = "alpaca",
    column_map: Optional[dict[str, str]] = None,
    split: str = "train",
    split_key: str = "split",
    subset: Optional[str] = None,
    log: Optional[LogFn] = None,
) -> PreferenceDataset:
    """Load and tokenize the pairs of `source`: text pairs, or conversations when `chat`.

    A side longer than `max_seq_len` is cut keeping its closing token (as supervised samples
    are); a pair where either side has no response token left is skipped and counted.
    """
    records = load_records(source, split=split, split_key=split_key, column_map=column_map, subset=subset)
    tmpl = get_template(template)
    dataset, stats = PreferenceDataset(), PairStats(records=len(records))
    progress = tqdm(range(len(records)), desc="tokenizing pairs", unit="pair", disable=not is_rank_zero())
    for i in progress:
        where = records.where(i)
        if chat:
            sides = conversation_pair(records[i], where, tokenizer)
        else:
            sides = text_pair(records[i], where, tokenizer, tmpl)
        samples = []
        for tokens, mask in sides:
            if len(tokens) > max_seq_len:
                stats.truncated += 1
                tokens, mask = truncate(tokens, mask, max_seq_len)
            samples.append((tokens, shifted_labels(tokens, mask)))
        if not all(has_targets(labels) for _, labels in samples):
            stats.no_targets += 1
            continue
        dataset.append(*samples)
    _report(records, dataset, stats, max_seq_len, rank_zero_log(log))
    return dataset


def _report(records: Records, dataset: PreferenceDataset, stats: PairStats, max_seq_len: int, report: LogFn) -> None:
    if not len(dataset):
        raise UserError(
            f"no pair of {records.source} has a response token left after truncation to "
            f"max_seq_len={max_seq_len}; raise max_seq_len or shorten the prompts"
        )
    message = f"dataset {records.source}: {len(dataset)} preference pairs, {dataset.num_tokens} tokens"
    if stats.truncated:
        message += f"; {stats.truncated} responses were longer than max_seq_len={max_seq_len} and were truncated"
    if stats.no_targets:
        message += f"; {stats.no_targets} pairs cut inside their prompt were skipped"
    report(message)


# ----------------------------------------------------------------------------------------------
# Text pairs
# ----------------------------------------------------------------------------------------------


def text_pair(
    record: Mapping[str, Any], where: str, tokenizer: Tokenizer, template: InstructTemplate
) -> list[tuple[list[int], list[bool]]]:
    """(tokens, mask) of prompt + chosen and of prompt + rejected; mask True on the prompt."""
    for column in ("chosen", "rejected"):
        if column in record and isinstance(record[column], list):
            raise UserError(
                f"column '{column}' of {where} holds a list of messages; conversations are read with dataset_type=chat"
            )
    chosen = text_column(record, "chosen", where)
    rejected = text_column(record, "rejected", where)
    if "prompt" in record:
        prompt = text_column(record, "prompt", where)
    elif "instruction" in record:
        prompt = template.format(text_column(record, "instruction", where), text_column(record, "input", where, False))
    else:
        prompt, chosen, rejected = split_common_prefix(chosen, rejected)
    if not chosen or not rejected:
        raise UserError(
            f"{where} has an empty {'chosen' if not chosen else 'rejected'} response; "
            "each side of a pair needs text after the prompt"
        )
    prompt_ids = tokenizer.encode(prompt, add_bos=True, add_eos=False)
    sides = []
    for response in (chosen, rejected):
        # As for instruct data: the response continues the prompt's text (no added leading space).
        ids = tokenizer.encode(response, add_bos=False, add_eos=True, continuation=True)
        sides.append((prompt_ids + ids, [True] * len(prompt_ids) + [False] * len(ids)))
    return sides


def split_common_prefix(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen response, rejected response) of two whole texts sharing a beginning.

    The prompt ends before the whitespace that precedes the first differing word, so neither
    response starts inside a word ("is 4" / "is 42" split as "is" + " 4" / " 42").
    """
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    cut = max(chosen.rfind(space, 0, n) for space in " \n\t")
    if cut <= 0:  # no word boundary in the shared text: split where the texts part
        cut = n
    return chosen[:cut], chosen[cut:], rejected[cut:]


# ----------------------------------------------------------------------------------------------
# Conversations
# ----------------------------------------------------------------------------------------------


def conversation_pair(
    record: Mapping[str, Any], where: str, tokenizer: Tokenizer
) -> list[tuple[list[int], list[bool]]]:
    """(tokens, mask) of each side rendered in the tokenizer's chat format; every prompt turn
    is masked and the response's assistant turns are trained."""
    chosen, rejected = (_messages(record, column, where) for column in ("chosen", "rejected"))
    prompt = record.get("prompt")
    if isinstance(prompt, list):
        prompt_turns = _messages(record, "prompt", where)
    else:
        # No message-list prompt: the turns both sides begin with are the prompt.
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        if shared == 0:
            raise UserError(
                f"{where} has no prompt: 'chosen' and 'rejected' do not begin with the same turns and "
                "there is no 'prompt' message list; add a prompt column of messages"
            )
        prompt_turns, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    sides = []
    for name, response in (("chosen", chosen), ("rejected", rejected)):
        if not any(turn["role"] == "assistant" for turn in response):
            raise UserError(f"the {name} response of {where} has no assistant turn after the prompt; fix the record")
        messages = chat_messages({"messages": prompt_turns + response}, where, train_on_input=False)
        # The prompt's own assistant turns (earlier in the conversation) are context, not the response.
        messages = [
            Message(role=m.role, content=m.content, masked=True) if k < len(prompt_turns) else m
            for k, m in enumerate(messages)
        ]
        sides.append(tokenizer.tokenize_messages(messages, add_eos=True))
    return sides


def _messages(record: Mapping[str, Any], column: str, where: str) -> list[dict[str, Any]]:
    if column not in record:
        raise missing_column(column, record, where)
    value = record[column]
    if isinstance(value, str):
        raise UserError(
            f"column '{column}' of {where} holds text, expected a list of {{role, content}} messages; "
            "text pairs are read with dataset_type=instruct"
        )
    if not isinstance(value, list) or not value:
        raise UserError(
            f"column '{column}' of {where} holds {type(value).__name__} {str(value)[:40]!r}, expected a "
            "non-empty list of {role, content} messages; fix the record"
        )
    return [dict(turn) if isinstance(turn, Mapping) else turn for turn in value]
