"""LoRALinear math, apply_lora on the decoder, trainable parameters and merging."""

import math

import pytest
import torch
import torch.nn.functional as F

from finetune.errors import UserError
from finetune.models import ModelArgs, TransformerDecoder, build_model
from finetune.models.lora import (
    LoRALinear,
    adapter_params,
    adapter_state_dict,
    apply_lora,
    initialize_adapters,
    load_adapter_state_dict,
    lora_modules,
    merged_state_dict,
    set_trainable_params,
)
from tests.lora.conftest import randomize_adapters

ALL = dict(attn_modules=["q_proj", "k_proj", "v_proj", "output_proj"], mlp=True, output=True)


def _lora_linear(use_dora: bool, seed: int = 0, **kwargs) -> LoRALinear:
    torch.manual_seed(seed)
    module = LoRALinear(32, 48, rank=4, alpha=8.0, use_dora=use_dora, **kwargs)
    with torch.no_grad():
        module.lora_b.weight.normal_()
        if use_dora:
            module.magnitude.uniform_(0.5, 2.0)
    return module


def test_lora_forward_is_base_plus_scaled_low_rank_update():
    module = _lora_linear(use_dora=False)
    x = torch.randn(3, 5, 32)
    a, b, w = module.lora_a.weight, module.lora_b.weight, module.weight
    expected = x @ w.T + (8.0 / 4) * (x @ a.T @ b.T)
    assert torch.allclose(module(x), expected, atol=1e-5, rtol=0)
    assert tuple(a.shape) == (4, 32) and tuple(b.shape) == (48, 4)


def test_dora_forward_and_gradients_follow_the_paper_with_a_constant_norm():
    module = _lora_linear(use_dora=True)
    x = torch.randn(3, 5, 32)
    out = module(x)
    out.square().sum().backward()

    a = module.lora_a.weight.detach().clone().requires_grad_()
    b = module.lora_b.weight.detach().clone().requires_grad_()
    m = module.magnitude.detach().clone().requires_grad_()
    adapted = module.weight + 2.0 * b @ a
    direction = adapted / torch.linalg.vector_norm(adapted, dim=1, keepdim=True).detach()
    expected = x @ (m[:, None] * direction).T
    expected.square().sum().backward()

    assert torch.allclose(out, expected, atol=1e-5, rtol=0)
    for ours, reference in [(module.lora_a.weight, a), (module.lora_b.weight, b), (module.magnitude, m)]:
        assert torch.allclose(ours.grad, reference.grad, rtol=1e-4, atol=1e-4)
    assert module.weight.grad is None


@pytest.mark.parametrize("use_dora", [False, True])
def test_merged_weight_computes_the_same_output(use_dora):
    module = _lora_linear(use_dora)
    x = torch.randn(4, 32)
    assert (F.linear(x, module.merged_weight()) - module(x)).abs().max().item() <= 1e-5


def test_fresh_adapter_is_an_exact_no_op_and_dropout_is_off_in_eval():
    torch.manual_seed(0)
    module = LoRALinear(32, 48, rank=4, alpha=8.0, dropout=0.5, use_dora=True).eval()
    x = torch.randn(6, 32)
    assert torch.equal(module(x), F.linear(x, module.weight))
    assert torch.equal(module.magnitude, torch.linalg.vector_norm(module.weight, dim=1))
    with torch.no_grad():
        module.lora_b.weight.normal_()
    module.train()
    torch.manual_seed(1)
    first = module(x)
    torch.manual_seed(2)
    assert not torch.equal(first, module(x))  # dropout active on the adapter input


def _tiny(seed: int = 0) -> TransformerDecoder:
    torch.manual_seed(seed)
    return build_model(ModelArgs(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96))


@pytest.mark.parametrize("use_dora", [False, True])
def test_step_zero_equals_base_model_exactly(tokens, use_dora):
    model = _tiny()
    with torch.no_grad():
        base = model(tokens)
    names = apply_lora(model, **ALL, rank=4, alpha=16.0, dropout=0.1, use_dora=use_dora)
    assert len(names) == 2 * 7 + 1 and names[0] == "layers.0.attn.q_proj" and names[-1] == "output"
    assert isinstance(model.layers[1].mlp.w2, LoRALinear)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(tokens), base)


def test_meta_build_then_load_then_initialize(tokens):
    reference = _tiny()
    with torch.no_grad():
        base = reference(tokens)
    states = []
    for _ in range(2):
        with torch.device("meta"):
            model = TransformerDecoder(reference.args)
        apply_lora(model, attn_modules=["q_proj", "v_proj"], mlp=True, output=False, rank=4, alpha=8.0, use_dora=True)
        assert model.layers[0].attn.q_proj.lora_a.weight.is_meta
        model.load_state_dict(reference.state_dict(), strict=False, assign=True)
        model.init_rope()
        torch.manual_seed(123)
        initialize_adapters(model)
        assert not any(p.is_meta for p in model.parameters())
        with torch.no_grad():
            assert torch.equal(model(tokens), base)
        states.append(adapter_state_dict(model))
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])  # same seed, same adapters
    assert "layers.1.mlp.w3.magnitude" in states[0] and "layers.0.attn.k_proj.lora_a.weight" not in states[0]


def test_only_adapters_train(tokens):
    model = _tiny()
    apply_lora(model, **ALL, rank=4, alpha=8.0, use_dora=True)
    set_trainable_params(model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_params(model))
    assert len(trainable) == 15 * 3
    assert all(name.endswith(("lora_a.weight", "lora_b.weight", "magnitude")) for name in trainable)

    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    adapters = adapter_state_dict(model)
    optimizer = torch.optim.AdamW(adapter_params(model).values(), lr=1e-2)
    for _ in range(3):
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = dict(model.named_parameters())
    assert all(torch.equal(after[name], value) for name, value in frozen.items())
    assert all(not torch.equal(after[name], value) for name, value in adapters.items())


def test_adapter_state_dict_round_trip_into_a_fresh_model(tokens):
    model = _tiny()
    apply_lora(model, **ALL, rank=4, alpha=8.0, use_dora=True)
    randomize_adapters(model)
    fresh = _tiny()
    apply_lora(fresh, **ALL, rank=4, alpha=8.0, use_dora=True)
    load_adapter_state_dict(fresh, adapter_state_dict(model))
    with torch.no_grad():
        assert torch.equal(fresh(tokens), model(tokens))
    with pytest.raises(
        UserError, match=r"layers.0.attn.q_proj.lora_a.weight has shape \[4, 64\] but the model expects \[2, 64\]"
    ):
        small = _tiny()
        apply_lora(small, **ALL, rank=2, alpha=8.0, use_dora=True)
        load_adapter_state_dict(small, adapter_state_dict(model))


@pytest.mark.parametrize("use_dora", [False, True])
def test_merged_state_dict_reproduces_adapted_logits(tokens, use_dora):
    model = _tiny()
    apply_lora(model, **ALL, rank=4, alpha=8.0, use_dora=use_dora)
    randomize_adapters(model)
    merged = merged_state_dict(model)
    plain = _tiny(seed=1)
    assert set(merged) == set(plain.state_dict())
    plain.load_state_dict(merged)
    with torch.no_grad():
        assert (plain(tokens) - model(tokens)).abs().max().item() <= 1e-5


def test_bad_settings_are_user_errors():
    model = _tiny()
    with pytest.raises(UserError, match="unknown module.*'o_proj'.*choose from q_proj"):
        apply_lora(model, attn_modules=["o_proj"], mlp=False, output=False, rank=4, alpha=8.0)
    with pytest.raises(UserError, match="must be a list"):
        apply_lora(model, attn_modules="q_proj", mlp=False, output=False, rank=4, alpha=8.0)
    with pytest.raises(UserError, match="no module gets an adapter"):
        apply_lora(model, attn_modules=[], mlp=False, output=False, rank=4, alpha=8.0)
    with pytest.raises(UserError, match="lora_rank=0"):
        apply_lora(model, attn_modules=["q_proj"], mlp=False, output=False, rank=0, alpha=8.0)
    with pytest.raises(UserError, match="lora_dropout=1.0"):
        apply_lora(model, attn_modules=["q_proj"], mlp=False, output=False, rank=4, alpha=8.0, dropout=1.0)
    assert not lora_modules(model)  # nothing was swapped by a failed call


def test_output_adapter_on_tied_embeddings_is_refused():
    args = ModelArgs(vocab_size=128, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=96, tie_embeddings=True)
    model = build_model(args, device="meta")
    with pytest.raises(UserError, match="apply_lora_to_output is not supported for models with tied embeddings"):
        apply_lora(model, attn_modules=["q_proj"], mlp=False, output=True, rank=4, alpha=8.0)
    apply_lora(model, attn_modules=["q_proj"], mlp=True, output=False, rank=4, alpha=8.0)
    assert model.output.weight is model.tok_embeddings.weight


def test_scale_is_alpha_over_rank():
    module = LoRALinear(8, 8, rank=4, alpha=2.0)
    assert module.scale == 0.5 and math.isclose(LoRALinear(8, 8, rank=3, alpha=16).scale, 16 / 3)
