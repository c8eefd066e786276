"""Measurements of the whole engine on one checkpoint: load, decode, prefill, time to first token, memory.

Everything goes through `LLMEngine`, as a user's requests would: decode rates time only steps
in which every running sequence brings exactly one new token; prefill times a whole prompt run
in one step, to its first token. Prefix caching is off so that repeats recompute. Each function
measures once: run.py interleaves the repeats with the ceilings they are compared to.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from loopcoder.engine.engine import LLMEngine
from loopcoder.engine.sequence import Sequence
from loopcoder.loader import checkpoint_files, load_model
from loopcoder.model.kv_cache import bytes_per_block
from loopcoder.sampling import SamplingParams


def reset_peak_rss() -> None:
    """Restart the kernel's peak-RSS counter (Linux), so that `peak_rss` covers what follows."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def rss() -> int:
    """Resident memory of this process now, in bytes (0 where unknown)."""
    return _status_kib("VmRSS:") * 1024


def peak_rss() -> int:
    """Peak resident memory of this process since `reset_peak_rss`, in bytes (0 where unknown)."""
    return _status_kib("VmHWM:") * 1024


def _status_kib(field: str) -> int:
    try:
        return next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field))
    except (OSError, StopIteration):
        return 0


def read_seconds(path: Path) -> tuple[float, int]:
    """(seconds, bytes) to read every checkpoint file into newly allocated memory: the least a load must do."""
    files = sorted({f.path for f in checkpoint_files(path).values()})
    start = time.perf_counter()
    for file in files:
        buffer = torch.empty(os.path.getsize(file), dtype=torch.uint8)
        with open(file, "rb", buffering=0) as f:
            f.readinto(memoryview(buffer.numpy()))
        del buffer
    return time.perf_counter() - start, sum(os.path.getsize(f) for f in files)


def load_seconds(path: Path, quantization: str | None = None) -> float:
    """Seconds of `load_model` in bf16 (quantizing at load if asked)."""
    start = time.perf_counter()
    model = load_model(path, "bfloat16", quantization=quantization)
    seconds = time.perf_counter() - start
    del model
    return seconds


def start_engine(path: Path, quantization: str | None, kv_cache_memory: int = 512 << 20) -> tuple[LLMEngine, float]:
    """(engine, seconds to start it: load, quantize, allocate the cache, lay weights out for the CPU kernel)."""
    start = time.perf_counter()
    engine = LLMEngine(
        str(path), dtype="bfloat16", quantization=quantization, max_num_seqs=32,
        max_num_batched_tokens=2048, enable_prefix_caching=False, kv_cache_memory=kv_cache_memory,
    )
    return engine, time.perf_counter() - start


def prompt(engine: LLMEngine, length: int, seed: int) -> dict:
    vocab = engine.model.config.vocab_size
    return {"prompt_token_ids": [(seed * 7919 + j * 104729) % (vocab - 1) + 1 for j in range(length)]}


def decode_tokens_per_s(engine: LLMEngine, batch: int, steps: int, seed: int = 0, prompt_len: int = 64) -> float:
    """Decode tokens/s of a fresh batch of `batch` sequences over `steps` timed steps (after their prefill)."""
    params = SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True)
    for i in range(batch):
        engine.add_request(prompt(engine, prompt_len, 1000 * seed + i), params)
    while any(len(s.output_ids) == 0 for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    start = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    return batch * steps / (time.perf_counter() - start)


def prefill(engine: LLMEngine, length: int, seed: int = 0) -> tuple[float, dict]:
    """(seconds to the first token of one `length`-token prompt run in one step, the KV figures it leaves)."""
    start = time.perf_counter()
    engine.add_request(prompt(engine, length, 77 + seed), SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    while not any(seq.output_ids for seq in engine.scheduler.running):
        engine.step()
    seconds = time.perf_counter() - start
    kv = held_kv(engine, engine.scheduler.running[0])
    while engine.has_unfinished():
        engine.step()
    return seconds, kv


def held_kv(engine: LLMEngine, seq: Sequence) -> dict:
    """KV bytes a running sequence holds in the engine, next to storing every loop's keys/values for every token."""
    mc, bs = engine.model.config, engine.config.block_size
    dtype = engine.cache.global_state.dtype
    global_bytes = len(seq.global_blocks) * bytes_per_block(mc, bs, dtype, 1)
    local_bytes = sum(b is not None for b in seq.local_blocks) * bytes_per_block(mc, bs, dtype, mc.loop_num - 1)
    per_token = bytes_per_block(mc, 1, dtype, 1)
    return {
        "tokens": seq.num_computed,
        "kv_bytes_per_token": per_token,
        "kv_bytes_per_sequence": global_bytes + local_bytes,
        "kv_local_bytes_per_sequence": local_bytes,
        "kv_bytes_every_loop": mc.loop_num * per_token * seq.num_computed,
    }


def model_bytes(engine: LLMEngine) -> int:
    return sum(t.numel() * t.element_size() for t in [*engine.model.parameters(), *engine.model.buffers()])


def cache_bytes(engine: LLMEngine) -> int:
    return sum(t.numel() * t.element_size() for t in (engine.cache.global_state, engine.cache.local_state))
