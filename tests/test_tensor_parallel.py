"""Tensor parallelism with real worker processes over gloo on CPU, against one rank.

While a tensor-parallel engine is up, this process is rank 0 of its process group, so every
one-rank reference here is computed before the engine starts, and every engine is shut down
before the next one-rank model runs.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from conftest import GOLDEN, GOLDEN_MODELS, PagedHarness, golden_cases
from loopcoder import LLM, SamplingParams
from loopcoder.config import LoopCoderConfig
from loopcoder.engine import tensor_parallel
from loopcoder.engine.engine import LLMEngine
from loopcoder.loader import load_model
from loopcoder.model.loopcoder import LoopCoderForCausalLM

ENGINE_ARGS = {
    "dtype": "float32", "block_size": 4, "enable_prefix_caching": False, "max_num_seqs": 8,
    "max_num_batched_tokens": 16, "kv_cache_memory": 1 << 20,
}
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)
PROMPTS = [{"prompt_token_ids": [(7 * i + 13 * j) % 96 + 1 for j in range(n)]} for i, n in enumerate([3, 17, 40, 9, 70, 25, 1, 52])]
DECODED = 16  # the last tokens of each golden case run one step at a time, after a prefill of the rest


@pytest.fixture(autouse=True, scope="module")
def one_thread_per_rank():
    """Rank 0 and its workers share the machine's cores; threads spinning on idle cores slow every collective."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def harness_of(engine: LLMEngine) -> PagedHarness:
    """A PagedHarness over the engine's own block manager and (tensor-parallel) runner."""
    harness = PagedHarness.__new__(PagedHarness)
    harness.blocks, harness.runner = engine.blocks, engine.runner
    return harness


def decode_tail(harness: PagedHarness, ids: list[int]) -> torch.Tensor:
    """Logits of every position: a prefill of all but the last DECODED tokens, then one token per step."""
    seq = harness.new(ids)
    parts = harness.step([seq], [len(ids) - DECODED])
    while seq.num_computed < len(ids):
        parts += harness.step([seq], [1])
    harness.blocks.free(seq)
    return torch.cat(parts)


@dataclass
class Run:
    logits: dict[str, list[torch.Tensor]]  # mode -> per golden case [T, vocab]
    tokens: list[list[int]]
    logprobs: list[list[float]]
    num_global_blocks: int
    kv_heads_per_rank: int


def run(name: str, size: int) -> Run:
    llm = LLM(GOLDEN / name, tensor_parallel_size=size, **ENGINE_ARGS)
    try:
        harness = harness_of(llm.engine)
        cases = [ids.tolist() for ids, _ in golden_cases(name)]
        logits = {
            "prefill": [harness.run_chunked(ids, 10_000) for ids in cases],
            "chunked": [harness.run_chunked(ids, 3) for ids in cases],
            "decode": [decode_tail(harness, ids) for ids in cases],
        }
        outs = [o.outputs[0] for o in llm.generate(PROMPTS, GREEDY)]
        cache = llm.engine.cache
        return Run(
            logits, [o.token_ids for o in outs], [[lp[t].logprob for lp, t in zip(o.logprobs, o.token_ids)] for o in outs],
            cache.num_global_blocks, cache.global_state.shape[-2],
        )
    finally:
        llm.engine.shutdown()
        if size > 1:
            assert all(proc.poll() == 0 for proc in llm.engine.tp.procs)
        assert not dist.is_initialized()


@pytest.fixture(scope="module", params=GOLDEN_MODELS)
def runs(request) -> tuple[str, Run, Run]:
    """One rank, then two ranks, over the same golden checkpoint (each engine started once)."""
    return request.param, run(request.param, 1), run(request.param, 2)


@pytest.mark.parametrize("mode", ["prefill", "chunked", "decode"])
def test_two_ranks_logits_equal_one_rank(runs, mode):
    name, one, two = runs
    for mine, ref, (_, expected) in zip(two.logits[mode], one.logits[mode], golden_cases(name), strict=True):
        assert (mine - ref).abs().max().item() < 1e-5
        assert (mine - expected).abs().max().item() < 1e-3


def test_two_ranks_greedy_batch_equals_one_rank(runs):
    _, one, two = runs
    assert two.tokens == one.tokens
    for mine, ref in zip(two.logprobs, one.logprobs, strict=True):
        assert max(abs(a - b) for a, b in zip(mine, ref, strict=True)) < 1e-5


def test_kv_cache_is_per_rank(runs):
    """Each rank caches its own KV head, so the same per-rank budget holds at least twice the blocks."""
    _, one, two = runs
    assert (one.kv_heads_per_rank, two.kv_heads_per_rank) == (2, 1)
    assert two.num_global_blocks >= 2 * one.num_global_blocks


def test_four_ranks_replicate_kv_heads():
    """4 query heads and 2 KV heads over 4 ranks: each KV head is held by two ranks; vocab 97 pads the last shard."""
    name = "tiny-w5"
    ids = golden_cases(name)[1][0].tolist()
    one = PagedHarness(load_model(GOLDEN / name, dtype="float32"))
    expected = {chunk: one.run_chunked(ids, chunk) for chunk in (10_000, 3)}
    del one
    llm = LLM(GOLDEN / name, tensor_parallel_size=4, **ENGINE_ARGS)
    harness = harness_of(llm.engine)
    try:
        assert llm.engine.cache.global_state.shape[-2] == 1
        for chunk, ref in expected.items():
            assert (harness.run_chunked(ids, chunk) - ref).abs().max().item() < 1e-5
    except BaseException:
        llm.engine.shutdown()
        raise
    procs = llm.engine.tp.procs
    del llm, harness
    gc.collect()  # a collected engine stops its workers
    assert all(proc.wait(timeout=30) == 0 for proc in procs)
    assert not dist.is_initialized()


def test_indivisible_heads_are_refused_before_any_process(monkeypatch):
    def no_process(*args, **kwargs):
        raise AssertionError("a worker process was started")

    monkeypatch.setattr(tensor_parallel.subprocess, "Popen", no_process)
    with pytest.raises(ValueError, match="num_attention_heads 4 is not divisible by tensor parallel size 3"):
        LLM(GOLDEN / "tiny-w5", tensor_parallel_size=3, **ENGINE_ARGS)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    with pytest.raises(ValueError, match="tensor_parallel_size 2 does not match WORLD_SIZE 4"):
        LLM(GOLDEN / "tiny-w5", tensor_parallel_size=2, **ENGINE_ARGS)
    assert not dist.is_initialized()


def test_killed_worker_stops_the_engine_with_a_clear_error():
    llm = LLM(GOLDEN / "tiny-w5", tensor_parallel_size=2, **ENGINE_ARGS)
    worker = llm.engine.tp.procs[0]
    threading.Timer(1.0, worker.kill).start()
    long = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    start = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match="worker rank 1 was killed by SIGKILL"):
            llm.generate(PROMPTS, long)
        assert time.monotonic() - start < 30
        assert not dist.is_initialized()
        with pytest.raises(RuntimeError, match="worker rank 1 was killed by SIGKILL"):
            llm.generate(PROMPTS[:1], long)
    finally:
        llm.engine.shutdown()


def test_torchrun_ranks_generate_like_one_rank(capsys):
    """`torchrun --nproc-per-node 2 loopcoder generate --tensor-parallel-size 2`: rank 0 prints, rank 1 serves."""
    from loopcoder.cli import main

    args = ["generate", "--model", str(GOLDEN / "tiny-tied-w64"), "--prompt-ids", "5,9,33,7,81,2,40", "--max-tokens", "10",
            "--dtype", "float32", "--ids"]
    assert main(args) == 0
    expected = capsys.readouterr().out.strip()
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "loopcoder.cli"]
    proc = subprocess.run([*launcher, *args, "--tensor-parallel-size", "2"], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == expected


MEMORY_CONFIG = {
    "architectures": ["IQuestLoopCoderForCausalLM"], "model_type": "iquestloopcoder", "vocab_size": 4000,
    "hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8, "num_attention_heads": 8,
    "num_key_value_heads": 4, "head_dim": 64, "loop_num": 2, "loop_window_size": 8, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "max_position_embeddings": 256, "tie_word_embeddings": False, "torch_dtype": "float32",
    "eos_token_id": 2,
}
MEASURE = textwrap.dedent("""
    import ctypes, json, sys
    from loopcoder import LLM

    def rss():
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS:")) * 1024

    args = {"num_kv_blocks": 4, "max_num_seqs": 1, "max_num_batched_tokens": 16}
    LLM(sys.argv[2], **args)  # a tiny one-rank engine first: what every engine loads besides its weights
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = rss()
    llm = LLM(sys.argv[1], tensor_parallel_size=2, **args)
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # as the workers do after loading
    cache = llm.engine.cache
    rank0 = {
        "param_bytes": sum(p.numel() * p.element_size() for p in llm.engine.model.parameters()),
        "rss_growth_bytes": rss() - before - cache.global_state.nbytes - cache.local_state.nbytes,
    }
    print(json.dumps({0: rank0, **llm.engine.tp.reports}))
""")


def test_each_rank_holds_half_the_weights(tmp_path: Path):
    """Per rank: parameter bytes, and resident memory grown by loading (rank 0 in a fresh process, less its KV cache)."""
    (tmp_path / "config.json").write_text(json.dumps(MEMORY_CONFIG))
    with torch.device("meta"):
        specs = LoopCoderForCausalLM(LoopCoderConfig.from_dict(MEMORY_CONFIG)).weight_specs()
    generator = torch.Generator().manual_seed(0)
    tensors = {s.name: torch.randn(s.shape, generator=generator) * 0.02 for s in specs}
    save_file(tensors, tmp_path / "model.safetensors")
    full = sum(t.numel() * t.element_size() for t in tensors.values())
    del tensors
    command = [sys.executable, "-c", MEASURE, str(tmp_path), str(GOLDEN / "tiny-w5")]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"\nfull model {full / 2**20:.1f} MiB; per rank (MiB):", {
        rank: {k: round(v / 2**20, 1) for k, v in figures.items()} for rank, figures in ranks.items()
    })
    overhead = 12 * 2**20  # a one-rank load grows by its parameters plus ~6 MiB (allocator, lazily built state)
    for figures in ranks.values():
        assert abs(figures["param_bytes"] / full - 0.5) < 0.01
        assert 0.45 * full < figures["rss_growth_bytes"] < figures["param_bytes"] + overhead
    assert ranks["1"]["peak_growth_bytes"] < 0.5 * full + overhead  # one full tensor at most is read beyond the slices
