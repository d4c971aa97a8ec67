"""QLoRA on CPU: NF4 base weights through finetune.ao, their size, and training on top of them."""

import pytest
import torch
import torch.nn.functional as F

from finetune import ao
from finetune.errors import UserError
from finetune.models import ModelArgs, TransformerDecoder, build_model
from finetune.models.lora import (
    LoRALinear,
    adapter_params,
    apply_lora,
    initialize_adapters,
    lora_modules,
    merged_state_dict,
    set_trainable_params,
)

# Shapes whose element counts divide into torchao's default 64 x 256 blocks, like real Llama layers.
QLORA_ARGS = dict(vocab_size=256, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=256, max_seq_len=64)


def test_nf4_weight_is_about_four_bits():
    weight = torch.randn(512, 256, generator=torch.Generator().manual_seed(0))
    nf4 = ao.to_nf4(weight)
    assert ao.is_nf4(nf4) and not ao.is_nf4(weight)
    ratio = ao.nf4_nbytes(nf4) / (weight.numel() * weight.element_size())
    # 4 bits per value = 1/8 of fp32, plus an int8 scale per 64 values and a float per 256 scales.
    expected = (weight.numel() / 2 + weight.numel() / 64 + 4 * weight.numel() / (64 * 256)) / (4 * weight.numel())
    assert abs(ratio - expected) < 1e-3 and 0.125 < ratio < 0.13
    # Each value lands within half the widest NF4 code gap (0.28 of its block's absmax), give or take
    # the int8 rounding of that block's scale.
    error = (ao.nf4_dequantize(nf4) - weight).abs().view(-1, 64)
    block_absmax = weight.abs().view(-1, 64).amax(dim=1, keepdim=True)
    assert (error <= 0.17 * block_absmax).all() and error.mean().item() < 0.1 * weight.abs().mean().item()


def test_small_shapes_get_a_smaller_scaler_block_and_odd_ones_a_user_error():
    nf4 = ao.to_nf4(torch.randn(48, 32))  # 24 scales: no 256-scale block fits
    assert nf4.scaler_block_size == 24 and nf4.shape == (48, 32)
    with pytest.raises(UserError, match=r"shape \[3, 7\] .* not a multiple of the block size 64"):
        ao.to_nf4(torch.randn(3, 7))


@pytest.mark.parametrize("use_dora", [False, True])
def test_qlora_module_forward_backward(use_dora):
    torch.manual_seed(0)
    module = LoRALinear(128, 64, rank=4, alpha=8.0, use_dora=use_dora, quantize_base=True)
    assert ao.is_nf4(module.weight) and not module.weight.requires_grad
    dense = ao.nf4_dequantize(module.weight)
    x = torch.randn(5, 128, requires_grad=True)
    out = module(x)
    assert torch.equal(out, F.linear(x, dense))  # fresh adapters: exactly the dequantized base
    out.square().sum().backward()
    assert torch.allclose(x.grad, 2 * out.detach() @ dense, atol=1e-5)
    assert module.lora_b.weight.grad.abs().sum() > 0 and module.weight.grad is None
    assert module.lora_a.weight.dtype == torch.float32
    assert torch.allclose(module.merged_weight(), dense)


@pytest.mark.parametrize("use_dora", [False, True])
def test_bf16_qlora_keeps_the_training_dtype(use_dora):
    torch.manual_seed(0)
    module = LoRALinear(128, 64, rank=4, alpha=8.0, use_dora=use_dora, quantize_base=True, dtype=torch.bfloat16)
    x = torch.randn(3, 128, dtype=torch.bfloat16, requires_grad=True)
    out = module(x)
    out.float().sum().backward()
    assert ao.is_nf4(module.weight) and ao.nf4_dequantize(module.weight).dtype == torch.bfloat16
    assert out.dtype == x.grad.dtype == module.lora_a.weight.grad.dtype == torch.bfloat16
    assert torch.equal(out, F.linear(x, ao.nf4_dequantize(module.weight)))


def test_meta_build_quantizes_after_loading(tokens):
    torch.manual_seed(0)
    reference = build_model(ModelArgs(**QLORA_ARGS))
    with torch.device("meta"):
        model = TransformerDecoder(reference.args)
    names = apply_lora(
        model,
        attn_modules=["q_proj", "v_proj"],
        mlp=True,
        output=True,
        rank=4,
        alpha=8.0,
        use_dora=True,
        quantize_base=True,
    )
    model.load_state_dict(reference.state_dict(), strict=False, assign=True)
    model.init_rope()
    initialize_adapters(model)
    assert all(ao.is_nf4(module.weight) for module in lora_modules(model).values()) and len(names) == 2 * 5 + 1
    # The projections without an adapter are 4-bit too; the unadapted head would stay dense.
    assert ao.is_nf4(model.layers[0].attn.k_proj.weight) and ao.is_nf4(model.layers[1].attn.output_proj.weight)
    assert not model.layers[0].attn.k_proj.weight.requires_grad

    merged = merged_state_dict(model)
    assert not any(ao.is_nf4(t) for t in merged.values()) and set(merged) == set(reference.state_dict())
    dequantized = ao.nf4_dequantize(model.layers[0].attn.q_proj.weight)
    assert torch.equal(merged["layers.0.attn.q_proj.weight"], dequantized)  # fresh DoRA merges to the base
    reference.load_state_dict(merged)
    with torch.no_grad():
        assert torch.equal(model(tokens), reference(tokens))


def test_qlora_training_lowers_the_loss():
    torch.manual_seed(0)
    model = build_model(ModelArgs(**QLORA_ARGS))
    apply_lora(
        model,
        attn_modules=["q_proj", "k_proj", "v_proj", "output_proj"],
        mlp=True,
        output=False,
        rank=8,
        alpha=16.0,
        quantize_base=True,
    )
    set_trainable_params(model)
    batch = torch.randint(0, QLORA_ARGS["vocab_size"], (2, 17), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW(adapter_params(model).values(), lr=1e-2)
    losses = []
    for _ in range(4):
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.3, losses
    assert all(ao.is_nf4(m.weight) for m in lora_modules(model).values())
