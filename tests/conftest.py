"""Shared test fixtures: the golden checkpoints written by the official code, and a paged runner."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loopcoder.engine.kv_cache import BlockManager
from loopcoder.engine.runner import ModelRunner
from loopcoder.engine.sequence import Sequence
from loopcoder.loader import load_model
from loopcoder.model.kv_cache import KVCache
from loopcoder.model.loopcoder import LoopCoderForCausalLM
from loopcoder.sampling import SamplingParams

GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "golden"
GOLDEN_MODELS = ["tiny-w5", "tiny-loop3-llama3-bf16-sharded", "tiny-tied-w64"]


def golden_cases(name: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    expected = load_file(GOLDEN / name / "expected.safetensors")
    cases = sorted({k.split(".")[0] for k in expected})
    return [(expected[f"{c}.input_ids"], expected[f"{c}.logits"]) for c in cases]


@pytest.fixture(scope="session", params=GOLDEN_MODELS)
def golden(request) -> tuple[str, LoopCoderForCausalLM]:
    return request.param, load_model(GOLDEN / request.param, dtype="float32")


class PagedHarness:
    """Drives the engine's block manager and runner by hand: chunks and batches chosen by the test."""

    def __init__(self, model: LoopCoderForCausalLM, num_blocks: int = 64, block_size: int = 4) -> None:
        window = model.config.loop_window_size
        self.blocks = BlockManager(num_blocks, num_blocks, block_size, window, enable_prefix_caching=False)
        self.runner = ModelRunner(model, KVCache(model.config, num_blocks, num_blocks, block_size, model.dtype))

    def new(self, ids: list[int]) -> Sequence:
        return Sequence("test", 0, ids, SamplingParams())

    def step(self, seqs: list[Sequence], num_new: list[int]) -> list[torch.Tensor]:
        """Run the next `num_new[i]` tokens of each sequence in one step; logits per sequence."""
        for seq, n in zip(seqs, num_new, strict=True):
            assert self.blocks.can_allocate(seq, n)
            self.blocks.allocate(seq, n)
        rows = torch.arange(sum(num_new))
        logits = self.runner.run(seqs, num_new, rows)
        out = list(logits.split(num_new))
        for seq, n in zip(seqs, num_new, strict=True):
            seq.num_computed += n
            self.blocks.after_step(seq)
        return out

    def run_chunked(self, ids: list[int], chunk: int) -> torch.Tensor:
        seq = self.new(ids)
        parts = []
        while seq.num_computed < len(ids):
            parts += self.step([seq], [min(chunk, len(ids) - seq.num_computed)])
        self.blocks.free(seq)
        return torch.cat(parts)
