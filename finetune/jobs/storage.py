"""Object storage for jobs: inputs fetched from URLs into a local cache, results uploaded and verified.

A job's `dataset_id`, `checkpoint_dir` and `results_url` may be local paths or `file://`, `s3://`,
`gs://` or `memory://` URLs; everything goes through fsspec (s3fs and gcsfs come with the
`finetune[cloud]` extra). Credentials and endpoints come from the backend's usual places (for S3:
`AWS_*` variables, `~/.aws`, `AWS_ENDPOINT_URL`) or from `storage_options`, passed to fsspec as is.

- `fetch(url, cache_dir, log)` copies a remote file or folder to `cache_dir/<scheme>/<bucket/path>`
  once. Each file is downloaded into a hidden temp name and renamed when whole; a record beside the
  copy lists the whole files (size and the remote's ETag / checksum / modification time) and is
  marked complete only at the end, so a download killed midway is never taken for complete, and
  the next fetch downloads only what is missing, changed or cut short.
- `upload(local_dir, url, log)` puts every file under `local_dir` at `url/<relative path>`, with
  bounded retries and backoff, verifies each one (below), then writes `_manifest.json` (path,
  size, sha256, md5 of every file) at the URL last, and a copy in `local_dir`. A re-run skips the
  files the remote manifest lists with the same size and sha256 and whose remote object still has
  that size (and that md5, where the backend shows one). Nothing local is ever deleted by upload;
  a failure is one UserError line saying the results are kept.
- `upload_again(local_dir, url, paths, log)` puts a few files that changed after an upload (the
  job's events.jsonl) and updates their manifest entries, leaving the others as they are.
- `delete_local_weights(local_dir)` removes the weight files of `step_*/` checkpoints only when
  the upload manifest matches the local files and the remote objects.

How an uploaded file is verified: its size always; then its content, by the cheapest honest means
the backend offers: S3's ETag when it is a plain md5 (single-part uploads), or the md5 of part md5s
of a multipart upload recomputed locally for the usual part sizes; GCS's `md5Hash`; otherwise
(memory, local disk, a multipart ETag of unknown part size) the object is read back and its sha256
compared. The check made when skipping on a re-run is lighter where it would need a read-back: the
manifest (written only after each file was verified) plus the remote size.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import fsspec

try:
    import fcntl
except ImportError:  # Windows: concurrent fetches of one URL are not serialised there
    fcntl = None  # type: ignore[assignment]

from finetune.errors import UserError

Log = Callable[[str], None]

MANIFEST_NAME = "_manifest.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
BACKOFF_S = 1.0
_RECORD_EVERY_S = 10.0
_CHUNK = 1 << 20
_CLOUD_SCHEMES = ("s3", "s3a", "gs", "gcs")  # the backends the `cloud` extra installs
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_MD5_ETAG = re.compile(r"^[0-9a-f]{32}$")
_MULTIPART_ETAG = re.compile(r"^([0-9a-f]{32})-(\d+)$")
# Part sizes multipart uploads commonly use: s3fs (50 MiB), the AWS CLI (8 MiB), the S3 minimum, others.
_PART_SIZES = tuple(n << 20 for n in (50, 8, 5, 16, 64, 100))
# Errors that retrying cannot fix: no bucket or key, no permission, bad arguments, no credentials
# (botocore's NoCredentialsError and kin, told by name so botocore need not be imported here).
_PERMANENT = (FileNotFoundError, PermissionError, UserError, ValueError, TypeError)


def _permanent(exc: BaseException) -> bool:
    return isinstance(exc, _PERMANENT) or "Credentials" in type(exc).__name__


@dataclass
class UploadReport:
    """What `upload` did: the files put and skipped (relative paths), and how each put was verified."""

    url: str
    uploaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    verified_by: dict[str, str] = field(default_factory=dict)
    manifest_url: str = ""


def is_url(text: str | os.PathLike) -> bool:
    """Whether `text` starts with a scheme fsspec knows (`s3://`, `file://`, ...); `C:\\x` is a path."""
    match = _SCHEME.match(str(text))
    return bool(match) and len(match.group(1)) > 1 and match.group(1).lower() in fsspec.available_protocols()


def _scheme(url: str) -> str:
    match = _SCHEME.match(url)
    return match.group(1).lower() if match else "file"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= 200 else line[:197] + "..."


def _filesystem(url: str, storage_options: Optional[Mapping[str, Any]]) -> tuple[Any, str]:
    """The fsspec filesystem and the path inside it for `url`; a missing backend package is a UserError."""
    try:
        fs, path = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    except ImportError as exc:
        scheme = _scheme(url)
        fix = 'pip install "finetune[cloud]"' if scheme in _CLOUD_SCHEMES else "install the package it names"
        raise UserError(f"{scheme}:// URLs need a package that is not installed ({_one_line(exc)}); {fix}") from exc
    fs.invalidate_cache()  # listings cached by an earlier call may be stale
    return fs, path.rstrip("/") or path


def _join(root: str, rel: str) -> str:
    return f"{root.rstrip('/')}/{rel}" if rel else root


def _hashes(path: Path) -> tuple[str, str]:
    """(sha256, md5) of a local file, read once."""
    sha, md5 = hashlib.sha256(), hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
            md5.update(chunk)
    return sha.hexdigest(), md5.hexdigest()


def _multipart_etag(path: Path, part_size: int) -> str:
    """The ETag S3 gives a multipart upload of `path` in parts of `part_size`: md5 of the part md5s, -N."""
    digests = []
    with open(path, "rb") as f:
        while part := f.read(part_size):
            digests.append(hashlib.md5(part).digest())
    return f"{hashlib.md5(b''.join(digests)).hexdigest()}-{len(digests)}"


def _etag(info: Mapping[str, Any]) -> str:
    return str(info.get("ETag") or info.get("etag") or "").strip('"').lower()


def _remote_sha256(fs: Any, path: str) -> str:
    sha = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def _check_remote(fs: Any, path: str, local: Path, entry: Mapping[str, Any], read_back: bool) -> tuple[bool, str]:
    """Whether the object at `path` holds the bytes `entry` (size, sha256, md5) describes, and how it was told.

    With `read_back` false, an object whose backend shows no checksum passes on its size alone.
    """
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return False, "missing"
    if info.get("size") != entry["size"]:
        return False, f"size {info.get('size')} != {entry['size']}"
    etag = _etag(info)
    if _MD5_ETAG.match(etag):
        return etag == entry["md5"], "etag-md5"
    multipart = _MULTIPART_ETAG.match(etag)
    if multipart:
        parts = int(multipart.group(2))
        for size in _PART_SIZES:
            if -(-entry["size"] // size) == parts and _multipart_etag(local, size) == etag:
                return True, "etag-multipart-md5"
    if info.get("md5Hash"):  # GCS: base64 of the md5 digest
        return base64.b64decode(info["md5Hash"]).hex() == entry["md5"], "gcs-md5"
    if not read_back:
        return True, "size"
    return _remote_sha256(fs, path) == entry["sha256"], "read-back-sha256"


# checkpointing.atomic.atomic_write_text does this too, but importing that package loads torch, and
# the `tune` launcher imports this module and must start without it.
def write_json_atomic(path: Path, data: Any) -> None:
    """Replace `path` with `data` as JSON in one rename: a reader sees the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=str), encoding="utf-8")
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def read_json(path: Path) -> Optional[dict]:
    """The JSON object in `path`, or None when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _remote_stamp(info: Mapping[str, Any]) -> dict[str, Any]:
    """What identifies a remote file's content without reading it: size plus checksum or time."""
    for key in ("ETag", "etag", "md5Hash", "crc32c", "checksum", "mtime", "LastModified", "last_modified", "created"):
        if info.get(key) is not None:
            return {"size": info.get("size"), key: str(info[key])}
    return {"size": info.get("size")}


def fetch(url: str, cache_dir: Path | str, log: Log, storage_options: Optional[Mapping[str, Any]] = None) -> Path:
    """The local path of `url`: a local path or `file://` URL as is, a remote file or folder copied once.

    The copy lands in `cache_dir/<scheme>/<bucket/path>`; `<that>.fetched.json` beside it records what
    was fetched. Files whose remote record and cached size are unchanged are not downloaded again.
    """
    url = str(url)
    if not is_url(url) or _scheme(url) in ("file", "local"):
        return Path(fsspec.core.url_to_fs(url)[1] if is_url(url) else url).expanduser()
    fs, root = _filesystem(url, storage_options)
    target = Path(cache_dir) / _scheme(url) / root.lstrip("/")
    record_path = target.with_name(target.name + ".fetched.json")
    try:
        info = fs.info(root)
        if info.get("type") == "directory":
            found = fs.find(root, detail=True)
            remote = {p[len(root) :].lstrip("/"): i for p, i in found.items() if i.get("type") != "directory"}
        else:
            remote = {"": info}
    except FileNotFoundError as exc:
        raise UserError(f"cannot fetch {url}: there is no such file or folder; check the URL") from exc
    except Exception as exc:
        raise UserError(f"cannot fetch {url} ({_one_line(exc)}); check the URL, credentials and endpoint") from exc

    # Ranks of one job (or two jobs) fetching the same URL at once take turns: the second finds the copy.
    lock_dir = Path(cache_dir) / ".locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / (hashlib.sha1(url.encode()).hexdigest() + ".lock"), "w") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        return _fetch_locked(fs, url, root, target, record_path, remote, log)


def _fetch_locked(
    fs: Any, url: str, root: str, target: Path, record_path: Path, remote: dict[str, Mapping[str, Any]], log: Log
) -> Path:
    old = read_json(record_path) or {}
    old_files = old.get("files", {}) if old.get("url") == url else {}
    stamps = {rel: _remote_stamp(i) for rel, i in remote.items()}

    def cached(rel: str) -> Path:
        return target / rel if rel else target

    def intact(rel: str) -> bool:
        local = cached(rel)
        return old_files.get(rel) == stamps[rel] and local.is_file() and local.stat().st_size == stamps[rel]["size"]

    todo = [rel for rel in sorted(remote) if not intact(rel)]
    if not todo and old.get("complete"):
        log(f"using the cached copy of {url} in {target}")
        return target
    if remote and "" not in remote:
        target.mkdir(parents=True, exist_ok=True)
        # Files the remote no longer has (and leftovers of a killed download) go.
        keep = {cached(rel) for rel in remote}
        for path in sorted(target.rglob("*"), reverse=True):
            if path.is_file() and path not in keep:
                path.unlink()
    log(f"fetching {len(todo)} file(s) of {url} into {target}")
    # The record lists only files that are whole, and says `complete` only at the end. It is rewritten
    # every few seconds and when the fetch stops early, so an interrupted fetch resumes where it stood.
    done = {rel: stamps[rel] for rel in remote if rel not in todo}
    complete = False
    written_at = time.monotonic()
    record_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_json_atomic(record_path, {"url": url, "files": done, "complete": False})
        for rel in todo:
            _download(fs, _join(root, rel), cached(rel), remote[rel], url)
            done[rel] = stamps[rel]
            if time.monotonic() - written_at > _RECORD_EVERY_S:
                write_json_atomic(record_path, {"url": url, "files": done, "complete": False})
                written_at = time.monotonic()
        complete = True
    finally:
        write_json_atomic(record_path, {"url": url, "files": done, "complete": complete})
    return target


def _download(fs: Any, path: str, dest: Path, info: Mapping[str, Any], url: str) -> None:
    """Copy one remote file to `dest` through a hidden temp name, checking its size (and md5 ETag)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part-{os.getpid()}")
    try:
        fs.get_file(path, str(tmp))
        size = tmp.stat().st_size
        if size != info.get("size"):
            raise OSError(f"{path}: got {size} bytes, the remote has {info.get('size')}")
        etag = _etag(info)
        if _MD5_ETAG.match(etag) and _hashes(tmp)[1] != etag:
            raise OSError(f"{path}: the downloaded bytes do not match the remote's md5")
        os.replace(tmp, dest)
    except Exception as exc:
        raise UserError(f"cannot fetch {url} ({_one_line(exc)}); check the URL, credentials and endpoint") from exc
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def _local_files(local_dir: Path) -> list[Path]:
    """Every file under `local_dir` to upload: all but the local manifest copy, sorted."""
    return sorted(p for p in local_dir.rglob("*") if p.is_file() and p != local_dir / MANIFEST_NAME)


def _read_remote_bytes(fs: Any, path: str) -> Optional[bytes]:
    try:
        return fs.cat_file(path)
    except Exception:  # no such object (or bucket): the upload itself will say what is wrong
        return None


def _manifest_entries(raw: Optional[bytes]) -> dict[str, dict]:
    """path -> entry from a manifest's bytes, or {} when there is none or it is not ours."""
    try:
        return {e["path"]: e for e in json.loads(raw)["files"]}
    except (TypeError, ValueError, KeyError):
        return {}


def _read_remote_manifest(fs: Any, root: str) -> dict[str, dict]:
    """path -> entry from the manifest at the URL, or {} when there is none readable."""
    return _manifest_entries(_read_remote_bytes(fs, _join(root, MANIFEST_NAME)))


def _with_retries(action: Callable[[], None], retries: int, backoff_s: float, log: Log, what: str) -> None:
    """Run `action`, retrying transient errors `retries` times with doubling waits; the last error raises."""
    for attempt in range(retries + 1):
        try:
            action()
            return
        except Exception as exc:
            if attempt == retries or _permanent(exc):
                raise
            wait = backoff_s * 2**attempt
            log(f"{what} failed ({_one_line(exc)}); retrying in {wait:g} s")
            time.sleep(wait)


def upload(
    local_dir: Path | str,
    url: str,
    log: Log,
    retries: int = 3,
    storage_options: Optional[Mapping[str, Any]] = None,
    backoff_s: float = BACKOFF_S,
) -> UploadReport:
    """Upload every file under `local_dir` to `url/<relative path>`, verified; `_manifest.json` last.

    Each file is tried up to `retries + 1` times (waits of backoff_s, 2x, 4x, ...) on transient errors
    and on a failed verification. A missing bucket, no permission or retries run out raise a UserError:
    `upload of <local_dir> to <url> failed (<reason>); the results are kept in <local_dir>`.
    """
    local_dir = Path(local_dir)
    url = str(url).rstrip("/")

    def failed(reason: str) -> UserError:
        return UserError(f"upload of {local_dir} to {url} failed ({reason}); the results are kept in {local_dir}")

    if not local_dir.is_dir():
        raise failed("no such folder")
    fs, root = _filesystem(url, storage_options)
    report = UploadReport(url=url, manifest_url=_join(url, MANIFEST_NAME))
    remote_raw = _read_remote_bytes(fs, _join(root, MANIFEST_NAME))
    remote_manifest = _manifest_entries(remote_raw)
    entries = []
    try:
        for local in _local_files(local_dir):
            rel = local.relative_to(local_dir).as_posix()
            sha256, md5 = _hashes(local)
            entry = {"path": rel, "size": local.stat().st_size, "sha256": sha256, "md5": md5}
            entries.append(entry)
            rpath = _join(root, rel)
            listed = remote_manifest.get(rel)
            if listed and (listed.get("size"), listed.get("sha256")) == (entry["size"], sha256):
                if _check_remote(fs, rpath, local, entry, read_back=False)[0]:
                    report.skipped.append(rel)
                    continue

            def put(local: Path = local, rpath: str = rpath, entry: dict = entry, rel: str = rel) -> None:
                fs.put_file(str(local), rpath)
                fs.invalidate_cache(rpath)
                ok, how = _check_remote(fs, rpath, local, entry, read_back=True)
                if not ok:
                    raise OSError(f"{rel} did not verify after upload ({how})")
                report.verified_by[rel] = how

            _with_retries(put, retries, backoff_s, log, f"upload of {rel}")
            report.uploaded.append(rel)
        manifest = {"version": 1, "url": url, "files": entries}
        data = json.dumps(manifest, indent=1, sort_keys=True).encode()

        def put_manifest() -> None:
            fs.pipe_file(_join(root, MANIFEST_NAME), data)
            if fs.cat_file(_join(root, MANIFEST_NAME)) != data:
                raise OSError(f"{MANIFEST_NAME} did not verify after upload")

        if data != remote_raw:  # a re-run that found everything intact writes nothing
            _with_retries(put_manifest, retries, backoff_s, log, f"upload of {MANIFEST_NAME}")
    except UserError:
        raise
    except Exception as exc:
        raise failed(_one_line(exc)) from exc
    write_json_atomic(local_dir / MANIFEST_NAME, manifest)
    log(f"uploaded {len(report.uploaded)} file(s) to {url}, {len(report.skipped)} already there intact")
    return report


def upload_again(
    local_dir: Path | str,
    url: str,
    paths: list[str],
    log: Log,
    retries: int = 3,
    storage_options: Optional[Mapping[str, Any]] = None,
    backoff_s: float = BACKOFF_S,
) -> None:
    """Upload `paths` (relative to `local_dir`) once more after `upload`, verified, and replace their
    entries in the manifest at the URL and in `local_dir`.

    The other files are not looked at: their weights may since have been deleted locally, and the
    manifest must go on listing what the URL holds. A failure is a UserError, as for `upload`.
    """
    local_dir = Path(local_dir)
    url = str(url).rstrip("/")
    fs, root = _filesystem(url, storage_options)
    try:
        listed = _read_remote_manifest(fs, root)
        for rel in paths:
            local = local_dir / rel
            sha256, md5 = _hashes(local)
            entry = {"path": rel, "size": local.stat().st_size, "sha256": sha256, "md5": md5}
            rpath = _join(root, rel)

            def put(local: Path = local, rpath: str = rpath, entry: dict = entry, rel: str = rel) -> None:
                fs.put_file(str(local), rpath)
                fs.invalidate_cache(rpath)
                if not _check_remote(fs, rpath, local, entry, read_back=True)[0]:
                    raise OSError(f"{rel} did not verify after upload")

            _with_retries(put, retries, backoff_s, log, f"upload of {rel}")
            listed[rel] = entry
        manifest = {"version": 1, "url": url, "files": [listed[rel] for rel in sorted(listed)]}
        data = json.dumps(manifest, indent=1, sort_keys=True).encode()
        _with_retries(lambda: fs.pipe_file(_join(root, MANIFEST_NAME), data), retries, backoff_s, log, MANIFEST_NAME)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"upload of {', '.join(paths)} to {url} failed ({_one_line(exc)})") from exc
    write_json_atomic(local_dir / MANIFEST_NAME, manifest)


def delete_local_weights(
    local_dir: Path | str, log: Optional[Log] = None, storage_options: Optional[Mapping[str, Any]] = None
) -> list[Path]:
    """Delete the weight files (`*.safetensors`, `*.bin`, `*.pt`, `*.pth`) under `local_dir/step_*/`.

    Only after a verified upload: the manifest `upload` left in `local_dir` must list each of them with
    its current size and sha256, and each remote object must still match it (size, and md5 where the
    backend shows one). Otherwise a UserError refuses and nothing is deleted. Returns what was deleted.
    """
    local_dir = Path(local_dir)
    manifest = read_json(local_dir / MANIFEST_NAME)

    def refuse(why: str) -> UserError:
        return UserError(f"refusing to delete the weights in {local_dir}: {why}; upload the results first")

    if not manifest or "url" not in manifest:
        raise refuse(f"no upload manifest ({MANIFEST_NAME}) there")
    listed = {e["path"]: e for e in manifest.get("files", [])}
    weights = sorted(p for p in local_dir.glob("step_*/**/*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    fs, root = _filesystem(manifest["url"], storage_options)
    for path in weights:
        rel = path.relative_to(local_dir).as_posix()
        entry = listed.get(rel)
        if entry is None:
            raise refuse(f"{rel} is not in the upload manifest")
        if path.stat().st_size != entry["size"] or _hashes(path)[0] != entry["sha256"]:
            raise refuse(f"{rel} changed since it was uploaded")
        try:
            ok, how = _check_remote(fs, _join(root, rel), path, entry, read_back=False)
        except Exception as exc:
            raise refuse(f"{manifest['url']} cannot be checked ({_one_line(exc)})") from exc
        if not ok:
            raise refuse(f"the uploaded {rel} does not match ({how})")
    if _read_remote_manifest(fs, root) != listed:
        raise refuse(f"the manifest at {manifest['url']} differs from the local one")
    for path in weights:
        path.unlink()
    if log:
        log(f"deleted {len(weights)} weight file(s) under {local_dir}, uploaded to {manifest['url']}")
    return weights
