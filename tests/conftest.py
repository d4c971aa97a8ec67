"""Shared pytest setup: GPU tests skip without CUDA, and CPU math stays deterministic."""

import atexit
import os
import shutil
import tempfile

import pytest
import torch

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
# Runs started by the tests cache tokenized data in a folder of this test session, not the user's.
_DATA_CACHE = tempfile.mkdtemp(prefix="finetune-data-cache-")
os.environ["FINETUNE_DATA_CACHE"] = _DATA_CACHE
atexit.register(shutil.rmtree, _DATA_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
