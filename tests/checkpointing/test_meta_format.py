"""Meta consolidated.NN.pth checkpoints: round trip, rotary permutation, model-parallel shards."""

import json

import pytest
import torch

from finetune.checkpointing import detect_format, load_model, load_state_dict, save_meta_checkpoint
from finetune.checkpointing.key_mapping import meta_to_rotate_half, rotate_half_to_meta
from finetune.checkpointing.model_configs import model_args_from_meta_params
from finetune.models import ModelArgs, build_model, model_args
from finetune.models.rope import apply_rotary, rope_inverse_frequencies


def _small_args(**overrides) -> ModelArgs:
    values = dict(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=192, max_seq_len=128)
    values.update(overrides)
    return ModelArgs(**values)


def test_meta_round_trip_is_exact(tmp_path):
    torch.manual_seed(0)
    model = build_model(_small_args())
    save_meta_checkpoint(model.state_dict(), model.args, tmp_path)
    assert detect_format(tmp_path) == "meta"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["consolidated.00.pth", "params.json"]

    loaded, args = load_model(tmp_path, "auto")
    assert args == model.args
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    tokens = torch.randint(0, 96, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))


def test_meta_keys_and_q_rows_are_permuted(tmp_path):
    torch.manual_seed(0)
    model = build_model(_small_args())
    save_meta_checkpoint(model.state_dict(), model.args, tmp_path)
    raw = torch.load(tmp_path / "consolidated.00.pth", weights_only=True)
    assert "layers.1.feed_forward.w2.weight" in raw and "layers.0.attention_norm.weight" in raw
    ours = model.layers[0].attn.q_proj.weight
    assert not torch.equal(raw["layers.0.attention.wq.weight"], ours)
    assert torch.equal(meta_to_rotate_half(raw["layers.0.attention.wq.weight"], 4), ours)
    assert torch.equal(raw["layers.0.attention.wv.weight"], model.layers[0].attn.v_proj.weight)


def _interleaved_rotary(x: torch.Tensor, inv_freq: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Meta's rotary: consecutive pairs (x0, x1), (x2, x3), ... as complex numbers. x [s, heads, hd]."""
    angles = positions[:, None].float() * inv_freq[None]
    rotation = torch.polar(torch.ones_like(angles), angles)[:, None]
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * rotation).flatten(-2)


def test_permutation_turns_meta_rotary_into_rotate_half():
    torch.manual_seed(0)
    n_heads, head_dim, dim, seq_len = 4, 16, 32, 10
    meta_weight = torch.randn(n_heads * head_dim, dim)
    x = torch.randn(seq_len, dim)
    positions = torch.arange(seq_len)
    inv_freq = rope_inverse_frequencies(head_dim, 10_000.0)

    meta_q = _interleaved_rotary((x @ meta_weight.T).view(seq_len, n_heads, head_dim), inv_freq, positions)
    ours = (x @ meta_to_rotate_half(meta_weight, n_heads).T).view(seq_len, n_heads, head_dim)
    angles = torch.cat([positions[:, None] * inv_freq] * 2, dim=-1)[:, None]
    our_q = apply_rotary(ours.transpose(0, 1), angles.cos().transpose(0, 1), angles.sin().transpose(0, 1)).transpose(
        0, 1
    )
    # Same rotated vectors; Meta orders each head's features as pairs, ours as halves.
    meta_q_as_halves = torch.cat((meta_q[..., 0::2], meta_q[..., 1::2]), dim=-1)
    assert (meta_q_as_halves - our_q).abs().max().item() <= 1e-5
    assert torch.equal(rotate_half_to_meta(meta_to_rotate_half(meta_weight, n_heads), n_heads), meta_weight)


def _split_for_model_parallel(state: dict, embedding_dim: int) -> list[dict]:
    """Cut a consolidated Meta state dict into two model-parallel shards the way Meta's code lays them out."""
    shards: list[dict] = [{}, {}]
    for name, tensor in state.items():
        if tensor.dim() == 1:
            split = None
        elif name == "tok_embeddings.weight":
            split = embedding_dim
        elif name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
            split = 1
        else:
            split = 0
        for index in range(2):
            shards[index][name] = tensor.clone() if split is None else tensor.chunk(2, dim=split)[index].clone()
    return shards


@pytest.mark.parametrize("embedding_split", [0, 1], ids=["llama3_vocab_split", "llama2_dim_split"])
def test_model_parallel_meta_shards_are_merged(tmp_path, embedding_split):
    torch.manual_seed(0)
    model = build_model(_small_args())
    save_meta_checkpoint(model.state_dict(), model.args, tmp_path / "one")
    consolidated = torch.load(tmp_path / "one" / "consolidated.00.pth", weights_only=True)
    (tmp_path / "two").mkdir()
    for index, shard in enumerate(_split_for_model_parallel(consolidated, embedding_split)):
        torch.save(shard, tmp_path / "two" / f"consolidated.{index:02d}.pth")
    (tmp_path / "two" / "params.json").write_text((tmp_path / "one" / "params.json").read_text())

    loaded, args = load_model(tmp_path / "two", "auto")
    assert args == model.args
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_llama2_params_without_vocab_take_it_from_weights(tmp_path):
    torch.manual_seed(0)
    model = build_model(_small_args())
    save_meta_checkpoint(model.state_dict(), model.args, tmp_path)
    params = json.loads((tmp_path / "params.json").read_text())
    params["vocab_size"] = -1
    del params["n_kv_heads"], params["max_seq_len"]
    (tmp_path / "params.json").write_text(json.dumps(params))

    state = load_state_dict(tmp_path, _small_args(n_kv_heads=2))
    assert torch.equal(state["tok_embeddings.weight"], model.tok_embeddings.weight)
    from finetune.checkpointing import model_args_from_checkpoint

    args = model_args_from_checkpoint(tmp_path)
    assert (args.vocab_size, args.n_kv_heads, args.max_seq_len, args.family) == (96, 4, 4096, "llama2")


def test_tied_model_round_trips_through_meta(tmp_path):
    torch.manual_seed(0)
    model = build_model(_small_args(tie_embeddings=True))
    save_meta_checkpoint(model.state_dict(), model.args, tmp_path)
    raw = torch.load(tmp_path / "consolidated.00.pth", weights_only=True)
    assert torch.equal(raw["output.weight"], raw["tok_embeddings.weight"])

    loaded, args = load_model(tmp_path, "auto")
    assert args.tie_embeddings and loaded.output.weight is loaded.tok_embeddings.weight
    tokens = torch.randint(0, 96, (1, 12))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))

    # Without any output layer in the file the model is tied as well.
    del raw["output.weight"]
    torch.save(raw, tmp_path / "consolidated.00.pth")
    loaded, args = load_model(tmp_path, "auto")
    assert args.tie_embeddings
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))


# params.json contents of Meta's published checkpoints (vocab_size, dim, n_layers, ... as released).
PUBLISHED_PARAMS = {
    "llama2_7b": {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05, "vocab_size": -1},
    "llama2_70b": {
        "dim": 8192,
        "multiple_of": 4096,
        "ffn_dim_multiplier": 1.3,
        "n_heads": 64,
        "n_kv_heads": 8,
        "n_layers": 80,
        "norm_eps": 1e-05,
        "vocab_size": -1,
    },
    "llama3_8b": {
        "dim": 4096,
        "n_layers": 32,
        "n_heads": 32,
        "n_kv_heads": 8,
        "vocab_size": 128256,
        "multiple_of": 1024,
        "ffn_dim_multiplier": 1.3,
        "norm_eps": 1e-05,
        "rope_theta": 500000.0,
    },
    "llama3_1_8b": {
        "dim": 4096,
        "n_layers": 32,
        "n_heads": 32,
        "n_kv_heads": 8,
        "vocab_size": 128256,
        "multiple_of": 1024,
        "ffn_dim_multiplier": 1.3,
        "norm_eps": 1e-05,
        "rope_theta": 500000.0,
        "use_scaled_rope": True,
    },
    "llama3_1_405b": {
        "dim": 16384,
        "n_layers": 126,
        "n_heads": 128,
        "n_kv_heads": 8,
        "vocab_size": 128256,
        "ffn_dim_multiplier": 1.2,
        "multiple_of": 4096,
        "norm_eps": 1e-05,
        "rope_theta": 500000.0,
        "use_scaled_rope": True,
    },
    "llama3_2_1b": {
        "dim": 2048,
        "n_layers": 16,
        "n_heads": 32,
        "n_kv_heads": 8,
        "vocab_size": 128256,
        "ffn_dim_multiplier": 1.5,
        "multiple_of": 256,
        "norm_eps": 1e-05,
        "rope_theta": 500000.0,
        "use_scaled_rope": True,
    },
    "llama3_2_3b": {
        "dim": 3072,
        "n_layers": 28,
        "n_heads": 24,
        "n_kv_heads": 8,
        "vocab_size": 128256,
        "ffn_dim_multiplier": 1.0,
        "multiple_of": 256,
        "norm_eps": 1e-05,
        "rope_theta": 500000.0,
        "use_scaled_rope": True,
    },
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_published_params_json_gives_registry_architecture(tmp_path, name):
    expected = model_args(name)
    args = model_args_from_meta_params(
        PUBLISHED_PARAMS[name],
        tmp_path / "params.json",
        vocab_size_in_weights=32_000,
        tied_in_weights=expected.tie_embeddings,
    )
    assert args == expected


@pytest.mark.parametrize("name", ["tiny", "llama2_13b", "llama3_70b", "llama3_1_405b", "llama3_2_1b"])
def test_written_params_json_reads_back(tmp_path, name):
    from finetune.checkpointing.model_configs import meta_params_from_model_args

    expected = model_args(name)
    params = meta_params_from_model_args(expected)
    args = model_args_from_meta_params(params, tmp_path, None, expected.tie_embeddings)
    assert args == expected
