"""Named architectures, ModelArgs checks and meta-device builds."""

import time

import pytest
import torch

from finetune.errors import UserError
from finetune.models import MODEL_NAMES, ModelArgs, build_model, model_args, num_params

# Parameter counts of the released checkpoints.
PUBLISHED_PARAMETER_COUNTS = {
    "llama2_7b": 6_738_415_616,
    "llama2_13b": 13_015_864_320,
    "llama2_70b": 68_976_648_192,
    "llama3_8b": 8_030_261_248,
    "llama3_70b": 70_553_706_496,
    "llama3_1_8b": 8_030_261_248,
    "llama3_1_70b": 70_553_706_496,
    "llama3_1_405b": 405_853_388_800,
    "llama3_2_1b": 1_235_814_400,
    "llama3_2_3b": 3_212_749_824,
    "mistral_7b_v0_3": 7_248_023_552,
    "qwen2_5_0_5b": 494_032_768,
    "qwen2_5_1_5b": 1_543_714_304,
    "qwen2_5_3b": 3_085_938_688,
    "qwen2_5_7b": 7_615_616_512,
    "qwen2_5_14b": 14_770_033_664,
    "qwen2_5_32b": 32_763_876_352,
    "qwen2_5_72b": 72_706_203_648,
    "qwen3_0_6b": 596_049_920,
    "qwen3_1_7b": 1_720_574_976,
    "qwen3_4b": 4_022_468_096,
    "qwen3_8b": 8_190_735_360,
    "qwen3_14b": 14_768_307_200,
    "qwen3_32b": 32_762_123_264,
    # Gemma 3: the text model (4B and up also ship a ~417M-parameter vision tower, not loaded here).
    "gemma3_1b": 999_885_952,
    "gemma3_4b": 3_880_263_168,
    "gemma3_12b": 11_766_034_176,
    "gemma3_27b": 27_009_346_304,
}


def test_registry_names():
    assert set(MODEL_NAMES) == set(PUBLISHED_PARAMETER_COUNTS) | {"tiny"}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMETER_COUNTS))
def test_published_parameter_counts(name):
    assert num_params(build_model(name, device="meta")) == PUBLISHED_PARAMETER_COUNTS[name]


def test_tiny_definition():
    args = model_args("tiny")
    assert (args.vocab_size, args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.hidden_dim) == (
        512,
        256,
        4,
        8,
        4,
        768,
    )
    assert (args.max_seq_len, args.rope_theta, args.family, args.tie_embeddings, args.head_dim) == (
        512,
        10_000.0,
        "llama2",
        False,
        32,
    )


def test_llama3_family_settings():
    assert model_args("llama3_1_8b").rope_scaling.factor == 8.0
    assert model_args("llama3_2_1b").rope_scaling.factor == 32.0
    assert model_args("llama3_2_3b").tie_embeddings and not model_args("llama3_8b").tie_embeddings
    assert model_args("llama3_8b").rope_scaling is None and model_args("llama3_8b").family == "llama3"
    # Each call returns its own copy: editing one must not leak into the registry.
    model_args("llama3_1_8b").rope_scaling.factor = 1.0
    assert model_args("llama3_1_8b").rope_scaling.factor == 8.0


def test_unknown_name_lists_known_names():
    with pytest.raises(UserError, match="unknown model 'llama9'.*llama3_2_1b.*tiny"):
        model_args("llama9")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(dim=100, n_heads=8), "not divisible by n_heads"),
        (dict(n_kv_heads=3), "not a multiple of n_kv_heads"),
        (dict(n_layers=0), "n_layers=0 must be a positive integer"),
        (dict(family="gpt"), "family='gpt' is unknown"),
    ],
)
def test_bad_model_args(overrides, message):
    values = dict(vocab_size=32, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96)
    values.update(overrides)
    with pytest.raises(UserError, match=message):
        ModelArgs(**values)


def test_model_args_dict_round_trip():
    args = model_args("llama3_1_70b")
    assert ModelArgs.from_dict(args.to_dict()) == args
    with pytest.raises(UserError, match="unknown model argument"):
        ModelArgs.from_dict({**args.to_dict(), "n_expert": 8})


def _rss_bytes() -> int:
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("VmRSS:")).split()[1]) * 1024


@pytest.mark.parametrize("name", ["llama2_70b", "llama3_1_70b", "llama3_1_405b"])
def test_huge_meta_build_is_instant_and_allocates_nothing(name):
    build_model("tiny", device="meta")  # first use of the meta device pays one-off setup
    before = _rss_bytes()
    start = time.perf_counter()
    model = build_model(name, device="meta")
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0
    assert all(t.is_meta for t in model.state_dict().values()) and model.rope.inv_freq.is_meta
    assert _rss_bytes() - before < 64 * 1024**2
    assert model.output.weight.shape == (model.args.vocab_size, model.args.dim)


def test_build_model_dtype_keeps_rope_in_fp32():
    small = ModelArgs(vocab_size=32, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=64)
    model = build_model(small, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.rope.inv_freq.dtype == torch.float32
    assert model(torch.zeros(1, 4, dtype=torch.long)).dtype == torch.bfloat16


def test_random_init_is_seeded_and_small():
    torch.manual_seed(1)
    first = build_model("tiny")
    torch.manual_seed(1)
    second = build_model("tiny")
    for (name, a), b in zip(first.named_parameters(), second.parameters()):
        assert torch.equal(a, b), name
    assert first.layers[0].attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.equal(first.norm.weight, torch.ones(256))
