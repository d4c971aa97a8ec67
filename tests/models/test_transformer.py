"""Decoder behaviour: rotary frequencies, packed documents, KV cache, masks, norms, tying."""

import pytest
import torch

from finetune.models import ModelArgs, RopeScaling, build_model
from finetune.models.rope import rope_inverse_frequencies
from finetune.models.transformer import RMSNorm, live_positions, positions_within_documents

TOLERANCE = 1e-5


def _args(**overrides) -> ModelArgs:
    values = dict(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=160, max_seq_len=128)
    values.update(overrides)
    return ModelArgs(**values)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build_model(_args()).eval()


def _tokens(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "theta, scaling",
    [(10_000.0, None), (500_000.0, RopeScaling(8.0, 1.0, 4.0, 8192)), (500_000.0, RopeScaling(32.0, 1.0, 4.0, 8192))],
)
def test_rope_frequencies_match_transformers(theta, scaling):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rope_parameters = {"rope_type": "default", "rope_theta": theta}
    if scaling is not None:
        rope_parameters = {"rope_type": "llama3", "rope_theta": theta, **vars(scaling)}
    config = LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_parameters=rope_parameters)
    expected = LlamaRotaryEmbedding(config).inv_freq
    assert torch.equal(rope_inverse_frequencies(128, theta, scaling), expected)


def test_return_hidden_feeds_the_output_layer(model):
    tokens = _tokens(2, 9)
    with torch.no_grad():
        hidden = model(tokens, return_hidden=True)
        assert hidden.shape == (2, 9, 64)
        assert torch.equal(model.output(hidden), model(tokens))


def test_packed_documents_match_separate_runs(model):
    first, second, third = _tokens(1, 5, seed=1), _tokens(1, 7, seed=2), _tokens(1, 4, seed=3)
    packed = torch.cat([first, second, third], dim=1)
    document_ids = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4])
    with torch.no_grad():
        together = model(packed, document_ids=document_ids)
        alone = torch.cat([model(first), model(second), model(third)], dim=1)
        restarting = torch.tensor([list(range(5)) + list(range(7)) + list(range(4))])
        explicit = model(packed, document_ids=document_ids, position_ids=restarting)
    assert (together - alone).abs().max().item() <= TOLERANCE
    assert torch.equal(together, explicit)
    # Without the document mask the later documents would see earlier ones.
    with torch.no_grad():
        assert (model(packed)[:, 5:] - alone[:, 5:]).abs().max().item() > 1e-3


def test_positions_within_documents():
    ids = torch.tensor([[4, 4, 4, 7, 7, 1], [0, 0, 0, 0, 0, 0]])
    assert positions_within_documents(ids).tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]


def test_packed_documents_backward(model):
    tokens = _tokens(2, 10)
    document_ids = torch.tensor([[0] * 4 + [1] * 6, [0] * 10])
    model(tokens, document_ids=document_ids).sum().backward()
    gradient = model.layers[0].attn.q_proj.weight.grad
    assert gradient is not None and torch.isfinite(gradient).all() and gradient.abs().sum() > 0


def test_live_positions_end_at_each_rows_last_trained_label():
    labels = torch.tensor([[-100, 5, -100, 7, -100, -100], [-100] * 6, [1, 2, 3, 4, 5, 6]])
    live = live_positions(labels)
    assert (live.batch, live.seq_len) == (3, 6)
    # Row 0 keeps positions 0-3 (a masked position inside stays: later labels depend on it),
    # row 1 has nothing trained, row 2 keeps everything.
    assert live.index.tolist() == [0, 1, 2, 3, 12, 13, 14, 15, 16, 17]
    assert torch.equal(live.pack(labels), labels.flatten()[live.index])


@pytest.mark.parametrize("with_documents", [False, True])
def test_computing_only_live_positions_gives_their_outputs_and_gradients(with_documents):
    torch.manual_seed(0)
    model = build_model(_args())
    tokens = _tokens(3, 12)
    labels = _tokens(3, 12, seed=5)
    labels[0, 7:] = -100  # padding after a 7-token sample
    labels[1, :4] = -100  # a masked prompt, kept: later positions attend to it
    labels[1, 10:] = -100
    document_ids = torch.tensor([[0] * 5 + [1] * 7] * 3) if with_documents else None
    live = live_positions(labels)
    assert live.index.numel() == 7 + 10 + 12

    full = model(tokens, document_ids=document_ids)
    full_rows = live.pack(full)
    full_rows.square().sum().backward()
    full_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    rows = model(tokens, document_ids=document_ids, live=live)
    rows.square().sum().backward()

    assert rows.shape == (29, 128)
    torch.testing.assert_close(rows, full_rows, rtol=1e-5, atol=1e-5)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, full_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_live_positions_refuse_a_kv_cache(model):
    model.setup_caches(1, 16)
    labels = torch.tensor([[1, 2, -100]])
    with pytest.raises(ValueError, match="KV cache"):
        model(_tokens(1, 3), input_pos=torch.arange(3), live=live_positions(labels))


def test_kv_cache_incremental_matches_full_forward(model):
    tokens = _tokens(2, 12)
    with torch.no_grad():
        full = model(tokens)
        model.setup_caches(batch_size=2, max_seq_len=16)
        assert model.caches_are_enabled()
        prefill = model(tokens[:, :5], input_pos=torch.arange(5))
        steps = [model(tokens[:, i : i + 1], input_pos=torch.tensor([i])) for i in range(5, 12)]
        assert (torch.cat([prefill] + steps, dim=1) - full).abs().max().item() <= TOLERANCE

        model.reset_caches()
        assert (model(tokens[:, :12], input_pos=torch.arange(12)) - full).abs().max().item() <= TOLERANCE
        model.remove_caches()
    assert not model.caches_are_enabled()
    assert not any("cache" in name for name in model.state_dict())


def test_kv_cache_requires_input_pos(model):
    model.setup_caches(batch_size=1, max_seq_len=8)
    with pytest.raises(ValueError, match="input_pos"):
        model(_tokens(1, 3))


def test_left_padded_batch_with_mask_matches_unpadded_runs(model):
    """Generation pads prompts on the left and passes its own mask and positions."""
    short, long = _tokens(1, 3, seed=4), _tokens(1, 6, seed=5)
    tokens = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], dim=1), long], dim=0)
    cache_len = 10
    valid = torch.ones(2, cache_len, dtype=torch.bool)
    valid[0, :3] = False  # the short prompt's padding
    position_ids = (valid[:, :6].long().cumsum(dim=1) - 1).clamp(min=0)
    next_tokens = torch.tensor([[7], [9]])
    with torch.no_grad():
        model.setup_caches(batch_size=2, max_seq_len=cache_len)
        prompt_mask = torch.ones(6, cache_len, dtype=torch.bool).tril()[None] & valid[:, None, :]
        prompt = model(tokens, input_pos=torch.arange(6), position_ids=position_ids, mask=prompt_mask)
        step_mask = (torch.arange(cache_len) <= 6)[None, None, :] & valid[:, None, :]
        step = model(next_tokens, input_pos=torch.tensor([6]), position_ids=position_ids[:, -1:] + 1, mask=step_mask)
        model.remove_caches()
        expected_short = model(torch.cat([short, next_tokens[:1]], dim=1))
        expected_long = model(torch.cat([long, next_tokens[1:]], dim=1))
    assert (prompt[0, 3:] - expected_short[0, :3]).abs().max().item() <= TOLERANCE
    assert (prompt[1] - expected_long[0, :6]).abs().max().item() <= TOLERANCE
    assert (step[0, 0] - expected_short[0, 3]).abs().max().item() <= TOLERANCE
    assert (step[1, 0] - expected_long[0, 6]).abs().max().item() <= TOLERANCE


def test_rmsnorm_computes_in_fp32_and_casts_back():
    torch.manual_seed(0)
    norm = RMSNorm(64, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 64) * 50
    x16 = x.to(torch.bfloat16)
    reference = x16.float() * torch.rsqrt(x16.float().pow(2).mean(-1, keepdim=True) + 1e-5)
    out = norm.to(torch.bfloat16)(x16)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, reference.to(torch.bfloat16) * norm.weight)


def test_tied_embeddings_share_one_parameter():
    torch.manual_seed(0)
    model = build_model(_args(tie_embeddings=True))
    assert model.output.weight is model.tok_embeddings.weight
    assert len(list(model.parameters())) == len(model.state_dict()) - 1
    model(_tokens(1, 6)).sum().backward()
    assert model.tok_embeddings.weight.grad is not None
    model.to_empty(device="cpu")  # replaces parameters: tying must be restored by hand
    model.tie_weights()
    assert model.output.weight is model.tok_embeddings.weight


def test_meta_built_model_needs_rope_init():
    torch.manual_seed(0)
    reference = build_model(_args())
    meta_model = build_model(_args(), device="meta")
    meta_model.load_state_dict(reference.state_dict(), assign=True)
    meta_model.init_rope()
    tokens = _tokens(1, 8)
    with torch.no_grad():
        assert torch.equal(meta_model(tokens), reference(tokens))


@pytest.mark.parametrize("plus_one", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_rmsnorm_equals_autograd_forward_and_backward(plus_one, dtype):
    torch.manual_seed(0)
    lean = RMSNorm(64, eps=1e-6, plus_one=plus_one, lean=True).to(dtype)
    with torch.no_grad():
        lean.weight.uniform_(-0.5, 0.5) if plus_one else lean.weight.uniform_(0.5, 1.5)
    weight = lean.weight.detach().clone().requires_grad_()
    x = (torch.randn(3, 5, 64) * 4).to(dtype).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()

    def reference(x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)
        return (normed * (1.0 + weight.float())).type_as(x) if plus_one else normed.type_as(x) * weight

    grad = torch.randn(3, 5, 64).to(dtype)
    out, expected = lean(x), reference(x_ref)
    assert torch.equal(out, expected)
    out.backward(grad)
    expected.backward(grad)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(x.grad, x_ref.grad, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(lean.weight.grad, weight.grad, atol=tolerance * 10, rtol=tolerance)
