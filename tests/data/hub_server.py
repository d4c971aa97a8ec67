"""A local Hugging Face Hub for tests: dataset repositories served over HTTP from folders.

It answers the requests `datasets` and `huggingface_hub` make to find and read a dataset
repository (repository info, file tree, file download with HEAD and byte ranges), so the real
clients load `owner/name` from it when `HF_ENDPOINT` points at it. A repository's commit is a
digest of its files: editing a file publishes a new revision, as a push would.
"""

import hashlib
import http.server
import json
import threading
from pathlib import Path
from typing import Any, Optional
from urllib.parse import parse_qs, unquote, urlparse


class LocalHub:
    """Serves `{"owner/name": folder}` on 127.0.0.1 at a free port until `stop()`."""

    def __init__(self, repos: dict[str, Path]) -> None:
        self.repos = {name: Path(folder) for name, folder in repos.items()}
        self.requests: list[str] = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet: the test output is for failures
                pass

            def do_HEAD(self) -> None:
                hub._answer(self, with_body=False)

            def do_GET(self) -> None:
                hub._answer(self, with_body=True)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # -- the repository's content ---------------------------------------------------------------

    def files(self, repo: str) -> list[str]:
        root = self.repos[repo]
        return sorted(path.relative_to(root).as_posix() for path in root.rglob("*") if path.is_file())

    def commit(self, repo: str) -> str:
        digest = hashlib.sha1(repo.encode())
        for name in self.files(repo):
            digest.update(name.encode() + b"\0" + (self.repos[repo] / name).read_bytes())
        return digest.hexdigest()

    def _entry(self, repo: str, name: str) -> dict[str, Any]:
        path = self.repos[repo] / name
        if path.is_dir():
            return {"type": "directory", "oid": "0" * 40, "size": 0, "path": name}
        content = path.read_bytes()
        return {"type": "file", "oid": hashlib.sha1(content).hexdigest(), "size": len(content), "path": name}

    def _info(self, repo: str) -> dict[str, Any]:
        return {
            "id": repo,
            "author": repo.split("/")[0],
            "sha": self.commit(repo),
            "private": False,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "createdAt": "2026-01-01T00:00:00.000Z",
            "lastModified": "2026-01-01T00:00:00.000Z",
            "cardData": {},
            "siblings": [{"rfilename": name} for name in self.files(repo)],
        }

    def _tree(self, repo: str, folder: str, recursive: bool) -> list[dict[str, Any]]:
        entries, seen = [], set()
        for name in self.files(repo):
            if folder and not name.startswith(folder + "/"):
                continue
            parts = name[len(folder) + 1 :].split("/") if folder else name.split("/")
            depth = len(parts) - 1 if recursive else min(1, len(parts) - 1)
            for i in range(1, depth + 1):  # the folders on the way, each once
                sub = "/".join(([folder] if folder else []) + parts[:i])
                if sub not in seen:
                    seen.add(sub)
                    entries.append(self._entry(repo, sub))
            if recursive or len(parts) == 1:
                entries.append(self._entry(repo, name))
        return entries

    # -- HTTP -----------------------------------------------------------------------------------

    def _answer(self, request: http.server.BaseHTTPRequestHandler, *, with_body: bool) -> None:
        url = urlparse(request.path)
        parts = unquote(url.path).strip("/").split("/")
        self.requests.append(f"{request.command} {request.path}")
        # /datasets/<owner>/<name>/resolve/<revision>/<file>
        if parts[0] == "datasets" and len(parts) >= 6 and parts[3] == "resolve":
            repo, name = "/".join(parts[1:3]), "/".join(parts[5:])
            if repo not in self.repos:
                return _send(request, 404, b"", {"X-Error-Code": "RepositoryNotFound"}, with_body)
            if name not in self.files(repo):
                return _send(request, 404, b"", {"X-Error-Code": "EntryNotFound"}, with_body)
            content = (self.repos[repo] / name).read_bytes()
            headers = {"X-Repo-Commit": self.commit(repo), "ETag": f'"{hashlib.sha1(content).hexdigest()}"'}
            headers["Accept-Ranges"] = "bytes"
            wanted = _byte_range(request.headers.get("Range"), len(content))
            if wanted is None:
                return _send(request, 200, content, headers, with_body)
            start, stop = wanted
            headers["Content-Range"] = f"bytes {start}-{stop - 1}/{len(content)}"
            return _send(request, 206, content[start:stop], headers, with_body)
        # /api/datasets/<owner>/<name>[/revision/<rev> | /tree/<rev>[/<folder>]]
        if parts[:2] == ["api", "datasets"] and len(parts) >= 4:
            repo, rest = "/".join(parts[2:4]), parts[4:]
            if repo not in self.repos:
                return _send(request, 404, b"", {"X-Error-Code": "RepositoryNotFound"}, with_body)
            if not rest or rest[0] == "revision":
                return _send_json(request, self._info(repo), with_body)
            if rest[0] == "tree" and len(rest) >= 2:
                recursive = parse_qs(url.query).get("recursive", ["false"])[0].lower() in ("true", "1")
                return _send_json(request, self._tree(repo, "/".join(rest[2:]), recursive), with_body)
        _send(request, 404, b"", {}, with_body)


def _byte_range(header: Optional[str], size: int) -> Optional[tuple[int, int]]:
    """[start, stop) of a `bytes=a-b` or `bytes=a-` Range header; None for the whole file."""
    if not header or not header.startswith("bytes="):
        return None
    first, _, last = header[len("bytes=") :].partition("-")
    if not first:  # bytes=-N: the last N bytes
        return max(0, size - int(last)), size
    return int(first), min(size, int(last) + 1) if last else size


def _send_json(request: http.server.BaseHTTPRequestHandler, value: Any, with_body: bool) -> None:
    _send(request, 200, json.dumps(value).encode(), {"Content-Type": "application/json"}, with_body)


def _send(
    request: http.server.BaseHTTPRequestHandler, status: int, body: bytes, headers: dict[str, str], with_body: bool
) -> None:
    request.send_response(status)
    for key, value in headers.items():
        request.send_header(key, value)
    request.send_header("Content-Length", str(len(body)))
    request.end_headers()
    if with_body:
        request.wfile.write(body)
