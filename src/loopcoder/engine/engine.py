"""The engine: requests in, one scheduled model step at a time, outputs out.

`LLMEngine` owns the model, the caches, the scheduler and the output processing (sampling,
logprobs, detokenization, stop conditions). `LLM` and `AsyncLLM` are thin drivers of it.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from loopcoder.engine.kv_cache import BlockManager
from loopcoder.engine.runner import ModelRunner
from loopcoder.engine.scheduler import ScheduledBatch, Scheduler
from loopcoder.engine.sequence import Sequence
from loopcoder.engine.tensor_parallel import start_tensor_parallel
from loopcoder.loader import load_model, resolve_model_path
from loopcoder.model.kv_cache import KVCache, bytes_per_block
from loopcoder.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestOutput
from loopcoder.sampling import SamplingParams, apply_penalties, sample
from loopcoder.tokenizer import IncrementalDetokenizer, load_tokenizer

Prompt = str | list[int] | dict


@dataclass
class EngineConfig:
    max_model_len: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    kv_cache_memory: int | None = None
    gpu_memory_utilization: float = 0.9
    num_kv_blocks: int | None = None
    enable_prefix_caching: bool = True
    max_rollback: int = 8
    tensor_parallel_size: int = 1
    quantization: str | None = None  # "int8": weight-only int8 with per-channel scales, quantized at load


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    arrival: float
    first_token_time: float | None = None


class LLMEngine:
    def __init__(
        self,
        model: str | os.PathLike | None,
        dtype: str = "auto",
        device: str = "cpu",
        progress: Callable[[int, int], None] | None = None,
        **engine_args,
    ) -> None:
        path = resolve_model_path(model)
        self.config = EngineConfig(**engine_args)
        self.device = torch.device(device)
        self.tp = start_tensor_parallel(
            path, self.device, self.config.tensor_parallel_size, dtype=dtype, quantization=self.config.quantization
        )
        self.model = load_model(path, dtype, progress, quantization=self.config.quantization).to(self.device)
        mc = self.model.config
        self.tokenizer = load_tokenizer(path) if _has_tokenizer(path) else None
        self.max_model_len = min(self.config.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        self.eos_token_ids = set(mc.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)
        self.cache = self._allocate_cache()
        self.runner = ModelRunner(self.model, self.cache) if self.tp is None else self.tp.runner(self.model, self.cache)
        self.blocks = BlockManager(
            self.cache.num_global_blocks, self.cache.num_local_blocks, self.config.block_size,
            mc.loop_window_size, self.config.max_rollback, self.config.enable_prefix_caching,
        )
        self.scheduler = Scheduler(self.blocks, self.config.max_num_seqs, self.config.max_num_batched_tokens)
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self.stats = {"prompt_tokens": 0, "generation_tokens": 0, "steps": 0}

    # -- memory --------------------------------------------------------------------------------

    def _allocate_cache(self) -> KVCache:
        cfg, mc = self.config, self.model.config
        bs = cfg.block_size
        chunk = min(cfg.max_num_batched_tokens, self.max_model_len)
        per_seq = -(-(mc.loop_window_size - 1 + cfg.max_rollback) // bs) + 2
        num_local = cfg.max_num_seqs * per_seq + -(-chunk // bs) + 1
        dtype = self.model.dtype
        global_bytes = bytes_per_block(mc, bs, dtype, 1)
        local_bytes = bytes_per_block(mc, bs, dtype, mc.loop_num - 1)
        if cfg.num_kv_blocks is not None:
            num_global = cfg.num_kv_blocks
        else:
            budget = cfg.kv_cache_memory or self._default_budget()
            enough = cfg.max_num_seqs * -(-self.max_model_len // bs)
            num_global = min((budget - num_local * local_bytes) // global_bytes, enough)
        if num_global < 1:
            raise ValueError(
                f"KV cache budget holds only {num_global} blocks of {bs} tokens; raise kv_cache_memory "
                f"or lower max_model_len ({self.max_model_len}) / max_num_seqs ({cfg.max_num_seqs})"
            )
        return KVCache(mc, int(num_global), num_local, bs, dtype, self.device)

    def _default_budget(self) -> int:
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(free * self.config.gpu_memory_utilization)
        return 1 << 30

    def shutdown(self) -> None:
        """Stop the tensor-parallel worker ranks (nothing to do on one rank)."""
        if self.tp is not None:
            self.tp.shutdown()

    def pool_usage(self) -> dict[str, int | float]:
        """Block pool figures: totals, free blocks, and per-running-request use."""
        g, loc = self.blocks.global_pool, self.blocks.local_pool
        return {
            "global_total": g.num_blocks, "global_free": g.num_free,
            "local_total": loc.num_blocks, "local_free": loc.num_free,
            "block_size": self.config.block_size,
            "usage": 1 - g.num_free / g.num_blocks,
            "prefix_queries": self.blocks.prefix_queries, "prefix_hits": self.blocks.prefix_hits,
            "per_request": {
                s.request_id: len(s.global_blocks) + sum(b is not None for b in s.local_blocks)
                for s in self.scheduler.running
            },
        }

    # -- requests --------------------------------------------------------------------------------

    def tokenize_prompt(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            prompt = prompt["prompt"]
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this checkpoint has no tokenizer: pass prompt_token_ids")
            return prompt, self.tokenizer.encode(prompt, add_special_tokens=True)
        return None, list(prompt)

    def add_request(self, prompt: Prompt, params: SamplingParams, request_id: str | None = None) -> str:
        request_id = str(next(self._ids)) if request_id is None else request_id
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, ids = self.tokenize_prompt(prompt)
        self._check_prompt(ids, params)
        seqs = [Sequence(request_id, i, ids, params) for i in range(params.n)]
        self.requests[request_id] = Request(request_id, text, ids, params, seqs, time.monotonic())
        for seq in seqs:
            if self.tokenizer is not None:
                seq.detokenizer = IncrementalDetokenizer(self.tokenizer, skip_special_tokens=params.skip_special_tokens)
            self.scheduler.add(seq)
        return request_id

    def _check_prompt(self, ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise ValueError("prompt is empty: give at least one token")
        vocab = self.model.config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens, which leaves no room to generate within max_model_len "
                f"{self.max_model_len}"
            )
        needed = -(-(len(ids) + 1) // self.config.block_size)
        if needed > self.blocks.global_pool.num_blocks:
            raise ValueError(f"prompt of {len(ids)} tokens needs {needed} KV blocks; the pool has "
                             f"{self.blocks.global_pool.num_blocks}")
        if params.stop_strings and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this checkpoint has none")
        if params.logit_bias and any(not 0 <= int(t) < vocab for t in params.logit_bias):
            raise ValueError(f"logit_bias has a token id outside the vocabulary [0, {vocab})")
        if any(not 0 <= t < vocab for t in params.stop_token_ids):
            raise ValueError(f"stop_token_ids has a token id outside the vocabulary [0, {vocab})")

    def abort(self, request_id: str) -> None:
        """Stop a request now and free its blocks."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        for seq in request.seqs:
            if not seq.finished:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # -- one step --------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return []
        rows, prompt_rows, sampling = self._logit_rows(batch)
        logits = self.runner.run(batch.seqs, batch.num_new, torch.tensor(rows, dtype=torch.long))
        self.stats["steps"] += 1
        touched: dict[str, None] = {}
        for seq, n in zip(batch.seqs, batch.num_new, strict=True):
            if seq.seq_id in prompt_rows:
                self._prompt_logprobs(seq, n, logits[prompt_rows[seq.seq_id] :])
            self.stats["prompt_tokens"] += max(min(seq.num_computed + n, seq.prompt_len) - seq.num_computed, 0)
            seq.num_computed += n
            self.blocks.after_step(seq)
            touched[seq.request_id] = None
        if sampling:
            self._sample(sampling, logits)
        return [self._output(self.requests[r]) for r in touched if r in self.requests]

    def _logit_rows(self, batch: ScheduledBatch) -> tuple[list[int], dict[int, int], list[tuple[Sequence, int]]]:
        """Flat rows whose logits are needed: a chunk's prompt positions for prompt_logprobs
        (seq id -> index of its first row) and each sequence's last row when it samples."""
        rows, prompt_rows, sampling, start = [], {}, [], 0
        for seq, n in zip(batch.seqs, batch.num_new, strict=True):
            if seq.prompt_logprobs is not None and seq.num_computed < seq.prompt_len:
                prompt_rows[seq.seq_id] = len(rows)
                rows.extend(range(start, start + n))
            if seq.num_computed + n == seq.num_tokens:
                if not rows or rows[-1] != start + n - 1:
                    rows.append(start + n - 1)
                sampling.append((seq, len(rows) - 1))
            start += n
        return rows, prompt_rows, sampling

    def _prompt_logprobs(self, seq: Sequence, n: int, logits: torch.Tensor) -> None:
        """Logprobs of the prompt tokens this chunk's positions predict."""
        for i in range(n):
            target = seq.num_computed + i + 1
            if target >= seq.prompt_len:
                break
            if target < len(seq.prompt_logprobs):
                continue  # recomputed after a preemption
            logprobs = torch.log_softmax(logits[i], -1)
            seq.prompt_logprobs.append(
                _top_logprobs(logprobs, seq.token_ids[target], seq.params.prompt_logprobs, self.tokenizer)
            )

    def _sample(self, sampling: list[tuple[Sequence, int]], logits: torch.Tensor) -> None:
        seqs = [s for s, _ in sampling]
        raw = logits[[r for _, r in sampling]]
        processed = raw.clone()
        for i, seq in enumerate(seqs):
            if len(seq.output_ids) < seq.params.min_tokens:
                banned = set(seq.params.stop_token_ids) | (set() if seq.params.ignore_eos else self.eos_token_ids)
                processed[i, sorted(banned)] = float("-inf")
        params = [s.params for s in seqs]
        if any(p.penalized for p in params):
            processed = apply_penalties(
                processed, params, [s.token_ids[: s.prompt_len] for s in seqs], [s.output_ids for s in seqs]
            )
        tokens = sample(processed, params, [s.generator for s in seqs])
        now = time.monotonic()
        for i, (seq, token) in enumerate(zip(seqs, tokens, strict=True)):
            request = self.requests[seq.request_id]
            request.first_token_time = request.first_token_time or now
            if seq.logprobs is not None:  # the only output that reports cumulative_logprob
                logprobs = torch.log_softmax(raw[i], -1)
                seq.cumulative_logprob += float(logprobs[token])
                seq.logprobs.append(_top_logprobs(logprobs, token, seq.params.logprobs, self.tokenizer))
            seq.token_ids.append(token)
            self.stats["generation_tokens"] += 1
            self._check_stop(seq, token)

    def _check_stop(self, seq: Sequence, token: int) -> None:
        """Finish `seq` if `token` ends it; a stop or eos token's text is left out unless asked for."""
        p = seq.params
        out_len = len(seq.output_ids)
        detok = seq.detokenizer
        reason, stop_reason = None, None
        if out_len >= p.min_tokens:
            if not p.ignore_eos and token in self.eos_token_ids:
                reason = "stop"
            elif token in p.stop_token_ids:
                reason, stop_reason = "stop", token
        if detok is not None:
            if reason is None or p.include_stop_str_in_output:
                seq.text += detok.add(token)
            if reason is None and out_len >= p.min_tokens and p.stop_strings:
                reason, stop_reason = self._match_stop_string(seq)
        if reason is None and (out_len >= (p.max_tokens or self.max_model_len) or seq.num_tokens >= self.max_model_len):
            reason = "length"
        if reason is not None:
            if detok is not None and not isinstance(stop_reason, str):
                seq.text += detok.flush()
            seq.finish_reason, seq.stop_reason = reason, stop_reason
            self.scheduler.finish(seq)

    def _match_stop_string(self, seq: Sequence) -> tuple[str | None, str | None]:
        longest = max(len(s) for s in seq.params.stop_strings)
        tail_start = max(len(seq.text) - longest - 8, 0)
        best = None
        for stop in seq.params.stop_strings:
            at = seq.text.find(stop, tail_start)
            if at != -1 and (best is None or at < best[0]):
                best = (at, stop)
        if best is None:
            return None, None
        at, stop = best
        seq.text = seq.text[: at + len(stop)] if seq.params.include_stop_str_in_output else seq.text[:at]
        return "stop", stop

    def _output(self, request: Request) -> RequestOutput:
        outputs = []
        hold = max((len(s) for s in request.params.stop_strings), default=1) - 1
        for seq in request.seqs:
            text = seq.text if seq.finished or not hold else seq.text[: max(len(seq.text) - hold, 0)]
            outputs.append(
                CompletionOutput(
                    index=seq.index,
                    text=text,
                    token_ids=list(seq.output_ids),
                    cumulative_logprob=seq.cumulative_logprob if seq.logprobs is not None else None,
                    logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                )
            )
        finished = all(seq.finished for seq in request.seqs)
        if finished:
            self.requests.pop(request.request_id, None)
        first = request.seqs[0]
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            prompt_logprobs=list(first.prompt_logprobs) if first.prompt_logprobs is not None else None,
            outputs=outputs,
            finished=finished,
            num_cached_tokens=first.num_cached,
        )


def _top_logprobs(logprobs: torch.Tensor, token: int, k: int, tokenizer) -> PositionLogprobs:
    """The chosen token and the top k, each with its rank (1 = most likely)."""
    def entry(t: int, value: float) -> Logprob:
        rank = int((logprobs > value).sum()) + 1
        decoded = tokenizer.decode([t]) if tokenizer is not None else None
        return Logprob(value, rank, decoded)

    out = {token: entry(token, float(logprobs[token]))}
    if k:
        values, ids = logprobs.topk(k)
        for t, v in zip(ids.tolist(), values.tolist(), strict=True):
            out.setdefault(t, entry(t, v))
    return out


def _has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()
