"""The lm-eval adapter against direct computations with our model."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval")  # the eval extra; CI installs it
from lm_eval.api.instance import Instance  # noqa: E402

from finetune.evaluation.harness import HarnessModel
from finetune.models.generation import generate


def request(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=tuple(args), idx=0)


def direct(model, ids: list[int], n_continuation: int) -> tuple[float, bool]:
    """log p(last n tokens | the ones before) from one unbatched forward, and greedy-or-not."""
    with torch.inference_mode():
        logprobs = F.log_softmax(model(torch.tensor([ids[:-1]])).float(), dim=-1)[0, -n_continuation:]
    target = torch.tensor(ids[-n_continuation:])
    return logprobs.gather(-1, target[:, None]).sum().item(), bool((logprobs.argmax(-1) == target).all())


PAIRS = [
    ("Add the two numbers.\n", "14 and 44"),
    ("Sort the words alphabetically.\ncat dog", " bird fish sun"),
    ("Which number is larger? ", "38 or 92"),  # the context's trailing space moves to the continuation
    ("", "Reverse the order of the words."),  # empty context: conditioned on BOS alone
]


@pytest.mark.parametrize("context, continuation", PAIRS)
def test_continuation_ids_spell_the_continuation(tokenizer, model, context, continuation):
    lm = HarnessModel(model, tokenizer)
    context_ids, continuation_ids = lm.encode_pair(context, continuation)
    assert context_ids[0] == tokenizer.bos_id
    assert tokenizer.decode(context_ids[1:] + continuation_ids) == context + continuation
    assert tokenizer.decode(context_ids[1:]) == context.rstrip()  # as lm-eval's own models split
    assert (
        continuation_ids
        == tokenizer.encode(context + continuation, add_bos=False, add_eos=False)[len(context_ids) - 1 :]
    )


def test_loglikelihood_equals_direct_computation(tokenizer, model):
    lm = HarnessModel(model, tokenizer, batch_size=3)
    results = lm.loglikelihood([request("loglikelihood", c, x) for c, x in PAIRS])
    for (context, continuation), (logprob, greedy) in zip(PAIRS, results):
        stripped = context.rstrip()
        whole = tokenizer.encode(context + continuation, add_bos=False, add_eos=False)
        n_context = len(tokenizer.encode(stripped, add_bos=False, add_eos=False)) if stripped else 0
        expected, expected_greedy = direct(model, [tokenizer.bos_id] + whole, len(whole) - n_context)
        assert logprob == pytest.approx(expected, abs=1e-4)
        assert greedy == expected_greedy
        assert logprob < 0


def test_is_greedy_is_true_exactly_for_the_argmax_continuation(tokenizer, model):
    lm = HarnessModel(model, tokenizer)
    context = [tokenizer.bos_id] + tokenizer.encode("Count from 3 to 5.\n", add_bos=False, add_eos=False)
    greedy = generate(model, [context], max_new_tokens=4, stop_tokens=[], pad_id=tokenizer.pad_id)[0]
    other = greedy[:-1] + [(greedy[-1] + 1) % 512]
    (lp_greedy, is_greedy), (lp_other, is_other_greedy) = lm.score([(context, greedy), (context, other)])
    assert is_greedy and not is_other_greedy
    assert lp_greedy > lp_other
    assert lp_greedy == pytest.approx(direct(model, context + greedy, 4)[0], abs=1e-4)


def test_batching_and_order_do_not_change_scores(tokenizer, model):
    requests = [request("loglikelihood", c, x) for c, x in PAIRS * 2]
    one = HarnessModel(model, tokenizer, batch_size=1).loglikelihood(requests)
    many = HarnessModel(model, tokenizer, batch_size=5).loglikelihood(requests)
    for (a, greedy_a), (b, greedy_b) in zip(one, many):
        assert a == pytest.approx(b, abs=1e-4) and greedy_a == greedy_b


def test_long_context_keeps_its_newest_tokens(tokenizer, model):
    lm = HarnessModel(model, tokenizer, max_seq_len=16)
    context = [tokenizer.bos_id] + list(range(10, 40))
    continuation = [50, 60, 70]
    ((logprob, _),) = lm.score([(context, continuation)])
    expected, _ = direct(model, (context + continuation)[-17:], 3)
    assert logprob == pytest.approx(expected, abs=1e-4)


TEXT = "Reverse the order of the words.\ncat dog bird fish sun moon star tree book milk"


def test_loglikelihood_rolling_of_a_short_text_is_the_sum_over_all_tokens(tokenizer, model):
    lm = HarnessModel(model, tokenizer)
    tokens = tokenizer.encode(TEXT, add_bos=False, add_eos=False)
    (total,) = lm.loglikelihood_rolling([request("loglikelihood_rolling", TEXT)])
    assert total == pytest.approx(direct(model, [tokenizer.bos_id] + tokens, len(tokens))[0], abs=1e-4)


def test_loglikelihood_rolling_predicts_each_token_once_with_the_most_context(tokenizer, model):
    window = 6
    lm = HarnessModel(model, tokenizer, max_seq_len=window, batch_size=3)
    tokens = tokenizer.encode(TEXT, add_bos=False, add_eos=False)
    assert len(tokens) > 2 * window and len(tokens) % window  # several windows, the last one partial
    # By hand: the first window predicts tokens 0..5 from BOS onwards; each later one predicts the
    # next (up to) 6 tokens, its input being the 6 tokens that end just before the last of them.
    expected = direct(model, [tokenizer.bos_id] + tokens[:window], window)[0]
    done = window
    while done < len(tokens):
        end = min(done + window, len(tokens))
        expected += direct(model, tokens[end - window - 1 : end], end - done)[0]
        done = end
    (total,) = lm.loglikelihood_rolling([request("loglikelihood_rolling", TEXT)])
    assert total == pytest.approx(expected, abs=1e-3)


def test_generate_until_is_greedy_generation_cut_at_the_stop_string(tokenizer, model):
    lm = HarnessModel(model, tokenizer, batch_size=2)
    contexts = ["Add the two numbers.\n1 and 2\n", "Sort the words alphabetically.\ncat dog\n", "Count from 1 to 3.\n"]
    plain = []
    for context in contexts:
        ids = [tokenizer.bos_id] + tokenizer.encode(context, add_bos=False, add_eos=False)
        out = generate(model, [ids], max_new_tokens=12, stop_tokens=tokenizer.stop_tokens, pad_id=tokenizer.pad_id)[0]
        plain.append(tokenizer.decode(out))
    # Stop at a character past the first of each full answer: every answer is cut there. A random
    # model may emit byte pieces; "\ufffd" stands for an unfinished character while streaming,
    # so it is no stop string a test can rely on.
    stops = [next(ch for ch in text[1:] if ch != "\ufffd") for text in plain]
    requests = [request("generate_until", c, {"until": [s], "max_gen_toks": 12}) for c, s in zip(contexts, stops)]
    requests.append(request("generate_until", contexts[0], {"until": [], "max_gen_toks": 12}))
    answers = lm.generate_until(requests)
    assert answers[:3] == [text[: text.index(stop)] for text, stop in zip(plain, stops)]
    assert answers[3] == plain[0]
