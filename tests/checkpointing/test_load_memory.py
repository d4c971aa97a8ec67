"""Loading streams weights into a meta-built model: peak memory stays near one copy of the weights."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from finetune.checkpointing import save_hf_checkpoint, save_meta_checkpoint
from finetune.models import ModelArgs, TransformerDecoder

# About 270 MB of fp32 weights: big enough that a second copy would dwarf allocator noise.
ARGS = ModelArgs(vocab_size=8192, dim=1024, n_layers=4, n_heads=8, n_kv_heads=8, hidden_dim=2816, max_seq_len=256)

_MEASURE = textwrap.dedent(
    """
    import json, sys
    import torch
    from finetune.checkpointing import load_model

    def peak_bytes():
        # VmHWM, the high-water mark of this process's own address space. (ru_maxrss would carry
        # the forking parent's size over into a freshly exec'd child.)
        with open("/proc/self/status") as status:
            line = next(line for line in status if line.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024

    baseline = peak_bytes()
    model, _ = load_model(sys.argv[1], "auto")
    peak = peak_bytes()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    with torch.no_grad():
        checksum = float(sum(p.double().sum() for p in model.parameters()))
    print(json.dumps({"baseline": baseline, "peak": peak, "weights": weights, "checksum": checksum}))
    """
)


def _fill_state_dict() -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        model = TransformerDecoder(ARGS)
    generator = torch.Generator().manual_seed(0)
    return {name: torch.rand(t.shape, generator=generator) - 0.5 for name, t in model.state_dict().items()}


@pytest.mark.parametrize("fmt", ["hf", "meta"])
def test_peak_memory_of_loading_is_about_one_copy(tmp_path, fmt):
    state = _fill_state_dict()
    if fmt == "hf":
        save_hf_checkpoint(state, ARGS, tmp_path, max_shard_bytes=100 * 1024**2)
    else:
        save_meta_checkpoint(state, ARGS, tmp_path)
    weight_bytes = sum(t.numel() * t.element_size() for t in state.values())
    checksum = float(sum(t.double().sum() for t in state.values()))
    del state

    result = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(tmp_path)], capture_output=True, text=True, check=True, timeout=300
    )
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["weights"] == weight_bytes
    assert measured["checksum"] == pytest.approx(checksum, rel=1e-9)
    growth = measured["peak"] - measured["baseline"]
    assert growth <= 1.3 * weight_bytes, (
        f"peak grew by {growth / 1e6:.0f} MB for {weight_bytes / 1e6:.0f} MB of weights"
    )
