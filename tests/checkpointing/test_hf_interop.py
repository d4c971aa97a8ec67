"""Parity with transformers' LlamaForCausalLM, in both directions."""

import json

import pytest
import torch

from finetune.checkpointing import detect_format, load_model, load_state_dict, save_hf_checkpoint
from finetune.checkpointing.safetensors_io import read_header
from finetune.models import build_model, model_args

TOLERANCE = 1e-5


def _hf_logits(hf_model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(tokens).logits


def _random_tokens(vocab_size: int, batch: int = 2, seq_len: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", ["llama2", "llama3_scaled", "tied", "mqa"])
def test_loaded_hf_model_matches_transformers(make_hf_model, tmp_path, variant):
    hf_model = make_hf_model(variant)
    hf_model.save_pretrained(tmp_path)
    assert detect_format(tmp_path) == "hf"

    model, args = load_model(tmp_path, "auto")
    tokens = _random_tokens(args.vocab_size)
    with torch.no_grad():
        ours = model(tokens)
    assert (ours - _hf_logits(hf_model, tokens)).abs().max().item() <= TOLERANCE
    assert args.n_kv_heads == hf_model.config.num_key_value_heads
    assert args.tie_embeddings == (variant == "tied")
    if args.tie_embeddings:
        assert model.output.weight is model.tok_embeddings.weight


@pytest.mark.parametrize("variant", ["llama3_scaled", "mqa"])
def test_kv_cache_decoding_matches_transformers(make_hf_model, tmp_path, variant):
    hf_model = make_hf_model(variant)
    hf_model.save_pretrained(tmp_path)
    model, args = load_model(tmp_path)
    tokens = _random_tokens(args.vocab_size, seq_len=20)
    expected = _hf_logits(hf_model, tokens)

    model.setup_caches(batch_size=2, max_seq_len=32)
    with torch.no_grad():
        prefill = model(tokens[:, :8], input_pos=torch.arange(8))
        steps = [model(tokens[:, i : i + 1], input_pos=torch.tensor([i])) for i in range(8, 20)]
    decoded = torch.cat([prefill] + steps, dim=1)
    assert (decoded - expected).abs().max().item() <= TOLERANCE


def test_sharded_hf_checkpoint_loads(make_hf_model, tmp_path):
    hf_model = make_hf_model("llama3_scaled")
    hf_model.save_pretrained(tmp_path, max_shard_size="40KB")
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "model.safetensors.index.json").is_file()

    model, args = load_model(tmp_path, "auto")
    tokens = _random_tokens(args.vocab_size)
    with torch.no_grad():
        assert (model(tokens) - _hf_logits(hf_model, tokens)).abs().max().item() <= TOLERANCE


def test_pytorch_bin_checkpoint_loads(make_hf_model, tmp_path):
    hf_model = make_hf_model("llama2")
    torch.save(hf_model.state_dict(), tmp_path / "pytorch_model.bin")
    hf_model.config.save_pretrained(tmp_path)
    state = load_state_dict(tmp_path, "auto")
    assert torch.equal(state["layers.1.attn.k_proj.weight"], hf_model.model.layers[1].self_attn.k_proj.weight)
    assert torch.equal(state["output.weight"], hf_model.lm_head.weight)


@pytest.mark.parametrize("variant", ["llama3_scaled", "tied"])
def test_saved_hf_checkpoint_loads_in_transformers(tmp_path, variant, make_hf_model):
    from transformers import AutoConfig, LlamaForCausalLM

    source = make_hf_model(variant, seed=3)
    source.save_pretrained(tmp_path / "in")
    model, args = load_model(tmp_path / "in")
    save_hf_checkpoint(model.state_dict(), args, tmp_path / "out", bos_token_id=1, eos_token_id=2)

    config = AutoConfig.from_pretrained(tmp_path / "out")
    assert config.rope_parameters == source.config.rope_parameters
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokens = _random_tokens(args.vocab_size, seed=5)
    with torch.no_grad():
        assert (model(tokens) - _hf_logits(reloaded, tokens)).abs().max().item() <= TOLERANCE
    if variant == "tied":
        assert "lm_head.weight" not in read_header(tmp_path / "out" / "model.safetensors")[0]
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)


def test_sharded_save_round_trip_and_transformers_load(tmp_path):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    args = model_args("tiny")
    model = build_model(args)
    tokenizer = tmp_path / "tokenizer.model"
    tokenizer.write_bytes(b"spm")
    written = save_hf_checkpoint(
        model.state_dict(), args, tmp_path / "out", max_shard_bytes=2_000_000, tokenizer_files=[tokenizer]
    )
    shards = sorted((tmp_path / "out").glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3 and (tmp_path / "out" / "tokenizer.model").read_bytes() == b"spm"
    assert set(shards) <= set(written)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in model.parameters())

    state = load_state_dict(tmp_path / "out", "tiny")
    for name, tensor in model.state_dict().items():
        assert torch.equal(state[name], tensor), name

    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokens = _random_tokens(args.vocab_size)
    with torch.no_grad():
        assert (model(tokens) - _hf_logits(reloaded, tokens)).abs().max().item() <= TOLERANCE


def test_save_in_bf16_and_load_back_as_fp32(tmp_path):
    torch.manual_seed(0)
    model = build_model("tiny")
    save_hf_checkpoint(model.state_dict(), model.args, tmp_path, dtype=torch.bfloat16)
    header, _ = read_header(tmp_path / "model.safetensors")
    assert {entry["dtype"] for entry in header.values()} == {"BF16"}
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert not (tmp_path / "generation_config.json").exists()

    loaded, _ = load_model(tmp_path, "tiny", dtype=torch.float32)
    weight = loaded.layers[0].attn.q_proj.weight
    assert weight.dtype == torch.float32
    assert torch.equal(weight, model.layers[0].attn.q_proj.weight.to(torch.bfloat16).float())

    kept, _ = load_model(tmp_path, "tiny", dtype=None)
    assert kept.layers[0].mlp.w2.weight.dtype == torch.bfloat16


def test_legacy_transformers4_config_is_read(tmp_path, make_hf_model):
    from finetune.checkpointing import model_args_from_checkpoint

    make_hf_model("llama3_scaled").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    parameters = config.pop("rope_parameters")
    config["rope_theta"] = parameters.pop("rope_theta")
    config["rope_scaling"] = dict(parameters, rope_type="llama3")
    (tmp_path / "config.json").write_text(json.dumps(config))

    args = model_args_from_checkpoint(tmp_path)
    assert args.rope_theta == 500_000.0
    assert args.rope_scaling.factor == 8.0 and args.rope_scaling.original_max_position_embeddings == 16
    assert (args.dim, args.hidden_dim, args.n_layers, args.n_heads, args.n_kv_heads) == (64, 112, 2, 4, 2)


def test_output_loads_the_source_tokenizer_and_stops_at_every_eos(tmp_path):
    """An output directory is what transformers needs beside the weights: the source's fast
    tokenizer and chat template, its generation defaults, and its eos ids plus our stop tokens."""
    import dataclasses

    from transformers import AutoTokenizer, GenerationConfig

    from finetune.checkpointing.writers import hf_output_extras
    from finetune.tokenizers import load_tokenizer
    from tests.tokenizer_fixtures import save_llama3_fast_tokenizer, write_llama3_ranks

    source = tmp_path / "source"
    ranks = write_llama3_ranks(source / "original" / "tokenizer.model")
    save_llama3_fast_tokenizer(ranks, source)
    tokenizer = load_tokenizer(source)
    source_eos = [tokenizer.eos_id, tokenizer.eot_id]
    (source / "config.json").write_text(
        json.dumps({"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id})
    )
    (source / "generation_config.json").write_text(
        json.dumps({"bos_token_id": tokenizer.bos_id, "eos_token_id": source_eos, "temperature": 0.6, "top_p": 0.9})
    )

    args = dataclasses.replace(model_args("tiny"), vocab_size=tokenizer.vocab_size)
    extras = hf_output_extras(source, ranks, tokenizer.bos_id, tokenizer.stop_tokens)
    save_hf_checkpoint(build_model(args).state_dict(), args, tmp_path / "out", **extras)

    theirs, reloaded = AutoTokenizer.from_pretrained(source), AutoTokenizer.from_pretrained(tmp_path / "out")
    chat = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
    assert reloaded.apply_chat_template(chat, tokenize=False) == theirs.apply_chat_template(chat, tokenize=False)
    for text in ["<|eot_id|>hi there", "Grüße, 12345!"]:
        assert reloaded.encode(text) == theirs.encode(text)
    generation = GenerationConfig.from_pretrained(tmp_path / "out")
    assert generation.eos_token_id == [*source_eos, tokenizer.eom_id]
    assert (generation.temperature, generation.top_p, generation.bos_token_id) == (0.6, 0.9, tokenizer.bos_id)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["eos_token_id"] == generation.eos_token_id


def test_output_without_a_source_lists_every_stop_token(tmp_path):
    from finetune.checkpointing.writers import hf_output_extras
    from tests.tokenizer_fixtures import write_llama3_ranks

    ranks = write_llama3_ranks(tmp_path / "tokenizer.model")
    extras = hf_output_extras(None, ranks, 512, [513, 521, 520])
    assert extras == {
        "tokenizer_files": [ranks],
        "bos_token_id": 512,
        "eos_token_id": [513, 521, 520],
        "generation_defaults": {},
        "tokenizer_config": None,
    }
    assert hf_output_extras(None, ranks, 1, [2])["eos_token_id"] == 2


def test_a_lone_sentencepiece_tokenizer_loads_in_transformers_as_we_encode(tmp_path):
    """Without a tokenizer_config.json, transformers reads tokenizer.model with no BOS and no leading space."""
    import dataclasses

    from transformers import AutoTokenizer

    from finetune.checkpointing.writers import hf_output_extras
    from finetune.tokenizers import load_tokenizer
    from tests.tokenizer_fixtures import train_sentencepiece

    model_file = train_sentencepiece(tmp_path / "sp" / "tokenizer.model")
    ours = load_tokenizer(model_file)
    args = dataclasses.replace(model_args("tiny"), vocab_size=max(ours.vocab_size, 64))
    extras = hf_output_extras(None, model_file, ours.bos_id, ours.stop_tokens, ours.family)
    save_hf_checkpoint(build_model(args).state_dict(), args, tmp_path / "out", **extras)
    theirs = AutoTokenizer.from_pretrained(tmp_path / "out")
    for text in ["hello world", "The quick brown fox.\n  Two  spaces", "Grüße 12345"]:
        assert theirs.encode(text) == ours.encode(text, add_eos=False)


def test_a_named_model_that_differs_from_the_checkpoints_config_is_refused(tmp_path):
    import dataclasses

    from finetune.checkpointing.model_configs import resolve_model_args
    from finetune.errors import UserError

    tiny = model_args("tiny")
    save_hf_checkpoint(build_model(tiny).state_dict(), tiny, tmp_path / "same")
    assert resolve_model_args("tiny", tmp_path / "same") == tiny
    other = dataclasses.replace(tiny, rope_theta=500_000.0, norm_eps=1e-6)  # same shapes, other model
    save_hf_checkpoint(build_model(other).state_dict(), other, tmp_path / "other")
    with pytest.raises(UserError) as info:
        resolve_model_args("tiny", tmp_path / "other")
    assert str(info.value) == (
        f"model=tiny does not match the checkpoint in {tmp_path / 'other'} (norm_eps 1e-05 vs 1e-06; "
        f"rope_theta {tiny.rope_theta} vs 500000.0); set model=auto to use the checkpoint's own architecture"
    )
    assert resolve_model_args("auto", tmp_path / "other") == dataclasses.replace(other, max_seq_len=tiny.max_seq_len)
