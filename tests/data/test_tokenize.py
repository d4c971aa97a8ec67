"""Samples and their shifted loss labels, computed by hand from the tokenizer's encode."""

from pathlib import Path

import numpy as np
import pytest

from finetune.data import IGNORE_INDEX, InstructTemplate, build_dataset, register_template, reporting
from finetune.data.labels import labels_from_flags, shifted_labels, trained_flags, truncate
from finetune.errors import UserError
from finetune.tokenizers import Tokenizer
from tests.data.helpers import ALPACA_RECORDS, write_jsonl

X = IGNORE_INDEX

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nAdd the two numbers.\n\n### Input:\n2 and 3\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\nCount from 1 to 3.\n\n### Response:\n"
)


def build(tmp_path: Path, records: list[dict], tokenizer: Tokenizer, **kwargs):  # type: ignore[no-untyped-def]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    kwargs.setdefault("dataset_type", "instruct")
    kwargs.setdefault("max_seq_len", 512)
    return build_dataset(str(path), tokenizer=tokenizer, **kwargs)


def test_shifted_labels_and_truncate_by_hand() -> None:
    assert shifted_labels([1, 10, 11, 12, 2], [True, True, False, False, False]) == [X, 11, 12, 2, X]
    # Cut inside the response: the closing token still teaches the model to stop.
    assert truncate([1, 10, 11, 12, 2], [True, True, False, False, False], 4) == (
        [1, 10, 11, 2],
        [True, True, False, False],
    )
    # Cut inside the prompt: ending the turn there is not something to learn.
    assert truncate([1, 10, 11, 12, 2], [True, True, False, False, False], 3) == ([1, 10, 2], [True, True, True])
    # train_on_input trains the prompt; a cut inside it still must not teach the closing token.
    prompt = [True, True, False, False, False]
    assert truncate([1, 10, 11, 12, 2], [False] * 5, 3, prompt) == ([1, 10, 2], [False, False, True])
    assert truncate([1, 10, 11, 12, 2], [False] * 5, 4, prompt) == ([1, 10, 11, 2], [False] * 4)
    # A cut right after a turn's own closing token (2) keeps it once.
    assert truncate([1, 10, 2, 11, 12, 2], [True, False, False, True, False, False], 4) == (
        [1, 10, 2],
        [True, False, False],
    )


def test_alpaca_sample_trains_only_on_the_response(tmp_path: Path, sp_tokenizer: Tokenizer) -> None:
    dataset = build(tmp_path, ALPACA_RECORDS[:2], sp_tokenizer)
    for i, (prompt, response) in enumerate([(ALPACA_PROMPT, "5"), (ALPACA_PROMPT_NO_INPUT, "1 2 3")]):
        prompt_ids = sp_tokenizer.encode(prompt, add_bos=True, add_eos=False)
        response_ids = sp_tokenizer.encode(response, add_bos=False, add_eos=True, continuation=True)
        assert prompt_ids[0] == 1 and response_ids[-1] == 2
        assert dataset[i] == {
            "tokens": prompt_ids + response_ids,
            "labels": [X] * (len(prompt_ids) - 1) + response_ids + [X],
        }


def test_train_on_input_trains_on_the_prompt_too(tmp_path: Path, sp_tokenizer: Tokenizer) -> None:
    dataset = build(tmp_path, ALPACA_RECORDS[:1], sp_tokenizer, template="plain", train_on_input=True)
    tokens = sp_tokenizer.encode("Add the two numbers.\n2 and 3\n", add_eos=False)
    tokens += sp_tokenizer.encode("5", add_bos=False, continuation=True)
    assert dataset[0] == {"tokens": tokens, "labels": tokens[1:] + [X]}


def test_registered_template_is_usable_by_name(tmp_path: Path, sp_tokenizer: Tokenizer) -> None:
    register_template(InstructTemplate("qa", "Q: {instruction} {input}\nA: ", "Q: {instruction}\nA: "))
    with pytest.raises(ValueError, match="exists"):
        register_template(InstructTemplate("qa", "", ""))
    dataset = build(tmp_path, ALPACA_RECORDS[1:2], sp_tokenizer, template="qa")
    prompt = sp_tokenizer.encode("Q: Count from 1 to 3.\nA: ", add_eos=False)
    assert dataset[0]["tokens"][: len(prompt)] == prompt


def test_truncation_keeps_eos_and_is_reported_once(tmp_path: Path, sp_tokenizer: Tokenizer) -> None:
    messages: list[str] = []
    long = {"instruction": "Add the two numbers.", "input": "", "output": "1 2 3 4 5 6 7 8 9 10 11"}
    records = [long, ALPACA_RECORDS[0], long]
    full = sp_tokenizer.encode("Add the two numbers.\n", add_eos=False)
    full += sp_tokenizer.encode("1 2 3 4 5 6 7 8 9 10 11", add_bos=False, continuation=True)
    short = sp_tokenizer.encode("Add the two numbers.\n2 and 3\n", add_eos=False)
    short += sp_tokenizer.encode("5", add_bos=False, continuation=True)
    assert (len(short), len(full)) == (14, 31)
    dataset = build(tmp_path, records, sp_tokenizer, template="plain", max_seq_len=16, log=messages.append)
    assert [len(s["tokens"]) for s in dataset] == [16, 14, 16]
    assert dataset[0]["tokens"] == full[:15] + [sp_tokenizer.eos_id]
    assert dataset[0]["labels"][-2:] == [sp_tokenizer.eos_id, X]
    assert messages == [
        f"dataset {tmp_path / 'd.jsonl'}: 3 samples, 46 tokens; 2 of 3 samples were longer "
        "than max_seq_len=16 and were truncated (longest 31 tokens)"
    ]


def test_a_sample_cut_inside_its_prompt_is_skipped_not_taught_to_stop(tmp_path: Path, sp_tokenizer: Tokenizer) -> None:
    messages: list[str] = []
    long_prompt = {"instruction": " ".join(["word"] * 40), "input": "", "output": "yes"}
    dataset = build(
        tmp_path, [long_prompt, ALPACA_RECORDS[0]], sp_tokenizer, template="plain", max_seq_len=16, log=messages.append
    )
    assert len(dataset) == 1 and len(dataset[0]["tokens"]) == 14
    assert messages[0].endswith("; 1 samples with nothing left to learn were skipped")


def test_train_on_input_cut_inside_the_prompt_does_not_teach_the_closing_token(
    tmp_path: Path, sp_tokenizer: Tokenizer, llama3_tokenizer: Tokenizer
) -> None:
    long_prompt = {"instruction": " ".join(["word"] * 40), "input": "", "output": "yes"}
    [sample] = build(tmp_path, [long_prompt], sp_tokenizer, template="plain", max_seq_len=16, train_on_input=True)
    assert sample["tokens"][-1] == sp_tokenizer.eos_id
    assert sample["labels"][-2:] == [X, X]  # the prompt's words are trained, the cut-off eos is not
    assert all(label != X for label in sample["labels"][:-2])
    chat = {"messages": [{"role": "user", "content": " ".join(["word"] * 40)}, {"role": "assistant", "content": "yes"}]}
    [sample] = build(tmp_path, [chat], llama3_tokenizer, dataset_type="chat", max_seq_len=16, train_on_input=True)
    assert sample["labels"][-2:] == [X, X]


def test_a_cut_right_after_an_answer_keeps_one_closing_token(tmp_path: Path, llama3_tokenizer: Tokenizer) -> None:
    tok = llama3_tokenizer
    eot = tok.special_tokens["<|eot_id|>"]  # type: ignore[attr-defined]
    turns = [{"role": r, "content": c} for r, c in CHAT]
    [full] = build(tmp_path, [{"messages": turns}], tok, dataset_type="chat")
    first_answer_end = full["labels"].index(eot) + 1  # where the first trained <|eot_id|> sits
    [cut] = build(tmp_path, [{"messages": turns}], tok, dataset_type="chat", max_seq_len=first_answer_end + 2)
    assert cut["tokens"] == full["tokens"][: first_answer_end + 1]
    assert cut["labels"] == full["labels"][:first_answer_end] + [X]


def test_reports_stay_silent_off_rank_zero(
    tmp_path: Path, sp_tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reporting, "is_rank_zero", lambda: False)
    messages: list[str] = []
    build(tmp_path, ALPACA_RECORDS, sp_tokenizer, packed=True, max_seq_len=64, log=messages.append)
    assert messages == []


def llama2_chat_by_hand(tok: Tokenizer) -> tuple[list[int], list[int]]:
    blocks = [
        ("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nAdd 2 and 3. [/INST]", "5 "),
        ("[INST] And 4 and 4? [/INST]", "8 "),
    ]
    tokens: list[int] = []
    labels: list[int] = []
    for prompt, answer in blocks:
        prompt_ids = tok.encode(prompt, add_bos=True, add_eos=False)
        answer_ids = tok.encode(answer, add_bos=False, add_eos=True)
        # </s> is followed by the next block's unlearned <s> (or nothing): no target.
        labels += [X] * (len(prompt_ids) - 1) + answer_ids + [X]
        tokens += prompt_ids + answer_ids
    return tokens, labels


CHAT = [
    ("system", "Be brief."),
    ("user", "Add 2 and 3."),
    ("assistant", "5"),
    ("user", "And 4 and 4?"),
    ("assistant", "8"),
]
SHAREGPT_NAMES = {"system": "system", "user": "human", "assistant": "gpt"}


def test_multi_turn_chat_llama2_labels(tmp_path: Path, sp_tokenizer: Tokenizer) -> None:
    openai = {"messages": [{"role": r, "content": c} for r, c in CHAT]}
    sharegpt = {"conversations": [{"from": SHAREGPT_NAMES[r], "value": c} for r, c in CHAT]}
    dataset = build(tmp_path, [openai, sharegpt], sp_tokenizer, dataset_type="chat")
    tokens, labels = llama2_chat_by_hand(sp_tokenizer)
    assert dataset[0] == {"tokens": tokens, "labels": labels}
    assert dataset[1] == dataset[0]


def test_multi_turn_chat_llama3_labels(tmp_path: Path, llama3_tokenizer: Tokenizer) -> None:
    tok = llama3_tokenizer
    dataset = build(tmp_path, [{"messages": [{"role": r, "content": c} for r, c in CHAT]}], tok, dataset_type="chat")
    special = tok.special_tokens  # type: ignore[attr-defined]
    eot = special["<|eot_id|>"]
    tokens, labels = [tok.bos_id], []
    for role, content in CHAT:
        header = [
            special["<|start_header_id|>"],
            *tok.encode(role, False, False),
            special["<|end_header_id|>"],
            *tok.encode("\n\n", False, False),
        ]
        body = tok.encode(content, False, False) + [eot]
        labels += [X] * len(header)
        labels += body if role == "assistant" else [X] * len(body)
        tokens += header + body
    assert dataset[0] == {"tokens": tokens, "labels": labels + [X]}
    assert tokens[-1] == eot and labels[-1] == eot


def test_chat_train_on_input_and_message_weights(tmp_path: Path, sp_tokenizer: Tokenizer) -> None:
    turns = [{"role": r, "content": c} for r, c in CHAT]
    dataset = build(tmp_path, [{"messages": turns}], sp_tokenizer, dataset_type="chat", train_on_input=True)
    tokens, _ = llama2_chat_by_hand(sp_tokenizer)
    assert dataset[0] == {"tokens": tokens, "labels": tokens[1:] + [X]}

    # weight 0 on the first answer: only the second exchange's answer is learned (ShareGPT turns too).
    turns[2]["weight"] = 0
    sharegpt = [
        {"from": SHAREGPT_NAMES[t["role"]], "value": t["content"], **({"weight": 0} if "weight" in t else {})}
        for t in turns
    ]
    dataset = build(tmp_path, [{"messages": turns}, {"conversations": sharegpt}], sp_tokenizer, dataset_type="chat")
    second_answer = sp_tokenizer.encode("8 ", add_bos=False, add_eos=True)
    assert [label for label in dataset[0]["labels"] if label != X] == second_answer
    assert dataset[1] == dataset[0]


def test_samples_without_targets_are_skipped(tmp_path: Path, sp_tokenizer: Tokenizer) -> None:
    silent = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "weight": 0}]}
    spoken = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    messages: list[str] = []
    dataset = build(tmp_path, [silent, spoken], sp_tokenizer, dataset_type="chat", log=messages.append)
    assert len(dataset) == 1
    assert messages[0].endswith("; 1 samples with nothing left to learn were skipped")
    with pytest.raises(UserError, match="has a token to learn from"):
        build(tmp_path, [silent], sp_tokenizer, dataset_type="chat")


def test_text_is_cut_into_chunks(tmp_path: Path, sp_tokenizer: Tokenizer) -> None:
    text = "Add the two numbers. Reverse the order of the words. Sort the words alphabetically."
    full = sp_tokenizer.encode(text)
    path = tmp_path / "book.txt"
    path.write_text(text, encoding="utf-8")
    dataset = build_dataset(str(path), dataset_type="text", tokenizer=sp_tokenizer, max_seq_len=8)
    expected = [full[i : i + 8] for i in range(0, len(full), 8)]
    expected = [chunk for chunk in expected if len(chunk) > 1]
    assert [s["tokens"] for s in dataset] == expected
    assert [s["labels"] for s in dataset] == [chunk[1:] + [X] for chunk in expected]

    # A last piece of one token has nothing to predict and is dropped.
    one_left = build_dataset(str(path), dataset_type="text", tokenizer=sp_tokenizer, max_seq_len=len(full) - 1)
    assert [s["tokens"] for s in one_left] == [full[:-1]]


def test_flags_give_back_the_labels_of_any_span_of_whole_samples():
    rng = np.random.default_rng(0)
    samples = []
    for _ in range(50):
        tokens = rng.integers(0, 1000, int(rng.integers(1, 40))).tolist()
        samples.append((tokens, shifted_labels(tokens, (rng.random(len(tokens)) < 0.4).tolist())))
    tokens = np.array([t for sample, _ in samples for t in sample], dtype=np.int32)
    labels = np.array([label for _, sample in samples for label in sample], dtype=np.int32)
    lengths = np.array([len(sample) for sample, _ in samples])
    trained = trained_flags(tokens, labels, lengths)
    assert trained.dtype == np.uint8 and trained.sum() == (labels != X).sum() > 0
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    for first, stop in [(0, 50), (0, 1), (49, 50), (10, 11), (7, 30)]:
        start, end = offsets[first], offsets[stop]
        assert labels_from_flags(tokens[start:end], trained[start:end]).tolist() == labels[start:end].tolist()


@pytest.mark.parametrize("where", ["not the next token", "past the sample's end"])
def test_flags_refuse_labels_that_are_not_shifted_tokens(where):
    tokens = np.array([5, 6, 7, 8, 9], dtype=np.int32)
    lengths = np.array([2, 3])
    labels = np.array(shifted_labels([5, 6], [False, False]) + shifted_labels([7, 8, 9], [False] * 3), dtype=np.int32)
    if where == "not the next token":
        labels[2] = 3
    else:
        labels[1] = 7  # the first sample's last label would reach into the second sample
    with pytest.raises(ValueError, match="not the shifted tokens"):
        trained_flags(tokens, labels, lengths)
