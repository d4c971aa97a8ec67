"""Bad data gives one UserError line saying what is wrong, where, and what to do."""

import json
from pathlib import Path

from finetune.data import build_dataset, get_template, load_records
from finetune.tokenizers import Tokenizer
from tests.data.helpers import ALPACA_RECORDS, user_error, write_jsonl


def build(path: Path, tokenizer: Tokenizer, dataset_type: str = "instruct", **kwargs) -> object:  # type: ignore[no-untyped-def]
    return build_dataset(str(path), dataset_type=dataset_type, tokenizer=tokenizer, max_seq_len=64, **kwargs)


def test_malformed_json_names_file_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text('[\n  {"instruction": "a"},\n  {"instruction": "b",}\n]\n')
    assert user_error(load_records, str(path)) == (
        f"{path} line 3 column 23 is not valid JSON (Expecting property name enclosed in double quotes); fix the file"
    )


def test_json_that_is_not_a_list_of_records(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text('{"instruction": "a"}')
    assert user_error(load_records, str(path)) == (
        f"{path} holds a JSON object, expected a list of records; "
        "write [{...}, {...}] or use .jsonl with one record per line"
    )
    path.write_text('[{"instruction": "a"}, "b"]')
    assert user_error(load_records, str(path)).startswith(f"{path} record 2 is a JSON string, expected an object;")


def test_malformed_jsonl_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a"}\n\n{"instruction": "b"\n')
    assert user_error(load_records, str(path)) == (
        f"{path} line 3 column 20 is not valid JSON (Expecting ',' delimiter); each line must hold one JSON object"
    )


def test_jsonl_line_that_is_not_an_object(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a"}\n[1, 2]\n')
    assert user_error(load_records, str(path)) == (
        f"{path} line 2 is a JSON list, expected an object; each line must hold one JSON object"
    )


def test_csv_row_with_wrong_field_count(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("instruction,output\na,b\nc,d,e\n")
    assert user_error(load_records, str(path)) == (
        f"{path} line 3 has 3 fields but the header has 2; quote fields that contain ','"
    )


def test_non_utf8_text_names_byte_offset(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"instruction": "ok"}\n{"instruction": "caf\xe9"}\n')
    assert user_error(load_records, str(path)) == (
        f"{path} is not valid UTF-8 at byte offset 42 (line 2); re-save the file with UTF-8 encoding"
    )


def test_non_utf8_txt_file(tmp_path: Path) -> None:
    path = tmp_path / "d.txt"
    path.write_bytes(b"abc\xff")
    assert "at byte offset 3 (line 1)" in user_error(load_records, str(path))


def test_empty_dataset(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("\n\n")
    assert user_error(load_records, str(path)) == (
        f"dataset {path} (split 'train') has no records; point it at a file with data"
    )


def test_empty_slice_is_an_empty_dataset(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", ALPACA_RECORDS)
    assert "has no records" in user_error(load_records, str(path), split="train[:0]")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.jsonl"
    assert user_error(load_records, str(path)) == (f"dataset file {path} does not exist; check the path")


def test_missing_column_names_it_and_lists_columns(tmp_path: Path, sp_tokenizer: Tokenizer) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "response": "b"}])
    assert user_error(build, path, sp_tokenizer) == (
        f"column 'output' is missing from {path} line 1; columns found: instruction, response; "
        "rename it or pass column_map={output: <your column>}"
    )


def test_column_map_to_a_missing_column(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}])
    assert user_error(load_records, str(path), column_map={"output": "answer"}) == (
        f"column 'answer' (column_map output: answer) is missing from {path} line 1; "
        "columns found: instruction, output; fix column_map"
    )


def test_wrong_value_type_names_column_and_record(tmp_path: Path, sp_tokenizer: Tokenizer) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [ALPACA_RECORDS[0], {"instruction": "Add.", "output": 5}])
    assert user_error(build, path, sp_tokenizer) == (
        f"column 'output' of {path} line 2 holds int 5, expected text; "
        "fix the record or map another column with column_map"
    )


def test_a_lone_surrogate_is_named_not_a_tokenizer_crash(tmp_path: Path, sp_tokenizer: Tokenizer) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "Hi", "output": "fine"}\n{"instruction": "Say \\ud83d", "output": "ok"}\n')
    assert user_error(build, path, sp_tokenizer) == (
        f"column 'instruction' of {path} line 2 holds a lone UTF-16 surrogate '\\ud83d' at character 5, which "
        "is not text (a broken \\uXXXX escape); remove it or re-export the data"
    )


def test_wrong_text_type(tmp_path: Path, sp_tokenizer: Tokenizer) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"text": "fine"}, {"text": ["a", "list"]}]))
    assert user_error(build, path, sp_tokenizer, dataset_type="text") == (
        f"column 'text' of {path} record 2 holds list ['a', 'list'], expected text; "
        "fix the record or map another column with column_map"
    )


def chat_file(tmp_path: Path, roles: list[str], key: str = "messages") -> Path:
    if key == "messages":
        turns = [{"role": r, "content": f"turn {i}"} for i, r in enumerate(roles)]
    else:
        turns = [{"from": r, "value": f"turn {i}"} for i, r in enumerate(roles)]
    ok = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    return write_jsonl(tmp_path / "chat.jsonl", [ok, {key: turns}])


RULE = "turns must alternate user, assistant, ... after an optional first system message"


def test_two_assistant_turns_in_a_row(tmp_path: Path, sp_tokenizer: Tokenizer) -> None:
    path = chat_file(tmp_path, ["user", "assistant", "assistant"])
    assert user_error(build, path, sp_tokenizer, dataset_type="chat") == (
        f"conversation in {path} line 2 has two assistant turns in a row (turns 2 and 3); {RULE}"
    )


def test_conversation_starting_with_assistant(tmp_path: Path, sp_tokenizer: Tokenizer) -> None:
    path = chat_file(tmp_path, ["system", "gpt", "human"], key="conversations")
    assert user_error(build, path, sp_tokenizer, dataset_type="chat") == (
        f"conversation in {path} line 2 has turn 2 from assistant where user was expected; {RULE}"
    )


def test_system_message_after_the_first_turn(tmp_path: Path, sp_tokenizer: Tokenizer) -> None:
    path = chat_file(tmp_path, ["user", "assistant", "system", "user", "assistant"])
    assert user_error(build, path, sp_tokenizer, dataset_type="chat") == (
        f"conversation in {path} line 2 has a system message at turn 3; "
        f"only the first turn may be a system message; {RULE}"
    )


def test_conversation_without_assistant_turn(tmp_path: Path, sp_tokenizer: Tokenizer) -> None:
    path = chat_file(tmp_path, ["system", "user"])
    assert user_error(build, path, sp_tokenizer, dataset_type="chat") == (
        f"conversation in {path} line 2 has no assistant turn, so nothing to learn; "
        "add the assistant's reply or remove the record"
    )


def test_unknown_chat_role(tmp_path: Path, sp_tokenizer: Tokenizer) -> None:
    path = chat_file(tmp_path, ["human", "bot"], key="conversations")
    assert user_error(build, path, sp_tokenizer, dataset_type="chat") == (
        f"turn 2 of {path} line 2 has from 'bot'; use one of system, human, gpt, user, assistant"
    )


def test_chat_turn_without_content(tmp_path: Path, sp_tokenizer: Tokenizer) -> None:
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user"}]}])
    assert user_error(build, path, sp_tokenizer, dataset_type="chat") == (
        f"turn 1 of column 'messages' in {path} line 1 holds dict {{'role': 'user'}} without "
        "'content'; each turn needs 'role' and 'content'"
    )


def test_chat_without_messages_column(tmp_path: Path, sp_tokenizer: Tokenizer) -> None:
    path = write_jsonl(tmp_path / "chat.jsonl", [{"dialog": []}])
    assert user_error(build, path, sp_tokenizer, dataset_type="chat") == (
        f"column 'messages' is missing from {path} line 1; columns found: dialog; "
        "rename it or pass column_map={messages: <your column>}"
    )


def test_unknown_template(tmp_path: Path, sp_tokenizer: Tokenizer) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", ALPACA_RECORDS)
    assert user_error(build, path, sp_tokenizer, template="alpacca") == (
        "template 'alpacca' is unknown; choose one of alpaca, plain or register your own "
        "with finetune.data.register_template; did you mean 'alpaca'?"
    )
    assert get_template("plain").name == "plain"


def test_bad_split_syntax(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", ALPACA_RECORDS)
    assert user_error(load_records, str(path), split="train[::2]").startswith("split 'train[::2]' is not understood;")
    assert user_error(load_records, str(path), split="test").startswith(
        f"split 'test' asked of the file {path}, which is a single 'train' split;"
    )


def test_bad_parquet_file(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    path.write_bytes(b"not parquet at all")
    assert user_error(load_records, str(path)).startswith(f"cannot read {path} as Parquet (")


def test_unknown_dataset_type(tmp_path: Path, sp_tokenizer: Tokenizer) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", ALPACA_RECORDS)
    assert user_error(build, path, sp_tokenizer, dataset_type="instructions") == (
        "dataset_type 'instructions' is unknown; choose one of instruct, chat, text"
    )
