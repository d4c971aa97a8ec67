"""Preference pairs: each layout's prompt is masked and its responses trained, both sides of a pair
travel in one batch, and a bad record is one line naming its file and line."""

from pathlib import Path

from finetune.data import build_dataset
from finetune.data.labels import IGNORE_INDEX
from finetune.data.preference import build_preference_dataset, collate_pairs, split_common_prefix
from finetune.tokenizers import Message, Tokenizer
from tests.data.helpers import user_error, write_jsonl


def pairs(path: Path, tokenizer: Tokenizer, chat: bool = False, **kwargs):  # type: ignore[no-untyped-def]
    return build_preference_dataset(
        str(path), chat=chat, tokenizer=tokenizer, max_seq_len=kwargs.pop("n", 128), **kwargs
    )


def trained(sample: dict) -> list[int]:
    return [label for label in sample["labels"] if label != IGNORE_INDEX]


def test_text_pairs_mask_the_prompt_and_train_each_response(tmp_path: Path, sp_tokenizer: Tokenizer) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Add 2 and 3.\n", "chosen": "5", "rejected": "6 or 7"}])
    pair = pairs(path, sp_tokenizer)[0]
    prompt = sp_tokenizer.encode("Add 2 and 3.\n", add_bos=True, add_eos=False)
    for side, response in (("chosen", "5"), ("rejected", "6 or 7")):
        ids = sp_tokenizer.encode(response, add_bos=False, add_eos=True, continuation=True)
        assert pair[side]["tokens"] == prompt + ids
        assert trained(pair[side]) == ids  # the response and its closing token, nothing of the prompt
        assert sp_tokenizer.decode(trained(pair[side])) == response


def test_instruction_records_render_like_the_instruct_data_they_extend(tmp_path: Path, sp_tokenizer: Tokenizer) -> None:
    record = {"instruction": "Reverse the order of the words.", "input": "cat dog", "chosen": "dog cat"}
    path = write_jsonl(tmp_path / "p.jsonl", [{**record, "rejected": "cat dog"}])
    sft = write_jsonl(
        tmp_path / "s.jsonl", [{"instruction": record["instruction"], "input": "cat dog", "output": "dog cat"}]
    )
    expected = build_dataset(
        str(sft), dataset_type="instruct", tokenizer=sp_tokenizer, max_seq_len=128, template="plain"
    )
    assert pairs(path, sp_tokenizer, template="plain")[0]["chosen"] == expected[0]


def test_whole_texts_share_their_prompt_up_to_a_word_boundary(tmp_path: Path, sp_tokenizer: Tokenizer) -> None:
    chosen = "\n\nHuman: What is 2 and 2?\n\nAssistant: It is 4"
    rejected = "\n\nHuman: What is 2 and 2?\n\nAssistant: It is 42"
    assert split_common_prefix(chosen, rejected) == ("\n\nHuman: What is 2 and 2?\n\nAssistant: It is", " 4", " 42")
    path = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": chosen, "rejected": rejected}])
    pair = pairs(path, sp_tokenizer)[0]
    assert sp_tokenizer.decode(trained(pair["chosen"])).strip() == "4"
    assert sp_tokenizer.decode(trained(pair["rejected"])).strip() == "42"


def conversation(*turns: tuple[str, str]) -> list[dict]:
    return [{"role": role, "content": content} for role, content in turns]


def test_conversations_with_and_without_a_prompt_column_agree(tmp_path: Path, llama3_tokenizer: Tokenizer) -> None:
    question = conversation(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello"), ("user", "2+2?"))
    explicit = {
        "prompt": question,
        "chosen": conversation(("assistant", "4")),
        "rejected": conversation(("assistant", "5")),
    }
    # UltraFeedback's layout: the prompt as a string, each side the whole conversation.
    implicit = {
        "prompt": "2+2?",
        "chosen": question + conversation(("assistant", "4")),
        "rejected": question + conversation(("assistant", "5")),
    }
    path = write_jsonl(tmp_path / "c.jsonl", [explicit, implicit])
    a, b = pairs(path, llama3_tokenizer, chat=True)
    assert a["chosen"] == b["chosen"] and a["rejected"] == b["rejected"]
    tokens, mask = llama3_tokenizer.tokenize_messages(
        [Message(t["role"], t["content"], masked=True) for t in question] + [Message("assistant", "4")]
    )
    assert a["chosen"]["tokens"] == tokens
    # Only the final answer trains: the earlier assistant turn ("Hello") is prompt.
    assert "Hello" not in llama3_tokenizer.decode(trained(a["chosen"]))
    assert llama3_tokenizer.decode(trained(a["chosen"])).startswith("4")


def test_a_batch_holds_the_chosen_rows_then_the_rejected_rows(tmp_path: Path, sp_tokenizer: Tokenizer) -> None:
    records = [{"prompt": f"Q{i}\n", "chosen": "yes " * (i + 1), "rejected": "no"} for i in range(3)]
    dataset = pairs(write_jsonl(tmp_path / "p.jsonl", records), sp_tokenizer)
    batch = collate_pairs([dataset[2], dataset[0]], pad_id=sp_tokenizer.pad_id)
    assert batch["tokens"].shape[0] == 4 and batch["pair_index"].tolist() == [2, 0]
    for row, (index, side) in enumerate([(2, "chosen"), (0, "chosen"), (2, "rejected"), (0, "rejected")]):
        n = len(dataset[index][side]["tokens"])
        assert batch["tokens"][row, :n].tolist() == dataset[index][side]["tokens"]
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()


def test_pairs_cut_inside_their_prompt_are_skipped_and_counted(tmp_path: Path, sp_tokenizer: Tokenizer) -> None:
    records = [
        {"prompt": "word " * 40, "chosen": "a", "rejected": "b"},
        {"prompt": "Q\n", "chosen": "a", "rejected": "b"},
    ]
    said: list[str] = []
    dataset = pairs(write_jsonl(tmp_path / "p.jsonl", records), sp_tokenizer, n=16, log=said.append)
    assert len(dataset) == 1 and "1 pairs cut inside their prompt were skipped" in said[0]


def test_bad_records_name_their_file_and_line(tmp_path: Path, sp_tokenizer: Tokenizer, llama3_tokenizer) -> None:
    path = tmp_path / "p.jsonl"
    good = {"prompt": "Q\n", "chosen": "a", "rejected": "b"}
    write_jsonl(path, [good, {"prompt": "Q\n", "chosen": "a"}])
    assert user_error(pairs, path, sp_tokenizer).startswith(f"column 'rejected' is missing from {path} line 2;")
    write_jsonl(path, [good, {**good, "chosen": 5}])
    assert user_error(pairs, path, sp_tokenizer).startswith(
        f"column 'chosen' of {path} line 2 holds int 5, expected text"
    )
    write_jsonl(path, [good, good, {**good, "rejected": conversation(("assistant", "b"))}])
    assert user_error(pairs, path, sp_tokenizer) == (
        f"column 'rejected' of {path} line 3 holds a list of messages; conversations are read with dataset_type=chat"
    )
    write_jsonl(path, [good])
    assert user_error(pairs, path, llama3_tokenizer, chat=True).startswith(
        f"column 'chosen' of {path} line 1 holds text"
    )
    write_jsonl(
        path, [{"chosen": conversation(("user", "a"), ("assistant", "b")), "rejected": conversation(("user", "c"))}]
    )
    assert user_error(pairs, path, llama3_tokenizer, chat=True).startswith(f"{path} line 1 has no prompt")
    user_turns = conversation(("user", "q"), ("assistant", "a"))
    write_jsonl(path, [{"chosen": user_turns, "rejected": user_turns[:1] + conversation(("user", "again"))}])
    assert user_error(pairs, path, llama3_tokenizer, chat=True) == (
        f"the rejected response of {path} line 1 has no assistant turn after the prompt; fix the record"
    )
