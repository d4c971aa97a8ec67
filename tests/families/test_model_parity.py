"""Our decoder against transformers' for Mistral, Qwen 2.5, Qwen 3 and Gemma 3, in fp32."""

import pytest
import torch

from finetune.checkpointing import load_model
from tests.families.conftest import FAMILIES, SLIDING_WINDOW

TOLERANCE = 1e-5
SEQ_LEN = 3 * SLIDING_WINDOW


def _tokens(vocab_size: int, seq_len: int = SEQ_LEN, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, vocab_size, (2, seq_len), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_match_transformers(make_family_model, tmp_path, name):
    hf_model = make_family_model(name)
    hf_model.save_pretrained(tmp_path)
    model, args = load_model(tmp_path, "auto")
    assert args.family == name.split("_")[0]
    tokens = _tokens(args.vocab_size)
    with torch.no_grad():
        ours, theirs = model(tokens), hf_model(tokens).logits
    assert (ours - theirs).abs().max().item() <= TOLERANCE
    assert args.tie_embeddings == hf_model.config.tie_word_embeddings
    if args.tie_embeddings:
        assert model.output.weight is model.tok_embeddings.weight


@pytest.mark.parametrize("name", ["gemma3", "mistral_sliding"])
def test_sliding_window_changes_the_result(make_family_model, tmp_path, name):
    """The window must matter at this length: widening it moves the logits far beyond tolerance."""
    hf_model = make_family_model(name)
    hf_model.save_pretrained(tmp_path)
    model, args = load_model(tmp_path, "auto")
    tokens = _tokens(args.vocab_size)
    with torch.no_grad():
        windowed = model(tokens)
        args.sliding_window = SEQ_LEN
        widened = model(tokens)
    assert (windowed - widened).abs().max().item() > 1e-3


@pytest.mark.parametrize("name", ["qwen2", "qwen3", "gemma3", "mistral_sliding"])
def test_kv_cache_decoding_matches_transformers(make_family_model, tmp_path, name):
    hf_model = make_family_model(name)
    hf_model.save_pretrained(tmp_path)
    model, args = load_model(tmp_path)
    tokens = _tokens(args.vocab_size)
    with torch.no_grad():
        expected = hf_model(tokens).logits
        model.setup_caches(batch_size=2, max_seq_len=SEQ_LEN + 4)
        prefill = model(tokens[:, :5], input_pos=torch.arange(5))
        steps = [model(tokens[:, i : i + 1], input_pos=torch.tensor([i])) for i in range(5, SEQ_LEN)]
    decoded = torch.cat([prefill, *steps], dim=1)
    assert (decoded - expected).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("name", ["qwen3", "gemma3"])
def test_packed_documents_match_separate_rows(make_family_model, tmp_path, name):
    """Two documents packed in one row give each document's own logits (masks and rotary restart)."""
    hf_model = make_family_model(name)
    hf_model.save_pretrained(tmp_path)
    model, args = load_model(tmp_path)
    first, second = _tokens(args.vocab_size, 14, seed=2)[0], _tokens(args.vocab_size, 10, seed=3)[0]
    packed = torch.cat([first, second])[None]
    document_ids = torch.tensor([[0] * 14 + [1] * 10])
    with torch.no_grad():
        together = model(packed, document_ids=document_ids)[0]
        alone = torch.cat([model(first[None])[0], model(second[None])[0]])
    assert (together - alone).abs().max().item() <= TOLERANCE


def test_gemma3_image_text_checkpoint_loads_its_text_model(tmp_path):
    """Gemma 3 4B and up ship as image-text models: the text model loads, the vision tower is left."""
    import transformers

    from tests.families.conftest import _COMMON, FAMILY_CONFIGS

    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    config = transformers.Gemma3Config(
        text_config={**_COMMON, **FAMILY_CONFIGS["gemma3"][1]}, vision_config=vision, mm_tokens_per_image=4
    )
    torch.manual_seed(0)
    hf_model = transformers.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in hf_model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(-0.5, 0.5)
    hf_model.save_pretrained(tmp_path)
    model, args = load_model(tmp_path, "auto")
    assert args.family == "gemma3" and args.layer_types == FAMILY_CONFIGS["gemma3"][1]["layer_types"]
    tokens = _tokens(args.vocab_size)
    with torch.no_grad():
        assert (model(tokens) - hf_model(input_ids=tokens).logits).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("name", ["qwen2", "qwen3", "gemma3"])
def test_gradients_match_transformers(make_family_model, tmp_path, name):
    """Backward through every switch (biases, q/k norms, (1 + w) and sandwich norms, sliding layers)."""
    hf_model = make_family_model(name)
    hf_model.save_pretrained(tmp_path)
    model, args = load_model(tmp_path)
    tokens = _tokens(args.vocab_size)
    labels = _tokens(args.vocab_size, seed=5)
    for logits_of in (model, lambda t: hf_model(t).logits):
        loss = torch.nn.functional.cross_entropy(logits_of(tokens).flatten(0, 1), labels.flatten())
        loss.backward()
    theirs = dict(hf_model.named_parameters())
    from finetune.checkpointing.key_mapping import to_hf_name

    for our_name, param in model.named_parameters():
        their_grad = theirs[to_hf_name(our_name, args.sandwich_norms)].grad
        assert (param.grad - their_grad).abs().max().item() <= 1e-5, our_name


@pytest.mark.parametrize("name", ["qwen2", "gemma3"])
def test_sharded_checkpoints_in_and_out(make_family_model, tmp_path, name):
    import transformers

    from finetune.checkpointing import save_hf_checkpoint

    hf_model = make_family_model(name)
    hf_model.save_pretrained(tmp_path / "theirs", max_shard_size="40KB")
    assert len(list((tmp_path / "theirs").glob("model-*.safetensors"))) > 2
    model, args = load_model(tmp_path / "theirs", "auto")
    written = save_hf_checkpoint(model.state_dict(), args, tmp_path / "ours", max_shard_bytes=40_000)
    assert sum(p.name.startswith("model-") for p in written) > 2
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    assert type(reloaded) is type(hf_model)
    tokens = _tokens(args.vocab_size)
    with torch.no_grad():
        assert (reloaded(tokens).logits - hf_model(tokens).logits).abs().max().item() <= TOLERANCE
