"""The inference setup `generate` and `eleuther_eval` share (finetune.inference): what it knows
before any weight is read, and that the model it loads (plain, with an adapter, quantized)
computes what the blocks it composes compute."""

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
import torch

from finetune import ao
from finetune.checkpointing import load_model, save_hf_checkpoint
from finetune.checkpointing.peft import save_peft_adapter
from finetune.checkpointing.quantized import load_quantized_model, save_quantized_checkpoint
from finetune.inference import load_inference_model, prepare_inference
from finetune.models import ModelArgs, build_model
from finetune.models.lora import adapter_params, adapter_state_dict, apply_lora, merged_state_dict
from finetune.params import resolve_path
from finetune.quantization import quantize_model
from finetune.tokenizers import load_tokenizer
from finetune.training.precision import resolve_run_dtype

TOKENIZER = resolve_path("pkg:data/demo/tokenizer.model")
ARGS = ModelArgs(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, max_seq_len=64)
TOKENS = torch.tensor([[1, 5, 9, 200, 31, 7]])


@dataclass
class Params:
    """The keys `prepare_inference` reads, as GenerateParams and EvalParams carry them."""

    checkpoint_dir: str
    model: str = "auto"
    checkpoint_format: str = "auto"
    tokenizer_path: Optional[str] = None
    device: str = "cpu"
    dtype: str = "auto"


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = build_model(ARGS)
    model.reset_parameters(std=0.15)
    directory = tmp_path_factory.mktemp("checkpoint")
    save_hf_checkpoint(model.state_dict(), ARGS, directory, tokenizer_files=[TOKENIZER])
    return directory


def test_auto_dtype_is_fp32_on_a_cpu_and_a_named_dtype_is_kept():
    cpu = torch.device("cpu")
    assert resolve_run_dtype("auto", cpu) == torch.float32
    assert resolve_run_dtype("bf16", cpu) == torch.bfloat16


def test_prepare_reads_no_weights(checkpoint_dir, tmp_path):
    no_weights = tmp_path / "no_weights"
    shutil.copytree(checkpoint_dir, no_weights)
    (no_weights / "model.safetensors").write_bytes(b"")  # reading it would fail
    setup = prepare_inference(Params(str(no_weights)))
    assert (setup.checkpoint_dir, setup.device, setup.dtype) == (no_weights, torch.device("cpu"), torch.float32)
    assert (setup.model_args.dim, setup.model_args.n_layers, setup.model_args.vocab_size) == (64, 2, 512)
    assert setup.tokenizer.vocab_size == load_tokenizer(TOKENIZER).vocab_size
    assert setup.quantization is None


def test_loaded_model_is_the_checkpoint_in_eval_mode(checkpoint_dir):
    logged: list[str] = []
    model = load_inference_model(prepare_inference(Params(str(checkpoint_dir))), None, logged.append)
    reference, _ = load_model(checkpoint_dir)
    assert not model.training and not logged
    with torch.no_grad():
        assert torch.equal(model(TOKENS), reference.eval()(TOKENS))


def test_adapter_on_top_computes_the_merged_model(checkpoint_dir, tmp_path):
    adapted, _ = load_model(checkpoint_dir)
    apply_lora(adapted, attn_modules=["q_proj", "v_proj"], mlp=True, output=False, rank=4, alpha=8.0)
    torch.manual_seed(1)
    with torch.no_grad():
        for param in adapter_params(adapted).values():
            param.normal_(std=0.2)  # B = 0 would make the adapter a no-op and the test blind
    save_peft_adapter(adapter_state_dict(adapted), tmp_path / "adapter", rank=4, alpha=8.0)
    merged = build_model(ARGS)
    merged.load_state_dict(merged_state_dict(adapted))

    logged: list[str] = []
    setup = prepare_inference(Params(str(checkpoint_dir), dtype="fp32"))
    model = load_inference_model(setup, str(tmp_path / "adapter"), logged.append)
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), merged.eval()(TOKENS), rtol=1e-4, atol=1e-4)
    assert logged == [f"adapter {tmp_path / 'adapter'}: LoRA rank 4 on q_proj, v_proj, mlp"]


def test_quantized_checkpoint_is_recognised_before_its_weights_are_read(checkpoint_dir, tmp_path):
    model, _ = load_model(checkpoint_dir)
    quantize_model(model, "int8_weight_only", group_size=32)
    out = save_quantized_checkpoint(
        model, tmp_path / "q", {"scheme": "int8_weight_only", "group_size": None}, tokenizer_files=[TOKENIZER]
    )

    setup = prepare_inference(Params(str(out), dtype="bf16"))
    assert setup.quantization is not None and setup.quantization["scheme"] == "int8_weight_only"
    loaded = load_inference_model(setup, None, print)
    reference, _ = load_quantized_model(out)
    assert ao.is_quantized(loaded.layers[0].attn.q_proj.weight)
    assert loaded.tok_embeddings.weight.dtype == torch.float32  # its own dtype, not the dtype param's
    with torch.no_grad():
        assert torch.equal(loaded(TOKENS), reference(TOKENS))
