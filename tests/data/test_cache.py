"""The tokenized-data cache: the same samples and messages as tokenizing in memory, reuse on
the same key and a new entry on any change, errors that name the file and line, a killed build
that leaves nothing trusted, and two ranks that build once and map the same files."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.multiprocessing as torch_mp

from finetune.data import IGNORE_INDEX, InstructTemplate, build_dataloader, build_dataset, collate
from finetune.data import build as data_build
from finetune.data.demo import demo_path
from finetune.data.sampler import ResumableDistributedSampler
from finetune.tokenizers import Tokenizer, load_tokenizer
from finetune.training.guards import preempt_on_sigterm
from tests.data.helpers import user_error

REPO = Path(__file__).resolve().parents[2]
DEMO = demo_path("train.jsonl")


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many chunks even for small files, so two processes share every build."""
    monkeypatch.setattr(data_build, "CHUNK_BYTES", 8192)
    monkeypatch.setattr(data_build, "CHUNK_RECORDS", 64)


def demo_lines(path: Path, count: int, start: int = 0) -> Path:
    lines = DEMO.read_text(encoding="utf-8").split("\n")[start : start + count]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def both(source: Path, tokenizer: Tokenizer, cache: Path, **kwargs):  # type: ignore[no-untyped-def]
    """(in-memory dataset, its messages, cached dataset, its messages without the cache's own)."""
    memory_log: list[str] = []
    cache_log: list[str] = []
    kwargs.setdefault("max_seq_len", 64)
    kwargs.setdefault("dataset_type", "instruct")
    memory = build_dataset(str(source), tokenizer=tokenizer, log=memory_log.append, **kwargs)
    cached = build_dataset(
        str(source), tokenizer=tokenizer, log=cache_log.append, cache_dir=str(cache), num_proc=2, **kwargs
    )
    return memory, memory_log, cached, [m for m in cache_log if not m.startswith("data cache:")]


def assert_same_samples(a, b) -> None:  # type: ignore[no-untyped-def]
    assert len(a) == len(b)
    for i in range(len(a)):
        assert a[i] == b[i], i


CHAT = [
    {"messages": [{"role": "user", "content": f"What is {i} + {i}?"}, {"role": "assistant", "content": str(2 * i)}]}
    for i in range(300)
] + [{"conversations": [{"from": "human", "value": "hi " * 80}, {"from": "gpt", "value": "hello " * 80}]}]


@pytest.mark.parametrize(
    "case",
    [
        "instruct",
        "instruct-packed",
        "instruct-sliced-mapped",
        "train-on-input",
        "chat",
        "text",
        "text-txt",
        "csv",
        "folder",
        "saved",
    ],
)
def test_cached_samples_and_messages_equal_tokenizing_in_memory(tmp_path, sp_tokenizer, llama3_tokenizer, case):
    tokenizer, kwargs = sp_tokenizer, {}
    source = demo_lines(tmp_path / "train.jsonl", 1500)
    if case == "instruct-packed":
        kwargs = {"packed": True, "max_seq_len": 200}
    elif case == "instruct-sliced-mapped":
        records = [json.loads(line) for line in source.read_text().splitlines()]
        source.write_text("".join(json.dumps({"q": r["instruction"], "a": r["output"]}) + "\n\n" for r in records))
        kwargs = {"split": "train[13%:71%]", "column_map": {"instruction": "q", "output": "a"}}
    elif case == "train-on-input":
        kwargs = {"train_on_input": True, "max_seq_len": 40, "template": "plain"}
    elif case == "chat":
        tokenizer = llama3_tokenizer
        source.write_text("".join(json.dumps(r) + "\n" for r in CHAT))
        kwargs = {"dataset_type": "chat", "max_seq_len": 96}
    elif case == "text":
        source.write_text("".join(json.dumps({"text": "word " * (i % 97)}) + "\n" for i in range(400)))
        kwargs = {"dataset_type": "text", "max_seq_len": 32, "packed": True}
    elif case == "text-txt":
        source = tmp_path / "book.txt"
        source.write_text("A long story. " * 3000)
        kwargs = {"dataset_type": "text", "max_seq_len": 50}
    elif case == "csv":
        source = tmp_path / "train.csv"
        rows = [f'"{i}, then more",,"{i + 1}"' for i in range(500)]
        source.write_text("instruction,input,output\n" + "\n".join(rows) + "\n")
    elif case == "folder":  # two files read as one split: records are named by their number
        source = tmp_path / "folder"
        source.mkdir()
        demo_lines(source / "train-00000-of-00002.jsonl", 400)
        demo_lines(source / "train-00001-of-00002.jsonl", 400, 400)
        kwargs = {"split": "train[:700]"}
    elif case == "saved":
        datasets = pytest.importorskip("datasets")
        records = [json.loads(line) for line in source.read_text().splitlines()[:500]]
        source = tmp_path / "saved"
        datasets.Dataset.from_list(records).save_to_disk(str(source))
    memory, memory_log, cached, cache_log = both(source, tokenizer, tmp_path / "cache", **kwargs)
    assert cached.built_here
    assert_same_samples(memory, cached)
    assert cache_log == memory_log
    again = build_dataset(
        str(source),
        tokenizer=tokenizer,
        cache_dir=str(tmp_path / "cache"),
        **{"max_seq_len": 64, "dataset_type": "instruct", **kwargs},
    )
    assert not again.built_here
    assert_same_samples(memory, again)


def test_an_entry_keeps_five_bytes_a_token(tmp_path, sp_tokenizer):
    """int32 tokens and one byte of loss flag each: the labels are rebuilt, not stored again."""
    source = demo_lines(tmp_path / "train.jsonl", 600)
    memory, _, cached, _ = both(source, sp_tokenizer, tmp_path / "cache", train_on_input=False)
    assert_same_samples(memory, cached)
    masked = sum(label == IGNORE_INDEX for i in range(len(memory)) for label in memory[i]["labels"])
    assert 0 < masked < cached.num_tokens  # prompts masked, responses trained: both kinds of flag
    arrays = sum(path.stat().st_size for path in cached.folder.glob("*.bin"))
    assert arrays == 5 * cached.num_tokens + 8 * (len(cached) + 1)


def test_batches_through_the_sampler_are_the_same(tmp_path, sp_tokenizer):
    source = demo_lines(tmp_path / "train.jsonl", 600)
    memory, _, cached, _ = both(source, sp_tokenizer, tmp_path / "cache", packed=True, max_seq_len=128)

    def batches(dataset):  # type: ignore[no-untyped-def]
        sampler = ResumableDistributedSampler(len(dataset), rank=1, world_size=2, seed=3)
        sampler.set_epoch(1, start_index=5)
        loader = build_dataloader(dataset, batch_size=4, sampler=sampler, collate_fn=collate, num_workers=1)
        return list(loader)

    for a, b in zip(batches(memory), batches(cached), strict=True):
        assert a.keys() == b.keys()
        for name in a:
            assert a[name].equal(b[name]), name


def test_a_cached_dataset_pickles_as_its_folder(tmp_path, sp_tokenizer):
    source = demo_lines(tmp_path / "train.jsonl", 2000)
    cached = build_dataset(
        str(source), dataset_type="instruct", tokenizer=sp_tokenizer, max_seq_len=64, cache_dir=str(tmp_path)
    )
    data = pickle.dumps(cached)
    assert len(data) < 1000  # DataLoader workers map the files rather than receive a copy
    assert_same_samples(cached, pickle.loads(data))


def test_any_change_to_the_key_builds_a_new_entry(tmp_path, sp_tokenizer, llama3_tokenizer):
    source = demo_lines(tmp_path / "train.jsonl", 300)
    cache = str(tmp_path / "cache")

    def entry(path=source, tokenizer=sp_tokenizer, **kwargs):  # type: ignore[no-untyped-def]
        kwargs = {"dataset_type": "instruct", "max_seq_len": 64, **kwargs}
        dataset = build_dataset(str(path), tokenizer=tokenizer, cache_dir=cache, **kwargs)
        return dataset.built_here, (dataset.samples if hasattr(dataset, "samples") else dataset).folder

    built, first = entry()
    assert built and entry() == (False, first)
    changes = [
        {"max_seq_len": 65},
        {"train_on_input": True},
        {"template": "plain"},
        {"template": InstructTemplate("qa", "Q: {instruction}\n{input}\nA: ", "Q: {instruction}\nA: ")},
        {"packed": True},
        {"split": "train[:50%]"},
        {"column_map": {"input": "input"}},
        {"max_seq_len": 1024},
        {"max_seq_len": 1024, "tokenizer": llama3_tokenizer},
    ]
    folders = {first}
    for change in changes:
        built, folder = entry(**change)
        assert built and folder not in folders, change
        folders.add(folder)
        assert entry(**change) == (False, folder), change
    # The key holds a template's text, not its name: the same text is the same entry.
    plain = entry(template="plain")[1]
    assert entry(template=InstructTemplate("mine", "{instruction}\n{input}\n", "{instruction}\n")) == (False, plain)
    # The same size and modification time but one byte changed: the sampled digest sees it.
    stat = source.stat()
    data = bytearray(source.read_bytes())
    data[data.index(b"Add")] = ord("O")
    source.write_bytes(bytes(data))
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    built, folder = entry()
    assert built and folder not in folders


@pytest.mark.parametrize(
    "line, expected",
    [
        ("{not json", "line 1201 column 2 is not valid JSON"),
        ('{"instruction": "x"}', "column 'output' is missing from {path} line 1201"),
        ('{"instruction": "x", "output": 3}', "column 'output' of {path} line 1201 holds int 3"),
    ],
)
def test_a_bad_record_names_its_file_and_line(tmp_path, sp_tokenizer, line, expected):
    source = demo_lines(tmp_path / "train.jsonl", 1200)
    source.write_text(source.read_text() + line + "\n" + demo_lines(tmp_path / "more.jsonl", 300, 2000).read_text())
    kwargs = {"dataset_type": "instruct", "tokenizer": sp_tokenizer, "max_seq_len": 64}
    memory = user_error(build_dataset, str(source), **kwargs)
    cached = user_error(build_dataset, str(source), cache_dir=str(tmp_path / "cache"), num_proc=2, **kwargs)
    assert cached == memory and expected.format(path=source) in cached
    assert not [p for p in (tmp_path / "cache").iterdir() if p.suffix != ".lock"], "a failed build left files"


def test_bad_utf8_is_named_by_byte_and_line(tmp_path, sp_tokenizer):
    source = demo_lines(tmp_path / "train.jsonl", 900)
    source.write_bytes(source.read_bytes() + b'{"instruction": "\xff"}\n')
    kwargs = {"dataset_type": "instruct", "tokenizer": sp_tokenizer, "max_seq_len": 64}
    cached = user_error(build_dataset, str(source), cache_dir=str(tmp_path / "cache"), num_proc=2, **kwargs)
    assert cached == user_error(build_dataset, str(source), **kwargs)
    assert "line 901" in cached


_BUILD = """
import sys
from finetune.data import build, build_dataset
from finetune.tokenizers import load_tokenizer
build.CHUNK_BYTES = 4096
build_dataset(sys.argv[1], dataset_type="instruct", tokenizer=load_tokenizer(sys.argv[2]), max_seq_len=64,
              cache_dir=sys.argv[3], num_proc=2)
"""


def _signal_handlers(_: int) -> tuple:
    return signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)


def test_build_workers_die_on_sigterm_whatever_handler_the_run_set():
    """A run's SIGTERM handler raises an exception the worker pool catches between tasks: a worker
    that kept it would outlive the pool's SIGTERM and the build would wait for it forever."""
    restore = preempt_on_sigterm()
    try:
        with data_build._workers(2, 4) as run:
            handlers = set(run(_signal_handlers, range(4)))
    finally:
        restore()
    assert handlers == {(signal.SIG_DFL, signal.SIG_IGN)}


def test_a_build_killed_half_way_leaves_nothing_trusted(tmp_path, sp_tokenizer):
    source, cache = demo_lines(tmp_path / "train.jsonl", 18000), tmp_path / "cache"
    argv = [sys.executable, "-c", _BUILD, str(source), str(demo_path("tokenizer.model")), str(cache)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(argv, env=env, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while not any(p.stat().st_size > 100_000 for p in cache.glob(".*/tokens.bin")):
        assert process.poll() is None, "the build ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)  # the builder only: its workers must follow it
    process.wait()
    assert not [p for p in cache.iterdir() if not p.name.startswith(".") and p.suffix != ".lock"]
    memory, _, cached, _ = both(source, sp_tokenizer, cache)
    assert cached.built_here
    assert_same_samples(memory, cached)
    assert not list(cache.glob(".*")), "the killed build's leftovers were not cleared"


def _rank(rank: int, port: int, source: str, cache: str, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        tokenizer = load_tokenizer(demo_path("tokenizer.model"))
        dataset = build_dataset(source, dataset_type="instruct", tokenizer=tokenizer, max_seq_len=64, cache_dir=cache)
        mapped = sorted(
            {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines() if cache in line}
        )
        result = {"built": dataset.built_here, "folder": str(dataset.folder), "mapped": mapped, "first": dataset[0]}
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_two_ranks_build_once_and_map_the_same_files(tmp_path):
    source = demo_lines(tmp_path / "train.jsonl", 4000)
    port = 20000 + os.getpid() % 20000
    torch_mp.spawn(_rank, args=(port, str(source), str(tmp_path / "cache"), str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert sorted(r["built"] for r in ranks) == [False, True]
    assert ranks[0]["folder"] == ranks[1]["folder"] and ranks[0]["first"] == ranks[1]["first"]
    files = {f"{ranks[0]['folder']}/{name}.bin" for name in ("tokens", "trained", "offsets")}
    assert set(ranks[0]["mapped"]) == set(ranks[1]["mapped"]) == files
