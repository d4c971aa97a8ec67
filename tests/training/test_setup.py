"""Single-process distributed helpers, device and dtype resolution."""

import pytest
import torch

from finetune.errors import UserError
from finetune.training import distributed
from finetune.training.precision import resolve_dtype


def test_single_process_without_torchrun(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    info = distributed.init_distributed("cpu")
    assert info == distributed.DistInfo(rank=0, world_size=1, local_rank=0, is_distributed=False)
    assert distributed.is_rank_zero() and distributed.get_world_size() == 1
    t = torch.tensor([3.0])
    assert distributed.all_reduce_sum(t) is t and t.item() == 3.0
    distributed.barrier()
    distributed.destroy_distributed()


def test_bad_world_size_env_is_a_user_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(UserError, match="WORLD_SIZE='two' is not an integer"):
        distributed.init_distributed("cpu")


def test_resolve_device():
    assert distributed.resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert distributed.resolve_device("auto").type == expected
    with pytest.raises(UserError, match="unknown device 'tpu'"):
        distributed.resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU is available; set device=cpu"):
            distributed.resolve_device("cuda")


def test_resolve_dtype():
    cpu = torch.device("cpu")
    assert resolve_dtype("fp32", cpu) is torch.float32
    assert resolve_dtype("bf16", cpu) is torch.bfloat16
    assert resolve_dtype("bfloat16", cpu) is torch.bfloat16
    with pytest.raises(UserError, match="unknown dtype 'fp16'; use fp32 or bf16"):
        resolve_dtype("fp16", cpu)
