"""The serving engine: continuous batching, chunked prefill, preemption, prefix caching, no leaks."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import GOLDEN, golden_cases
from loopcoder import LLM, AsyncLLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def prompts_of(lengths: list[int], vocab: int = 97, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(1, vocab) for _ in range(n)]} for n in lengths]


LENGTHS = [3, 17, 40, 9, 70, 25, 1, 52]


@pytest.fixture(scope="module")
def reference() -> list[list[int]]:
    """Each of 8 prompts run alone, with a roomy pool and no prefix caching."""
    llm = LLM(GOLDEN / "tiny-w5", dtype="float32", block_size=4, enable_prefix_caching=False)
    return [llm.generate([p], GREEDY)[0].outputs[0].token_ids for p in prompts_of(LENGTHS)]


@pytest.mark.parametrize(
    "engine_args",
    [
        {},
        {"max_num_batched_tokens": 16},
        {"num_kv_blocks": 24, "max_num_batched_tokens": 32},
        {"max_num_seqs": 3, "max_num_batched_tokens": 7},
    ],
    ids=["together", "chunked", "preempting", "few-seqs"],
)
def test_batched_greedy_equals_alone(reference, engine_args):
    llm = LLM(GOLDEN / "tiny-w5", dtype="float32", block_size=4, **engine_args)
    outs = llm.generate(prompts_of(LENGTHS), GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == reference
    if "num_kv_blocks" in engine_args:
        assert llm.engine.scheduler.num_preemptions > 0
    usage = llm.engine.pool_usage()
    assert usage["global_free"] == usage["global_total"] and usage["local_free"] == usage["local_total"]


def test_prefix_cache_hits_equal_misses(reference):
    llm = LLM(GOLDEN / "tiny-w5", dtype="float32", block_size=4)
    prompts = prompts_of(LENGTHS)
    first = llm.generate(prompts, GREEDY)
    again = llm.generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in first] == reference
    assert [o.outputs[0].token_ids for o in again] == reference
    assert sum(o.num_cached_tokens for o in again) > 0
    assert llm.engine.blocks.prefix_hits > 0


@pytest.mark.parametrize("prefix_len", [40, 64, 100])
def test_prefix_hit_logprobs_match_miss_around_window(prefix_len):
    """W = 64 here: shared prefixes below, at and above the window give a miss's exact logprobs."""
    ids = golden_cases("tiny-tied-w64")[0][0].tolist()
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, logprobs=5)
    miss = LLM(GOLDEN / "tiny-tied-w64", dtype="float32", block_size=4, enable_prefix_caching=False)
    hit = LLM(GOLDEN / "tiny-tied-w64", dtype="float32", block_size=4)
    hit.generate([{"prompt_token_ids": ids[: prefix_len + 2]}], params)
    prompt = {"prompt_token_ids": ids[:prefix_len] + [5, 6, 7, 8, 9]}
    want = miss.generate([prompt], params)[0]
    got = hit.generate([prompt], params)[0]
    assert got.num_cached_tokens == prefix_len // 4 * 4
    assert got.outputs[0].token_ids == want.outputs[0].token_ids
    for a, b in zip(got.outputs[0].logprobs, want.outputs[0].logprobs):
        assert a.keys() == b.keys()
        assert all(abs(a[t].logprob - b[t].logprob) < 1e-5 for t in a)


@pytest.mark.parametrize("name", ["tiny-w5", "tiny-loop3-llama3-bf16-sharded", "tiny-tied-w64"])
def test_greedy_matches_golden_and_full_recompute(name):
    from loopcoder.loader import load_model

    ids, logits = golden_cases(name)[0]
    llm = LLM(GOLDEN / name, dtype="float32", block_size=4)
    out = llm.generate([{"prompt_token_ids": ids.tolist()}], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    tokens = out[0].outputs[0].token_ids
    assert tokens[0] == int(logits[-1].argmax())
    model = load_model(GOLDEN / name, dtype="float32")
    seq = ids.tolist()
    with torch.no_grad():
        for token in tokens:
            assert token == int(model.forward_dense(torch.tensor([seq]))[0, -1].argmax())
            seq.append(token)


def test_prompt_logprobs_and_logprobs_shapes():
    ids, logits = golden_cases("tiny-w5")[0]
    llm = LLM(GOLDEN / "tiny-w5", dtype="float32", block_size=4, max_num_batched_tokens=8)
    out = llm.generate([{"prompt_token_ids": ids.tolist()}], SamplingParams(temperature=0, max_tokens=2, logprobs=3, prompt_logprobs=2))[0]
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    expected = torch.log_softmax(logits, -1)
    for pos in range(1, len(ids)):
        entry = out.prompt_logprobs[pos]
        token = int(ids[pos])
        assert abs(entry[token].logprob - float(expected[pos - 1, token])) < 1e-4
        assert entry[token].rank == int((expected[pos - 1] > expected[pos - 1, token]).sum()) + 1
        assert {e.rank for t, e in entry.items() if t != token or e.rank <= 2} >= {1, 2}
    first = out.outputs[0].logprobs[0]
    assert len(out.outputs[0].logprobs) == 2 and len(first) == 3
    assert sorted(e.rank for e in first.values()) == [1, 2, 3]


def test_max_model_len_and_bad_prompts_are_refused():
    llm = LLM(GOLDEN / "tiny-w5", dtype="float32", max_model_len=32)
    with pytest.raises(ValueError, match="max_model_len 32"):
        llm.generate([{"prompt_token_ids": list(range(1, 40))}], GREEDY)
    with pytest.raises(ValueError, match="empty"):
        llm.generate([{"prompt_token_ids": []}], GREEDY)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([{"prompt_token_ids": [1, 500]}], GREEDY)
    out = llm.generate([{"prompt_token_ids": list(range(1, 30))}], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 3 and out.outputs[0].finish_reason == "length"
    assert llm.engine.pool_usage()["global_free"] == llm.engine.pool_usage()["global_total"]


def test_rollback_restores_window_and_global_state():
    """Rolling back k tokens and recomputing them gives the same logits (speculative decoding's need)."""
    from conftest import PagedHarness
    from loopcoder.loader import load_model

    model = load_model(GOLDEN / "tiny-w5", dtype="float32")
    ids, expected = golden_cases("tiny-w5")[1]
    harness = PagedHarness(model)
    harness.blocks.max_rollback = 6
    seq = harness.new(ids.tolist())
    harness.step([seq], [20])
    harness.step([seq], [6])
    harness.blocks.rollback(seq, 6)
    again = harness.step([seq], [3])[0]
    assert (again - expected[20:23]).abs().max() < 1e-3
    with pytest.raises(ValueError, match="roll back"):
        harness.blocks.rollback(seq, 7)


@pytest.fixture(scope="module")
def tiny_pool_llm() -> LLM:
    return LLM(GOLDEN / "tiny-w5", dtype="float32", block_size=4, num_kv_blocks=20, max_num_batched_tokens=16)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lengths=st.lists(st.integers(1, 30), min_size=1, max_size=6),
    abort_at=st.lists(st.integers(0, 8), min_size=0, max_size=3),
)
def test_no_block_leaks_with_aborts(tiny_pool_llm, lengths, abort_at):
    engine = tiny_pool_llm.engine
    ids = [engine.add_request(p, SamplingParams(temperature=0.8, seed=1, max_tokens=6)) for p in prompts_of(lengths)]
    step = 0
    while engine.has_unfinished():
        for i, at in enumerate(abort_at):
            if at == step and i < len(ids):
                engine.abort(ids[i])
        engine.step()
        step += 1
    usage = engine.pool_usage()
    assert usage["global_free"] == usage["global_total"]
    assert usage["local_free"] == usage["local_total"]
    assert not engine.requests


def test_async_engine_streams_and_abort_frees_blocks():
    engine_llm = LLM(GOLDEN / "tiny-w5", dtype="float32", block_size=4)
    llm = AsyncLLM(engine_llm.engine)

    async def run() -> tuple[list[int], list[int]]:
        seen = []
        async for out in llm.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)):
            seen.append(len(out.outputs[0].token_ids))
        stream = llm.generate({"prompt_token_ids": [4, 5, 6]}, SamplingParams(temperature=0, max_tokens=500, ignore_eos=True))
        async for out in stream:
            if len(out.outputs[0].token_ids) >= 2:
                break
        await stream.aclose()
        for _ in range(100):
            usage = engine_llm.engine.pool_usage()
            if usage["global_free"] == usage["global_total"] and not engine_llm.engine.requests:
                break
            await asyncio.sleep(0.02)
        return seen, [usage["global_free"], usage["global_total"]]

    try:
        seen, (free, total) = asyncio.run(run())
    finally:
        llm.shutdown()
    assert seen[-1] == 5 and seen == sorted(seen)
    assert free == total
