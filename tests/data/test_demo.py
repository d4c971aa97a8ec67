"""The demo data shipped in the package: present, small, correct and reproducible."""

import json
from pathlib import Path

import pytest

from finetune.data import build_dataset
from finetune.data.demo import DEMO_DIR, demo_path, make_demo_data
from finetune.data.demo.make_demo_data import FAMILIES, family_of
from finetune.errors import UserError
from finetune.tokenizers import Tokenizer

FILES = ("train.jsonl", "heldout.jsonl", "tokenizer.model")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_demo_files_exist_and_are_small() -> None:
    assert sum(demo_path(name).stat().st_size for name in FILES) < 2_500_000
    with pytest.raises(UserError, match="generate it with python -m finetune.data.demo.make_demo_data"):
        demo_path("missing.jsonl")


def test_demo_records_are_disjoint_and_correct() -> None:
    train, heldout = read_jsonl(demo_path("train.jsonl")), read_jsonl(demo_path("heldout.jsonl"))
    assert (len(train), len(heldout)) == (11831, 200)
    keys = {(r["instruction"], r["input"]) for r in train}
    assert len(keys) == len(train)
    assert not keys & {(r["instruction"], r["input"]) for r in heldout}
    for r in train + heldout:
        words = r["input"].split()
        family = family_of(r["instruction"])
        if family == "arithmetic":
            assert int(r["output"]) == int(words[0]) + int(words[2])
        elif family == "comparing":
            assert int(r["output"]) == max(int(words[0]), int(words[2]))
        elif family == "reversing":
            assert r["output"].split() == words[::-1]
        elif family == "sorting":
            assert r["output"].split() == sorted(words)
        elif family == "units":
            factor = {"cm": 100, "m": 1000, "mm": 10, "g": 1000, "ml": 1000}[r["output"].split()[1]]
            assert int(r["output"].split()[0]) == int(words[0]) * factor
        else:
            assert family == "counting", r
            start, end = (int(n) for n in r["instruction"].removesuffix(".").split()[2::2])
            assert r["output"] == " ".join(str(n) for n in range(start, end + 1))


def test_every_family_has_its_share_of_the_held_out_prompts() -> None:
    heldout = read_jsonl(demo_path("heldout.jsonl"))
    counts = {name: 0 for name in FAMILIES}
    for r in heldout:
        counts[family_of(r["instruction"])] += 1
    assert counts == {name: share for name, (_, _, share) in FAMILIES.items()}


def test_demo_tokenizer_has_512_pieces(sp_tokenizer: Tokenizer) -> None:
    assert (sp_tokenizer.vocab_size, sp_tokenizer.bos_id, sp_tokenizer.eos_id) == (512, 1, 2)
    text = "Zürich 12345  naïve"  # unseen characters fall back to bytes
    assert sp_tokenizer.decode(sp_tokenizer.encode(text)) == text


def test_demo_samples_are_short_with_the_plain_template(sp_tokenizer: Tokenizer) -> None:
    dataset = build_dataset(
        str(demo_path("train.jsonl")),
        dataset_type="instruct",
        tokenizer=sp_tokenizer,
        max_seq_len=64,
        template="plain",
    )
    assert max(len(dataset[i]["tokens"]) for i in range(len(dataset))) < 48


def test_regenerating_gives_identical_files(tmp_path: Path) -> None:
    make_demo_data.main(["--out", str(tmp_path)])
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (DEMO_DIR / name).read_bytes(), name
