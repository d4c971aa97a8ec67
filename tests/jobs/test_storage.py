"""Object storage: fetch into a cache once, upload verified and resumable, delete weights only when safe.

S3 runs against moto's real HTTP server through s3fs (tests/jobs/conftest.py); memory:// is
fsspec's in-process filesystem. Counting is done by wrapping methods of the filesystem object our
code gets from fsspec; the requests still go to the server.
"""

from __future__ import annotations

import importlib.util
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fsspec
import pytest

from finetune.errors import UserError
from finetune.jobs import storage
from finetune.jobs.storage import MANIFEST_NAME, delete_local_weights, fetch, is_url, upload
from tests.jobs.helpers import make_checkpoint_folder, moto_server, s3_storage_options, tree_bytes


class Log(list):
    def __call__(self, line: str) -> None:
        self.append(line)


def count_calls(monkeypatch: pytest.MonkeyPatch, fs, name: str) -> list:
    """Record each call of `fs.<name>` (the real method still runs)."""
    calls: list = []
    real = getattr(fs, name)

    def wrapper(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(fs, name, wrapper)
    return calls


def remote_tree(fs, root: str) -> dict[str, bytes]:
    fs.invalidate_cache()
    return {p[len(root) :].lstrip("/"): fs.cat_file(p) for p in sorted(fs.find(root))}


def test_is_url_knows_fsspec_schemes_and_not_paths():
    for url in ("s3://bucket/key", "gs://b/k", "memory://x", "file:///tmp/x", "S3://bucket/k"):
        assert is_url(url), url
    for text in ("/tmp/x", "data/train.jsonl", r"C:\data\x", "c://x", "nosuchscheme://x", "s3:/x", ""):
        assert not is_url(text), text


def test_local_paths_and_file_urls_are_returned_without_copying(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("{}\n")
    cache = tmp_path / "cache"
    assert fetch(str(data), cache, Log()) == data
    assert fetch(f"file://{data}", cache, Log()) == data
    assert not cache.exists()


def test_upload_round_trip_to_s3_is_byte_exact_and_verified_by_md5_etag(tmp_path, s3_options, bucket):
    local = make_checkpoint_folder(tmp_path / "run")
    url = f"s3://{bucket}/jobs/run1"
    report = upload(local, url, Log(), storage_options=s3_options)

    fs = fsspec.filesystem("s3", **s3_options)
    remote = remote_tree(fs, f"{bucket}/jobs/run1")
    manifest = json.loads(remote.pop(MANIFEST_NAME))
    local_files = tree_bytes(local)
    assert json.loads(local_files.pop(MANIFEST_NAME)) == manifest
    assert remote == local_files
    assert sorted(report.uploaded) == sorted(local_files) and report.skipped == []
    assert set(report.verified_by.values()) == {"etag-md5"}
    assert {e["path"]: e["size"] for e in manifest["files"]} == {k: len(v) for k, v in local_files.items()}

    # And back: fetching the folder gives the same bytes.
    copy = fetch(url, tmp_path / "cache", Log(), storage_options=s3_options)
    assert copy == tmp_path / "cache" / "s3" / bucket / "jobs" / "run1"
    fetched = tree_bytes(copy)
    assert json.loads(fetched.pop(MANIFEST_NAME)) == manifest
    assert fetched == local_files


def test_upload_round_trip_to_memory_is_verified_by_reading_back(tmp_path, memory_root):
    local = make_checkpoint_folder(tmp_path / "run")
    report = upload(local, memory_root, Log())
    fs = fsspec.filesystem("memory")
    remote = remote_tree(fs, memory_root[len("memory://") :])
    remote.pop(MANIFEST_NAME)
    local_files = tree_bytes(local)
    local_files.pop(MANIFEST_NAME)
    assert remote == local_files
    assert set(report.verified_by.values()) == {"read-back-sha256"}
    fetched = tree_bytes(fetch(memory_root, tmp_path / "cache", Log()))
    fetched.pop(MANIFEST_NAME)
    assert fetched == local_files


def test_a_rerun_uploads_nothing(tmp_path, s3_options, bucket, monkeypatch):
    local = make_checkpoint_folder(tmp_path / "run")
    url = f"s3://{bucket}/run"
    first = upload(local, url, Log(), storage_options=s3_options)
    fs = fsspec.core.url_to_fs(url, **s3_options)[0]
    assert fs is fsspec.filesystem("s3", **s3_options)  # the instance upload uses
    fs.invalidate_cache()
    before = {p: (i["LastModified"], i["ETag"]) for p, i in fs.find(f"{bucket}/run", detail=True).items()}
    puts = count_calls(monkeypatch, fs, "put_file")
    pipes = count_calls(monkeypatch, fs, "pipe_file")

    again = upload(local, url, Log(), storage_options=s3_options)

    assert puts == [] and pipes == []
    assert again.uploaded == [] and sorted(again.skipped) == sorted(first.uploaded)
    fs.invalidate_cache()
    after = {p: (i["LastModified"], i["ETag"]) for p, i in fs.find(f"{bucket}/run", detail=True).items()}
    assert after == before


def test_corrupted_or_partial_remote_files_are_uploaded_again(tmp_path, s3_options, bucket, monkeypatch):
    local = make_checkpoint_folder(tmp_path / "run")
    url = f"s3://{bucket}/run"
    upload(local, url, Log(), storage_options=s3_options)
    fs = fsspec.filesystem("s3", **s3_options)
    weights = local / "step_1" / "model.safetensors"
    same_size = bytearray(weights.read_bytes())
    same_size[1000] ^= 0xFF  # one flipped byte: caught by the md5 ETag, not by the size
    fs.pipe_file(f"{bucket}/run/step_1/model.safetensors", bytes(same_size))
    fs.pipe_file(f"{bucket}/run/step_1/recipe_state.pt", (local / "step_1" / "recipe_state.pt").read_bytes()[:1000])
    puts = count_calls(monkeypatch, fs, "put_file")

    report = upload(local, url, Log(), storage_options=s3_options)

    assert sorted(report.uploaded) == ["step_1/model.safetensors", "step_1/recipe_state.pt"]
    assert len(puts) == 2
    remote = remote_tree(fs, f"{bucket}/run")
    assert remote["step_1/model.safetensors"] == weights.read_bytes()
    assert remote["step_1/recipe_state.pt"] == (local / "step_1" / "recipe_state.pt").read_bytes()


def test_a_truncated_remote_file_in_memory_is_uploaded_again(tmp_path, memory_root):
    local = make_checkpoint_folder(tmp_path / "run")
    upload(local, memory_root, Log())
    fs = fsspec.filesystem("memory")
    root = memory_root[len("memory://") :]
    fs.pipe_file(f"{root}/step_2/adapter/adapter_model.safetensors", b"partial")
    report = upload(local, memory_root, Log())
    assert report.uploaded == ["step_2/adapter/adapter_model.safetensors"]
    assert (
        fs.cat_file(f"{root}/step_2/adapter/adapter_model.safetensors")
        == (local / "step_2" / "adapter" / "adapter_model.safetensors").read_bytes()
    )


def test_fetch_downloads_once_and_refetches_a_truncated_cache(tmp_path, s3_options, bucket, monkeypatch):
    local = make_checkpoint_folder(tmp_path / "ckpt")
    url = f"s3://{bucket}/models/tiny"
    upload(local, url, Log(), storage_options=s3_options)
    cache = tmp_path / "cache"
    fs = fsspec.filesystem("s3", **s3_options)
    gets = count_calls(monkeypatch, fs, "get_file")

    copy = fetch(url, cache, Log(), storage_options=s3_options)
    assert len(gets) == len(tree_bytes(local))  # every file, the manifest included
    weights = copy / "step_1" / "model.safetensors"
    stat = weights.stat()

    log = Log()
    assert fetch(url, cache, log, storage_options=s3_options) == copy
    assert len(gets) == len(tree_bytes(local))  # nothing downloaded
    assert (weights.stat().st_ino, weights.stat().st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    assert "using the cached copy" in log[-1]

    with open(weights, "r+b") as f:  # a cache file cut short
        f.truncate(1000)
    del gets[:]
    fetch(url, cache, Log(), storage_options=s3_options)
    assert [call[0] for call in gets] == [f"{bucket}/models/tiny/step_1/model.safetensors"]
    assert weights.read_bytes() == (local / "step_1" / "model.safetensors").read_bytes()


def test_a_killed_download_is_never_taken_for_complete(tmp_path, s3_options, bucket, monkeypatch):
    local = make_checkpoint_folder(tmp_path / "ckpt")
    url = f"s3://{bucket}/ckpt"
    upload(local, url, Log(), storage_options=s3_options)
    fs = fsspec.filesystem("s3", **s3_options)
    real_get = fs.get_file
    got = []

    def get_then_die(rpath, lpath, **kwargs):
        if len(got) == 3:
            Path(lpath).write_bytes(b"half a file")  # what a killed transfer leaves behind
            raise KeyboardInterrupt
        got.append(rpath)
        return real_get(rpath, lpath, **kwargs)

    monkeypatch.setattr(fs, "get_file", get_then_die)
    with pytest.raises(KeyboardInterrupt):
        fetch(url, tmp_path / "cache", Log(), storage_options=s3_options)
    target = tmp_path / "cache" / "s3" / bucket / "ckpt"
    record = json.loads(target.with_name("ckpt.fetched.json").read_text())
    assert not record["complete"] and sorted(record["files"]) == ["_manifest.json", "metrics.jsonl", "status.json"]
    # What a SIGKILL could leave: a temp file, and (from any other writer) a cut-short file at a final name.
    (target / "step_1" / ".model.safetensors.part-999").write_bytes(b"half")
    (target / "step_2" / "adapter").mkdir(parents=True, exist_ok=True)
    (target / "step_2" / "adapter" / "adapter_model.safetensors").write_bytes(b"half")

    monkeypatch.setattr(fs, "get_file", real_get)
    gets = count_calls(monkeypatch, fs, "get_file")
    copy = fetch(url, tmp_path / "cache", Log(), storage_options=s3_options)
    assert tree_bytes(copy) == tree_bytes(local)
    assert len(gets) == len(tree_bytes(local)) - 3  # the three whole files were kept
    assert json.loads(target.with_name("ckpt.fetched.json").read_text())["complete"]


def test_a_changed_remote_file_is_fetched_again(tmp_path, memory_root):
    fs = fsspec.filesystem("memory")
    root = memory_root[len("memory://") :]
    fs.pipe_file(f"{root}/train.jsonl", b'{"text": "a"}\n')
    url = f"{memory_root}/train.jsonl"
    path = fetch(url, tmp_path / "cache", Log())
    assert path.is_file() and path.read_bytes() == b'{"text": "a"}\n'
    fs.pipe_file(f"{root}/train.jsonl", b'{"text": "b"}\n')  # same size, new content
    assert fetch(url, tmp_path / "cache", Log()).read_bytes() == b'{"text": "b"}\n'


def test_fetching_a_missing_url_is_one_line(tmp_path, s3_options, bucket):
    with pytest.raises(UserError) as info:
        fetch(f"s3://{bucket}/nothing/here", tmp_path / "cache", Log(), storage_options=s3_options)
    assert "no such file or folder" in str(info.value) and "\n" not in str(info.value)


def test_an_upload_to_a_missing_bucket_fails_in_one_line_and_keeps_the_results(tmp_path, s3_options):
    local = make_checkpoint_folder(tmp_path / "run")
    before = tree_bytes(local)
    url = "s3://no-such-bucket-here/run"
    with pytest.raises(UserError) as info:
        upload(local, url, Log(), storage_options=s3_options, backoff_s=0.01)
    message = str(info.value)
    assert message.startswith(f"upload of {local} to {url} failed (")
    assert message.endswith(f"); the results are kept in {local}")
    assert "bucket" in message.lower() and "\n" not in message
    assert tree_bytes(local) == before  # nothing deleted, no manifest claiming success


def test_an_upload_when_the_server_is_gone_fails_in_one_line_after_retries(tmp_path, aws_env):
    local = make_checkpoint_folder(tmp_path / "run")
    with moto_server() as (endpoint, proc):
        options = s3_storage_options(endpoint)
        fsspec.filesystem("s3", **options).mkdir("results")
        upload(local, "s3://results/run", Log(), storage_options=options)
        proc.terminate()
        proc.wait(10)
        (local / "status.json").write_bytes(b'{"state": "done", "again": true}')
        before = tree_bytes(local)
        log = Log()
        with pytest.raises(UserError) as info:
            upload(local, "s3://results/run", log, retries=2, storage_options=options, backoff_s=0.01)
    message = str(info.value)
    assert message.startswith(f"upload of {local} to s3://results/run failed (")
    assert message.endswith(f"the results are kept in {local}") and "\n" not in message
    assert sum("retrying" in line for line in log) == 2
    assert tree_bytes(local) == before


def test_a_transient_error_is_retried_and_the_upload_completes(tmp_path, s3_options, bucket, monkeypatch):
    local = make_checkpoint_folder(tmp_path / "run")
    fs = fsspec.filesystem("s3", **s3_options)
    real_put = fs.put_file
    failures = []

    def flaky_put(lpath, rpath, **kwargs):
        if not failures:
            failures.append(rpath)
            raise ConnectionResetError("connection reset by peer")
        return real_put(lpath, rpath, **kwargs)

    monkeypatch.setattr(fs, "put_file", flaky_put)
    log = Log()
    report = upload(local, f"s3://{bucket}/run", log, storage_options=s3_options, backoff_s=0.01)
    assert len(failures) == 1 and any("retrying" in line for line in log)
    assert len(report.uploaded) == len(tree_bytes(local)) - 1  # all but the local manifest


def test_multipart_uploads_are_verified_by_their_etag(tmp_path, s3_options, bucket):
    path = tmp_path / "big.safetensors"
    path.write_bytes(os.urandom(11 << 20))
    fs = fsspec.filesystem("s3", **s3_options)
    fs.put_file(str(path), f"{bucket}/big.safetensors", chunksize=5 << 20)  # 3 parts
    fs.invalidate_cache()
    sha256, md5 = storage._hashes(path)
    entry = {"size": path.stat().st_size, "sha256": sha256, "md5": md5}
    assert storage._etag(fs.info(f"{bucket}/big.safetensors")).endswith("-3")
    assert storage._check_remote(fs, f"{bucket}/big.safetensors", path, entry, read_back=False) == (
        True,
        "etag-multipart-md5",
    )


def test_local_weights_are_deleted_only_after_a_verified_upload(tmp_path, s3_options, bucket):
    local = make_checkpoint_folder(tmp_path / "run")
    (local / "extra.pt").write_bytes(b"not under step_*")
    url = f"s3://{bucket}/run"
    with pytest.raises(UserError, match="no upload manifest"):
        delete_local_weights(local, storage_options=s3_options)

    upload(local, url, Log(), storage_options=s3_options)
    fs = fsspec.filesystem("s3", **s3_options)
    good = (local / "step_1" / "model.safetensors").read_bytes()
    fs.pipe_file(f"{bucket}/run/step_1/model.safetensors", good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(UserError, match="does not match"):
        delete_local_weights(local, storage_options=s3_options)
    fs.pipe_file(f"{bucket}/run/step_1/model.safetensors", good)

    (local / "step_1" / "recipe_state.pt").write_bytes(b"changed after the upload")
    with pytest.raises(UserError, match="changed since it was uploaded"):
        delete_local_weights(local, storage_options=s3_options)
    assert (local / "step_1" / "model.safetensors").exists()

    upload(local, url, Log(), storage_options=s3_options)
    deleted = delete_local_weights(local, storage_options=s3_options)
    assert sorted(p.relative_to(local).as_posix() for p in deleted) == [
        "step_1/model.safetensors",
        "step_1/recipe_state.pt",
        "step_2/adapter/adapter_model.safetensors",
    ]
    left = sorted(tree_bytes(local))
    assert left == [
        MANIFEST_NAME,
        "extra.pt",
        "metrics.jsonl",
        "status.json",
        "step_1/config.json",
        "step_2/adapter/adapter_config.json",
    ]


def test_missing_credentials_fail_at_once_in_one_line(tmp_path, s3_endpoint, monkeypatch):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    options = {**s3_storage_options(s3_endpoint), "skip_instance_cache": True}
    local = make_checkpoint_folder(tmp_path / "run")
    before = tree_bytes(local)
    log = Log()
    with pytest.raises(UserError) as info:
        upload(local, "s3://somewhere/run", log, storage_options=options, backoff_s=0.01)
    message = str(info.value)
    assert "credentials" in message.lower() and message.endswith(f"the results are kept in {local}")
    assert not any("retrying" in line for line in log)  # retrying cannot fix it
    assert tree_bytes(local) == before


def test_concurrent_fetches_of_one_url_download_once(tmp_path, s3_options, bucket, monkeypatch):
    local = make_checkpoint_folder(tmp_path / "ckpt")
    url = f"s3://{bucket}/ckpt"
    upload(local, url, Log(), storage_options=s3_options)
    gets = count_calls(monkeypatch, fsspec.filesystem("s3", **s3_options), "get_file")
    with ThreadPoolExecutor(3) as pool:
        paths = list(pool.map(lambda _: fetch(url, tmp_path / "cache", Log(), storage_options=s3_options), range(3)))
    assert len(set(paths)) == 1
    assert tree_bytes(paths[0]) == tree_bytes(local)
    assert len(gets) == len(tree_bytes(local))  # one of them downloaded; the others found the copy


def test_a_url_whose_backend_is_not_installed_is_one_line(tmp_path):
    if importlib.util.find_spec("dropboxdrivefs") is not None:
        pytest.skip("dropboxdrivefs is installed here")
    with pytest.raises(UserError, match=r"^dropbox:// URLs need a package that is not installed \(.*\); install"):
        upload(make_checkpoint_folder(tmp_path / "run"), "dropbox://results/run", Log())
