"""Generation block: KV-cached decoding equals full recompute, left padding is invisible,
sampling is reproducible, and rows stop independently."""

import pytest
import torch

from finetune.errors import UserError
from finetune.models.generation import (
    TextStream,
    generate,
    left_padded,
    padded_causal_mask,
    sample_next,
)
from tests.generation.conftest import tiny_model

PAD = 0
# Different lengths, so the batch needs left padding of 0, 6 and 3 tokens.
PROMPTS = [[1, 5, 17, 33, 8, 9, 10, 60, 44], [1, 20, 21], [1, 30, 31, 32, 70, 71]]


def greedy(model, prompts, **kwargs):
    return generate(
        model,
        prompts,
        max_new_tokens=kwargs.pop("max_new_tokens", 24),
        stop_tokens=kwargs.pop("stop_tokens", []),
        pad_id=PAD,
        **kwargs,
    )


def test_cached_greedy_equals_full_recompute(model):
    cached = greedy(model, PROMPTS)
    recomputed = greedy(model, PROMPTS, use_cache=False)
    assert cached == recomputed
    assert [len(row) for row in cached] == [24, 24, 24]
    # Varied text: a model stuck on one token would hide masking bugs.
    assert all(len(set(row)) > 5 for row in cached)


def test_each_batch_row_equals_its_prompt_alone(model):
    batched = greedy(model, PROMPTS)
    alone = [greedy(model, [prompt])[0] for prompt in PROMPTS]
    assert batched == alone
    assert len({tuple(row) for row in batched}) == len(PROMPTS)


def test_padded_row_logits_equal_unpadded_logits(model):
    # Stronger than token equality: the whole distribution of a padded row is unchanged.
    tokens, pad_counts = left_padded(PROMPTS, 9, PAD, torch.device("cpu"))
    positions = (torch.arange(9)[None] - pad_counts[:, None]).clamp(min=0)
    with torch.no_grad():
        padded = model(tokens, position_ids=positions, mask=padded_causal_mask(pad_counts, 9))
        for row, prompt in enumerate(PROMPTS):
            alone = model(torch.tensor([prompt]))[0]
            torch.testing.assert_close(padded[row, 9 - len(prompt) :], alone, rtol=1e-5, atol=1e-5)
    assert pad_counts.tolist() == [0, 6, 3]


def test_mask_hides_padding_and_leaves_no_query_without_keys():
    mask = padded_causal_mask(torch.tensor([0, 2]), 5)
    assert mask.any(dim=-1).all()  # an all-masked query row gives NaN in some SDPA kernels
    assert not mask[1, 2:, :2].any()  # real tokens never see the padding
    assert mask[1, :2, :2].equal(torch.eye(2, dtype=torch.bool))
    assert mask[0].equal(torch.ones(5, 5, dtype=torch.bool).tril())


def test_each_row_counts_positions_from_its_first_real_token(model):
    # RoPE only sees position differences, so a shifted row would generate the same tokens;
    # watch the positions themselves.
    seen = []
    hook = model.rope.register_forward_hook(lambda module, args, out: seen.append(args[0].clone()))
    try:
        greedy(model, PROMPTS, max_new_tokens=2)
    finally:
        hook.remove()
    prefill, step = seen
    assert prefill[1].tolist() == [0] * 6 + [0, 1, 2]
    assert prefill[2].tolist() == [0] * 3 + [0, 1, 2, 3, 4, 5]
    assert step[:, 0].tolist() == [9, 3, 6]


def test_generate_leaves_no_cache_behind(model):
    greedy(model, PROMPTS, max_new_tokens=3)
    assert not model.caches_are_enabled()


def test_seeded_sampling_is_reproducible_and_seeds_differ(model):
    def sample(seed):
        return greedy(model, PROMPTS, temperature=1.0, top_k=40, seed=seed)

    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first
    assert first != greedy(model, PROMPTS)


@pytest.mark.parametrize("cut", [dict(top_k=1), dict(top_p=1e-6)])
def test_sampling_cut_to_one_token_is_greedy(model, cut):
    assert greedy(model, PROMPTS, temperature=1.3, seed=3, **cut) == greedy(model, PROMPTS)


def test_sample_next_respects_top_k_and_top_p():
    generator = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.5, -1.0, 2.9]]).repeat(2000, 1)
    assert sample_next(logits[:2], temperature=0.0).tolist() == [1, 1]
    top3 = sample_next(logits, temperature=1.0, top_k=3, generator=generator)
    assert set(top3.tolist()) == {1, 3, 5}
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).repeat(2000, 1)
    nucleus = sample_next(probs.log(), temperature=1.0, top_p=0.7, generator=generator)
    assert set(nucleus.tolist()) == {0, 1}
    # No cut: every token with probability shows up.
    assert set(sample_next(probs.log(), temperature=1.0, generator=generator).tolist()) == {0, 1, 2, 3}


def test_stop_tokens_end_rows_independently(model):
    prompts = PROMPTS[:2]
    free = greedy(model, prompts)

    def cut(row, stop):
        return row[: row.index(stop) + 1] if stop in row else row

    # A stop token that ends row 0 early and row 1 later (or never).
    stop = next(t for t in free[0][1:] if len(cut(free[1], t)) > len(cut(free[0], t)))
    stopped = greedy(model, prompts, stop_tokens=[stop])
    assert stopped == [cut(free[0], stop), cut(free[1], stop)]
    assert stopped[0][-1] == stop and stop not in stopped[0][:-1]


def test_on_token_streams_every_row_and_can_end_one(model):
    seen: dict[int, list[int]] = {0: [], 1: [], 2: []}

    def on_token(row, token):
        seen[row].append(token)
        return row == 1 and len(seen[1]) == 4  # end row 1 after four tokens

    out = greedy(model, PROMPTS, on_token=on_token)
    assert out == [seen[0], seen[1], seen[2]]
    assert [len(row) for row in out] == [24, 4, 24]
    assert out[0] == greedy(model, PROMPTS)[0]


def test_prompt_longer_than_context_is_a_user_error():
    model = tiny_model(max_seq_len=32)
    with pytest.raises(UserError, match=r"prompt 1 has 20 tokens and max_new_tokens=13, 33 in all, .* context of 32"):
        greedy(model, [[1, 2], list(range(1, 21))], max_new_tokens=13)
    assert len(greedy(model, [list(range(1, 21))], max_new_tokens=12)[0]) == 12


def test_text_stream_holds_back_stop_string_prefixes():
    pieces = ["Hel", "lo", " wor", "ld", "! ", "Ho", "w are", " you"]
    decode = lambda ids: "".join(pieces[i] for i in ids)  # noqa: E731
    stream = TextStream(decode, stop_strings=["world!", "How"])
    streamed = [stream.push(i) for i in range(len(pieces))]
    # "wor" and then "world" could begin "world!": held back until "!" decides.
    assert streamed == ["Hel", "lo", " ", "", "", "", "", ""]
    assert stream.stopped and stream.text == "Hello "
    assert stream.flush() == ""


def test_text_stream_without_stop_strings_reproduces_decode(tmp_path):
    from finetune.tokenizers import load_tokenizer
    from tests.tokenizer_fixtures import train_sentencepiece

    tokenizer = load_tokenizer(train_sentencepiece(tmp_path))
    text = "Grüße aus Köln: the quick brown fox, 12345!"
    ids = tokenizer.encode(text, add_bos=False, add_eos=False)
    stream = TextStream(tokenizer.decode)
    streamed = "".join(stream.push(i) for i in ids) + stream.flush()
    assert streamed == tokenizer.decode(ids) == text
    assert not stream.stopped
