"""Generate the demo dataset and its tokenizer (deterministic; run to regenerate).

    python -m finetune.data.demo.make_demo_data [--out DIR]

Writes `train.jsonl` (alpaca-format records), `heldout.jsonl` (200 records, an equal share
from each task family, none of which appear in train) and `tokenizer.model` (SentencePiece
BPE, exactly 512 pieces, one piece per digit). The tasks are small and rule-based (adding
numbers, picking the larger one, reversing and sorting words, unit conversions, counting):
every answer is computed from its prompt, so a held-out prompt can only be answered by a
model that learned the rule, which a model of a few million parameters does within minutes
on a laptop CPU.
"""

import argparse
import io
import json
import random
from itertools import permutations
from pathlib import Path
from typing import Callable, Iterator

import sentencepiece as spm

from finetune.data.templates import ALPACA

Record = dict[str, str]

SEED = 20240601
VOCAB_SIZE = 512
WORDS = ("cat dog sun tree book milk fish bird lamp rain star moon door cake ship frog hat pen cup box").split()
UNITS = (  # (from, to, factor, instruction)
    ("m", "cm", 100, "Convert meters to centimeters."),
    ("km", "m", 1000, "Convert kilometers to meters."),
    ("cm", "mm", 10, "Convert centimeters to millimeters."),
    ("kg", "g", 1000, "Convert kilograms to grams."),
    ("l", "ml", 1000, "Convert liters to milliliters."),
)


def _record(instruction: str, input: str, output: str) -> Record:
    return {"instruction": instruction, "input": input, "output": output}


def add_numbers() -> Iterator[Record]:
    for a in range(1000):
        for b in range(10):
            yield _record("Add the two numbers.", f"{a} and {b}", str(a + b))


def larger_number() -> Iterator[Record]:
    for a in range(100):
        for b in range(100):
            if a != b:
                yield _record("Which number is larger?", f"{a} or {b}", str(max(a, b)))


def reverse_words() -> Iterator[Record]:
    for words in permutations(WORDS, 3):
        yield _record("Reverse the order of the words.", " ".join(words), " ".join(words[::-1]))


def sort_words() -> Iterator[Record]:
    for n in (3, 4):
        for words in permutations(WORDS[:12], n):
            text = " ".join(words)
            yield _record("Sort the words alphabetically.", text, " ".join(sorted(words)))


def convert_units() -> Iterator[Record]:
    for unit, target, factor, instruction in UNITS:
        for value in range(1, 100):
            yield _record(instruction, f"{value} {unit}", f"{value * factor} {target}")


def count_up() -> Iterator[Record]:
    # No input: exercises the template's instruction-only form.
    for start in range(1000):
        numbers = " ".join(str(n) for n in range(start, start + 4))
        yield _record(f"Count from {start} to {start + 3}.", "", numbers)


# Task family -> (its records, how many go to train, how many are held out). The shares stay
# within each pool, so no record repeats; the held-out shares add up to NUM_HELDOUT.
FAMILIES: dict[str, tuple[Callable[[], Iterator[Record]], int, int]] = {
    "arithmetic": (add_numbers, 4000, 40),
    "comparing": (larger_number, 3400, 32),
    "reversing": (reverse_words, 1500, 32),
    "sorting": (sort_words, 1500, 32),
    "units": (convert_units, 463, 32),
    "counting": (count_up, 968, 32),
}
NUM_HELDOUT = sum(heldout for _, _, heldout in FAMILIES.values())


def family_of(instruction: str) -> str:
    """The task family a demo instruction belongs to (the name scores are reported by)."""
    if instruction.startswith("Add "):
        return "arithmetic"
    if instruction.startswith("Which number"):
        return "comparing"
    if instruction.startswith("Reverse "):
        return "reversing"
    if instruction.startswith("Sort "):
        return "sorting"
    if instruction.startswith("Convert "):
        return "units"
    if instruction.startswith("Count "):
        return "counting"
    return "other"


def make_records(seed: int = SEED) -> tuple[list[Record], list[Record]]:
    """(train, heldout): disjoint, shuffled, the same for the same seed."""
    rng = random.Random(seed)
    train: list[Record] = []
    heldout: list[Record] = []
    for task, num_train, num_heldout in FAMILIES.values():
        chosen = rng.sample(list(task()), num_train + num_heldout)
        heldout += chosen[:num_heldout]
        train += chosen[num_heldout:]
    rng.shuffle(train)
    rng.shuffle(heldout)
    return train, heldout


def tokenizer_sentences(records: list[Record]) -> Iterator[str]:
    """Lines of the alpaca-rendered records: the prompt words of both templates get pieces (the
    plain template's lines are a subset), so either one fits the demo's 64-token samples."""
    for record in records:
        text = ALPACA.format(record["instruction"], record["input"]) + record["output"]
        yield from (line for line in text.split("\n") if line)


def train_tokenizer(records: list[Record]) -> bytes:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=tokenizer_sentences(records),
        model_writer=model,
        model_type="bpe",
        vocab_size=VOCAB_SIZE,
        byte_fallback=True,
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=-1,
        character_coverage=1.0,
        # As Llama 2's own model: text kept verbatim (and no NFKC tables in the file), and
        # one token per digit, which makes the arithmetic tasks learnable.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    return model.getvalue()


def write_jsonl(path: Path, records: list[Record]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent, help="output folder")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    train, heldout = make_records()
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "heldout.jsonl", heldout)
    (args.out / "tokenizer.model").write_bytes(train_tokenizer(train))
    print(
        f"wrote {len(train)} train and {len(heldout)} held-out records and a {VOCAB_SIZE}-piece tokenizer to {args.out}"
    )


if __name__ == "__main__":
    main()
