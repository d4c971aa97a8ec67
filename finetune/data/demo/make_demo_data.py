"""Generate the demo dataset and its tokenizer (deterministic; run to regenerate).

    python -m finetune.data.demo.make_demo_data [--out DIR]

Writes `train.jsonl` (18039 alpaca-format records), `heldout.jsonl` (200 records none of
which appear in train) and `tokenizer.model` (SentencePiece BPE, exactly 512 pieces).
The tasks are small and rule-based (adding numbers, picking the larger one, reversing and
sorting words, unit conversions, counting) so that a model of a few million parameters
visibly learns them within minutes on a laptop CPU.
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
NUM_HELDOUT = 200
VOCAB_SIZE = 512
WORDS = ("cat dog sun tree book milk fish bird lamp rain star moon door cake ship frog hat pen cup box").split()
UNITS = (  # (from, to, factor, instruction)
    ("m", "cm", 100, "Convert meters to centimeters."),
    ("km", "m", 1000, "Convert kilometers to meters."),
    ("h", "min", 60, "Convert hours to minutes."),
    ("kg", "g", 1000, "Convert kilograms to grams."),
    ("min", "s", 60, "Convert minutes to seconds."),
)


def _record(instruction: str, input: str, output: str) -> Record:
    return {"instruction": instruction, "input": input, "output": output}


def add_numbers() -> Iterator[Record]:
    for a in range(50):
        for b in range(50):
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
    for start in range(61):
        for length in range(3, 7):
            numbers = " ".join(str(n) for n in range(start, start + length))
            yield _record(f"Count from {start} to {start + length - 1}.", "", numbers)


# How many records each task contributes (train and held-out together); no share exceeds its
# task's pool, so no record repeats.
TASKS: tuple[tuple[Callable[[], Iterator[Record]], int], ...] = (
    (add_numbers, 2500),
    (larger_number, 5000),
    (reverse_words, 5000),
    (sort_words, 5000),
    (convert_units, 495),
    (count_up, 244),
)


def make_records(seed: int = SEED) -> tuple[list[Record], list[Record]]:
    """(train, heldout): disjoint, shuffled, the same for the same seed."""
    rng = random.Random(seed)
    records: list[Record] = []
    for task, share in TASKS:
        pool = list(task())
        records += rng.sample(pool, share)
    rng.shuffle(records)
    return records[NUM_HELDOUT:], records[:NUM_HELDOUT]


def tokenizer_sentences(records: list[Record]) -> Iterator[str]:
    """Lines of the alpaca-rendered records, so prompt words get pieces of their own."""
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
