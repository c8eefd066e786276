"""The model against the golden logits written by the official code (DESIGN.md, "The model")."""

from __future__ import annotations

import pytest
import torch

from conftest import GOLDEN_MODELS, PagedHarness, golden_cases

TOL = 1e-3


@torch.no_grad()
def test_full_prompt_dense(golden):
    name, model = golden
    for ids, expected in golden_cases(name):
        got = model.forward_dense(ids[None])[0]
        assert (got - expected).abs().max().item() < TOL


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 10_000])
def test_paged_chunked_prefill_and_decode(golden, chunk):
    """chunk 1 is token-by-token decode; 10_000 is the whole prompt in one step."""
    name, model = golden
    harness = PagedHarness(model)
    for ids, expected in golden_cases(name):
        got = harness.run_chunked(ids.tolist(), chunk)
        assert (got - expected).abs().max().item() < TOL
    assert harness.blocks.global_pool.num_free == harness.blocks.global_pool.num_blocks


def test_batch_of_different_lengths_matches_alone(golden):
    """Prefill chunks and decodes of several sequences in one step give each its own logits."""
    name, model = golden
    ids = golden_cases(name)[0][0].tolist()
    prompts = [ids[:n] for n in (len(ids), 5, len(ids) - 3, 9)]
    alone = [PagedHarness(model).run_chunked(p, 10_000) for p in prompts]
    harness = PagedHarness(model, num_blocks=160)
    seqs = [harness.new(p) for p in prompts]
    got: list[list[torch.Tensor]] = [[] for _ in seqs]
    # First a mixed step (a decode-sized chunk beside prompt chunks), then chunks of 4, then decodes.
    plans = [[1, 5, 3, 2]] + [[4] * 4] * 2
    for plan in plans:
        live = [(i, s, min(n, s.num_tokens - s.num_computed)) for i, (s, n) in enumerate(zip(seqs, plan)) if s.num_computed < s.num_tokens]
        outs = harness.step([s for _, s, _ in live], [n for _, _, n in live])
        for (i, _, _), o in zip(live, outs):
            got[i].append(o)
    while any(s.num_computed < s.num_tokens for s in seqs):
        live = [(i, s) for i, s in enumerate(seqs) if s.num_computed < s.num_tokens]
        outs = harness.step([s for _, s in live], [1] * len(live))
        for (i, _), o in zip(live, outs):
            got[i].append(o)
    for mine, ref in zip(got, alone):
        assert (torch.cat(mine) - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("name", GOLDEN_MODELS)
def test_later_loop_memory_is_constant(name):
    """Local blocks held by one sequence do not grow with its length."""
    from conftest import GOLDEN
    from loopcoder.loader import load_model

    model = load_model(GOLDEN / name, dtype="float32")
    harness = PagedHarness(model, num_blocks=128, block_size=4)
    seq = harness.new(list(range(1, 90)) * 2)
    held = []
    while seq.num_computed < seq.num_tokens:
        harness.step([seq], [1])
        held.append(sum(b is not None for b in seq.local_blocks))
    limit = harness.blocks.local_blocks_per_sequence(1)
    assert max(held) <= limit
    assert len(seq.global_blocks) == -(-seq.num_tokens // 4)
