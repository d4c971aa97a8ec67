"""Generate the demo's preference pairs from its instruction records (deterministic; run to regenerate).

    python -m finetune.data.demo.make_preference_data [--out DIR]

Writes `preference_train.jsonl` (2,000 pairs drawn from train.jsonl) and `preference_heldout.jsonl`
(one pair for each of the 200 held-out records). Each pair keeps the record's instruction and
input; `chosen` is the computed answer and `rejected` a wrong one of the same shape: a sum off by
a few, the smaller number, the words in another order, a count that skips a number, a
conversion off by a few.
"""

import argparse
import json
import random
from pathlib import Path

from finetune.data.demo.make_demo_data import write_jsonl

SEED = 20241204
NUM_TRAIN_PAIRS = 2000
DEMO_DIR = Path(__file__).parent


def wrong_answer(record: dict[str, str], rng: random.Random) -> str:
    """An answer to `record` that is not its output, shaped like it."""
    output, input = record["output"], record["input"]
    words = output.split()
    if record["instruction"] == "Which number is larger?":
        a, b = input.split(" or ")
        return min(a, b, key=int)
    if len(words) == 1 and output.isdigit():  # a sum
        return str(max(0, int(output) + rng.choice([-3, -2, -1, 1, 2, 3, 10])))
    if len(words) == 2 and words[0].isdigit():  # a conversion: "300 cm"
        return f"{int(words[0]) + rng.choice([-10, -1, 1, 10])} {words[1]}"
    if all(w.isdigit() for w in words):  # counting: skip a number in the middle
        skipped = rng.randrange(1, len(words) - 1)
        return " ".join(words[:skipped] + words[skipped + 1 :])
    while True:  # reversing or sorting words: another order
        shuffled = rng.sample(words, len(words))
        if shuffled != words:
            return " ".join(shuffled)


def make_pairs(records: list[dict[str, str]], rng: random.Random) -> list[dict[str, str]]:
    return [
        {"instruction": r["instruction"], "input": r["input"], "chosen": r["output"], "rejected": wrong_answer(r, rng)}
        for r in records
    ]


def read_jsonl(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEMO_DIR, help="output folder")
    args = parser.parse_args(argv)
    rng = random.Random(SEED)
    train = rng.sample(read_jsonl(DEMO_DIR / "train.jsonl"), NUM_TRAIN_PAIRS)
    heldout = read_jsonl(DEMO_DIR / "heldout.jsonl")
    write_jsonl(args.out / "preference_train.jsonl", make_pairs(train, rng))
    write_jsonl(args.out / "preference_heldout.jsonl", make_pairs(heldout, rng))
    print(f"wrote {NUM_TRAIN_PAIRS} training and {len(heldout)} held-out preference pairs to {args.out}")


if __name__ == "__main__":
    main()
