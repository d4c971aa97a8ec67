"""Real services for the job tests: an S3 API (moto's standalone server on 127.0.0.1, reached
through s3fs) and a redis-server on 127.0.0.1.

The servers are separate processes; nothing in the clients is replaced. Tests that need one skip
with a reason when it is not installed (the dev extra installs moto[server], s3fs and the Redis
client; .ci/run installs redis-server).
"""

from __future__ import annotations

import uuid
from typing import Iterator

import fsspec
import pytest

from tests.jobs.helpers import moto_server, redis_server, s3_storage_options


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    with moto_server() as (endpoint, _):
        yield endpoint


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dummy credentials, so nothing reaches for a real account."""
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


@pytest.fixture
def s3_options(s3_endpoint: str, aws_env: None) -> dict:
    return s3_storage_options(s3_endpoint)


@pytest.fixture
def bucket(s3_options: dict) -> str:
    """A fresh bucket on the local server; its name."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("s3", **s3_options).mkdir(name)
    return name


@pytest.fixture
def memory_root() -> Iterator[str]:
    """A fresh folder in fsspec's in-memory filesystem, removed after the test."""
    root = f"/t-{uuid.uuid4().hex[:12]}"
    yield f"memory://{root}"
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)
