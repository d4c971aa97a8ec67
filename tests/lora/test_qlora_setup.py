"""QLoRA's start and finish: the base quantized as the model is built (on the run's device), and the
merged model written one weight at a time, both giving exactly what the one-shot path gives."""

import pytest
import torch

from finetune import ao
from finetune.checkpointing import save_hf_checkpoint
from finetune.checkpointing.lazy import LazyStateDict
from finetune.checkpointing.safetensors_io import load_safetensors
from finetune.models import ModelArgs, TransformerDecoder, build_model
from finetune.models.lora import (
    apply_lora,
    initialize_adapters,
    merged_state_dict,
    merged_weights,
    nf4_base_modules,
)
from finetune.training.model_setup import build_on_cpu

ARGS = ModelArgs(vocab_size=256, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=256, max_seq_len=64)


def adapt(use_dora: bool):
    def hook(model: torch.nn.Module) -> None:
        apply_lora(
            model,
            attn_modules=["q_proj", "v_proj"],
            mlp=False,
            output=False,
            rank=4,
            alpha=8.0,
            use_dora=use_dora,
            quantize_base=True,
        )

    return hook


def seeded_initialize(model: torch.nn.Module) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        initialize_adapters(model)


def one_shot_build(base: dict[str, torch.Tensor], use_dora: bool) -> TransformerDecoder:
    """The order the model was built in before quantizing moved ahead of the adapters: weights
    assigned, then each module quantized and its adapters drawn in one `initialize` pass."""
    with torch.device("meta"):
        model = TransformerDecoder(ARGS)
    adapt(use_dora)(model)
    model.load_state_dict(base, strict=False, assign=True)
    model.tie_weights()
    model.init_rope(torch.device("cpu"))
    seeded_initialize(model)
    return model


def nf4_parts(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    names, _ = weight.__tensor_flatten__()
    return {name: getattr(weight, name) for name in names}


@pytest.fixture(params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def base(request) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.to(request.param) for k, v in build_model(ARGS).state_dict().items()}


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_building_quantizes_exactly_as_the_one_shot_path_and_frees_the_dense_base(base, use_dora):
    expected = one_shot_build({k: v.clone() for k, v in base.items()}, use_dora)
    given = dict(base)
    model = build_on_cpu(ARGS, given, adapt=adapt(use_dora), initialize=seeded_initialize, quantize_on="cpu")
    assert given == {}  # consumed: the dense weights are the model's to free

    quantized = nf4_base_modules(model)
    assert len(quantized) == 2 * 7
    for name, module in quantized.items():
        reference = expected.get_submodule(name).weight
        assert ao.is_nf4(module.weight) and ao.is_nf4(reference), name
        for part, tensor in nf4_parts(module.weight).items():
            assert torch.equal(tensor, nf4_parts(reference)[part]), (name, part)
    for (name, got), want in zip(model.state_dict().items(), expected.state_dict().values()):
        if not ao.is_nf4(got):
            assert torch.equal(got, want), name  # adapters, DoRA magnitudes, norms, embeddings
    assert model.layers[0].attn.q_proj.lora_a.weight.abs().sum() > 0


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_merged_model_written_weight_by_weight_is_byte_identical(tmp_path, use_dora):
    torch.manual_seed(0)
    base = {k: v.to(torch.bfloat16) for k, v in build_model(ARGS).state_dict().items()}
    model = build_on_cpu(ARGS, base, adapt=adapt(use_dora), initialize=seeded_initialize)
    with torch.no_grad():  # trained adapters, so that merging changes the weights
        for name, param in model.named_parameters():
            if "lora_b" in name or "magnitude" in name:
                param.add_(torch.randn_like(param) * 0.05)

    made = []
    specs, make = merged_weights(model)
    lazy = LazyStateDict(specs, lambda name: made.append(name) or make(name))
    eager = merged_state_dict(model)
    assert list(specs) == list(eager) and all(specs[n] == (tuple(t.shape), t.dtype) for n, t in eager.items())
    for max_shard_bytes in (10**9, 200_000):  # one file, then several shards and an index
        one, two = tmp_path / f"eager_{max_shard_bytes}", tmp_path / f"lazy_{max_shard_bytes}"
        written = save_hf_checkpoint(eager, ARGS, one, max_shard_bytes=max_shard_bytes)
        made.clear()
        save_hf_checkpoint(lazy, ARGS, two, max_shard_bytes=max_shard_bytes)
        assert sorted(made) == sorted(specs)  # each weight made once: headers come from the specs
        for path in written:
            assert (two / path.name).read_bytes() == path.read_bytes(), path.name
    assert len(written) > 3
    reread = load_safetensors(written[0])
    assert all(t.dtype == torch.bfloat16 for t in reread.values())
