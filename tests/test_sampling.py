"""Each sampling control changes the distribution it should; seeds make sampling reproducible."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from conftest import GOLDEN
from loopcoder import LLM, SamplingParams
from loopcoder.sampling import apply_penalties, filter_logits, sample

LOGITS = torch.log(torch.tensor([0.40, 0.25, 0.15, 0.10, 0.06, 0.04]))
DRAWS = 4000


def draw(params: SamplingParams, logits: torch.Tensor = LOGITS, seed: int = 0) -> Counter:
    gen = torch.Generator().manual_seed(seed)
    batch = logits.unsqueeze(0).repeat(DRAWS, 1)
    return Counter(sample(batch.clone(), [params] * DRAWS, [gen] * DRAWS))


def freqs(counts: Counter, vocab: int = 6) -> torch.Tensor:
    return torch.tensor([counts[i] / DRAWS for i in range(vocab)])


def test_temperature_one_follows_the_softmax():
    assert (freqs(draw(SamplingParams(temperature=1.0))) - LOGITS.softmax(-1)).abs().max() < 0.03


def test_temperature_sharpens_and_flattens():
    low = freqs(draw(SamplingParams(temperature=0.3)))
    high = freqs(draw(SamplingParams(temperature=3.0)))
    assert (low - (LOGITS / 0.3).softmax(-1)).abs().max() < 0.03
    assert (high - (LOGITS / 3.0).softmax(-1)).abs().max() < 0.03


def test_greedy_is_argmax():
    assert draw(SamplingParams(temperature=0)) == Counter({0: DRAWS})


def test_top_k_keeps_k_tokens_renormalised():
    f = freqs(draw(SamplingParams(top_k=2)))
    assert f[2:].sum() == 0
    assert abs(f[0] - 0.40 / 0.65) < 0.03


def test_top_p_keeps_the_smallest_nucleus():
    # 0.40 + 0.25 = 0.65 < 0.7, so the third token is needed and the fourth is not.
    f = freqs(draw(SamplingParams(top_p=0.7)))
    assert f[3:].sum() == 0 and f[2] > 0.1


def test_min_p_drops_tokens_below_a_share_of_the_top():
    f = freqs(draw(SamplingParams(min_p=0.3)))  # keeps p >= 0.12
    assert f[3:].sum() == 0 and f[2] > 0.1


def test_filters_combine_per_row():
    rows = LOGITS.unsqueeze(0).repeat(2, 1)
    out = filter_logits(rows, [SamplingParams(top_k=1), SamplingParams()])
    assert torch.isinf(out[0, 1:]).all() and torch.isfinite(out[1]).all()


def test_penalties_and_logit_bias():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    rep = apply_penalties(logits.clone(), [SamplingParams(repetition_penalty=2.0)], [[0]], [[1]])
    assert rep.tolist() == [[1.0, -4.0, 1.0, 0.5]]
    pres = apply_penalties(logits.clone(), [SamplingParams(presence_penalty=1.0)], [[3]], [[2, 2]])
    assert pres.tolist() == [[2.0, -2.0, 0.0, 0.5]]
    freq = apply_penalties(logits.clone(), [SamplingParams(frequency_penalty=0.5)], [[]], [[2, 2, 3]])
    assert freq.tolist() == [[2.0, -2.0, 0.0, 0.0]]
    bias = apply_penalties(logits.clone(), [SamplingParams(logit_bias={1: 10.0})], [[]], [[]])
    assert bias.tolist() == [[2.0, 8.0, 1.0, 0.5]]


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"min_p": 2}, "min_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"logprobs": -1}, "logprobs"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
        ({"stop": [""]}, "stop"),
    ],
)
def test_invalid_values_name_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name} "):
        SamplingParams(**kwargs)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(GOLDEN / "tiny-w5", dtype="float32", block_size=4)


PROMPT = {"prompt_token_ids": [5, 9, 13, 2, 40, 41]}


def test_seed_reproducible_and_independent_of_batch(llm):
    params = SamplingParams(temperature=1.0, seed=1234, max_tokens=10, ignore_eos=True)
    alone = llm.generate([PROMPT], params)[0].outputs[0].token_ids
    others = [{"prompt_token_ids": [i + 1, i + 2]} for i in range(5)]
    mixed = llm.generate(others[:2] + [PROMPT] + others[2:], [SamplingParams(temperature=1.0, max_tokens=7)] * 2 + [params]
                         + [SamplingParams(temperature=1.0, max_tokens=7)] * 3)
    assert mixed[2].outputs[0].token_ids == alone
    other_seed = llm.generate([PROMPT], SamplingParams(temperature=1.0, seed=99, max_tokens=10, ignore_eos=True))
    assert other_seed[0].outputs[0].token_ids != alone


def test_n_samples_differ_and_are_reproducible(llm):
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True)
    first = [o.token_ids for o in llm.generate([PROMPT], params)[0].outputs]
    again = [o.token_ids for o in llm.generate([PROMPT], params)[0].outputs]
    assert first == again and len(first) == 3 and len({tuple(t) for t in first}) == 3


def test_stop_tokens_min_tokens_and_eos(llm):
    greedy = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0].outputs[0].token_ids
    stop_at = greedy[3]
    first = greedy.index(stop_at)
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop_at]))[0].outputs[0]
    assert out.token_ids == greedy[: first + 1] and out.finish_reason == "stop" and out.stop_reason == stop_at
    # min_tokens bans the stop token until enough tokens exist.
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=10, min_tokens=first + 2, stop_token_ids=[stop_at]))[0]
    assert stop_at not in out.outputs[0].token_ids[: first + 2]
    # The golden config's eos (id 2) ends generation unless ignore_eos.
    biased = SamplingParams(temperature=0, max_tokens=10, logit_bias={2: 100.0})
    assert llm.generate([PROMPT], biased)[0].outputs[0].token_ids == [2]
    ignoring = SamplingParams(temperature=0, max_tokens=4, logit_bias={2: 100.0}, ignore_eos=True)
    assert llm.generate([PROMPT], ignoring)[0].outputs[0].token_ids == [2, 2, 2, 2]


def test_repetition_penalty_changes_greedy_output(llm):
    plain = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].outputs[0].token_ids
    penalised = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, repetition_penalty=5.0))
    tokens = penalised[0].outputs[0].token_ids
    assert tokens != plain
    assert len(set(tokens)) > len(set(plain))
