"""Tensor parallelism: the engine's process is rank 0 and drives N-1 worker ranks over torch.distributed.

Every rank builds the model sharded by construction (see `loopcoder.parallel`), loads only its
slices, and keeps a KV cache for its own heads, with the block counts rank 0 decides. Rank 0
schedules and samples; for each step it sends the other ranks what `ModelRunner.prepare` needs
of each sequence (its new tokens and block tables), then every rank runs the same forward, the
model's collectives keeping them in lock-step.

Launch: alone, the engine starts ranks 1..N-1 itself as fresh interpreters running `main` (the
user's `__main__` is never re-imported, unlike multiprocessing's spawn) that meet it on a local
TCPStore. Under `torchrun` (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set, on one machine or
several) every process is one rank: rank 0 runs the engine, and on the other ranks the engine's
constructor serves as a worker until rank 0 shuts down, then exits the process.

Control messages go through the rendezvous store as JSON (never pickles), not through collectives,
so an idle engine never trips the collectives' timeout. A dead or failed worker is noticed before
each step (its process has exited) or by the collective it left (gloo fails at once when a peer's
socket closes; NCCL's watchdog after the timeout), and the engine stops with a RuntimeError that
names the rank.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import signal
import subprocess
import sys
import time
import traceback
import weakref
from contextlib import suppress
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from loopcoder.config import LoopCoderConfig
from loopcoder.engine.runner import ModelRunner
from loopcoder.engine.sequence import Sequence
from loopcoder.loader import load_model
from loopcoder.model.kv_cache import KVCache
from loopcoder.model.loopcoder import LoopCoderForCausalLM, check_tensor_parallel

COLLECTIVE_TIMEOUT = timedelta(seconds=60)
FOREVER = timedelta(days=3650)  # how long an idle worker waits for rank 0's next message
PREFIX = "loopcoder/"
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def start_tensor_parallel(path: Path, device: torch.device, size: int, **load_args: str | torch.dtype | None) -> TensorParallel | None:
    """Join or start `size` ranks with this process as rank 0; None when `size` is 1.

    Every worker rank calls `load_model(path, **load_args)` as rank 0 does. The model's heads are
    checked first, so a size they cannot be split over is refused before any process or process
    group exists.
    """
    if size < 1:
        raise ValueError(f"tensor_parallel_size must be at least 1, got {size}")
    if size == 1:
        return None
    check_tensor_parallel(LoopCoderConfig.from_pretrained(path), size)
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialized in this process: one tensor-parallel engine per process")
    procs: list[subprocess.Popen] = []
    if all(v in os.environ for v in TORCHRUN_VARS):
        if int(os.environ["WORLD_SIZE"]) != size:
            raise ValueError(f"tensor_parallel_size {size} does not match WORLD_SIZE {os.environ['WORLD_SIZE']} from torchrun")
        store, rank, _ = next(dist.rendezvous("env://", timeout=COLLECTIVE_TIMEOUT))
        if rank != 0:
            serve_rank(store, rank, size, int(os.environ.get("LOCAL_RANK", rank)))
            raise SystemExit(0)
    else:
        store = dist.TCPStore("127.0.0.1", 0, None, is_master=True, wait_for_workers=False, timeout=COLLECTIVE_TIMEOUT)
        procs = [_spawn(rank, size, store.port) for rank in range(1, size)]
    tp = TensorParallel(store, size, procs)
    try:
        load_args = {k: str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v for k, v in load_args.items()}
        tp.start({"path": str(path), "device": str(device), "load_args": load_args}, device)
    except BaseException:
        tp.shutdown()
        raise
    return tp


def _spawn(rank: int, size: int, port: int) -> subprocess.Popen:
    """Start one local worker rank with the environment torchrun would give it."""
    env = {k: v for k, v in os.environ.items() if k != "TORCHELASTIC_USE_AGENT_STORE"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)  # this process's import path, as multiprocessing's spawn passes it
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(size), LOCAL_WORLD_SIZE=str(size),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    env.setdefault("OMP_NUM_THREADS", str(max(torch.get_num_threads() // size, 1)))  # CPU ranks share the cores
    # Its own session: Ctrl-C reaches rank 0 alone, which then stops the workers.
    entry = "from loopcoder.engine.tensor_parallel import main; main()"
    return subprocess.Popen([sys.executable, "-c", entry], env=env, start_new_session=True)


def rank_device(device: torch.device, local_rank: int) -> torch.device:
    """A rank's device: the CPU, or the GPU `local_rank` places after the one rank 0 was given."""
    if device.type == "cpu":
        return device
    return torch.device(device.type, (device.index or 0) + local_rank)


def _init_group(store: dist.Store, rank: int, size: int, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=COLLECTIVE_TIMEOUT)


class TensorParallel:
    """Rank 0's side of the other ranks: start-up handshake, one message per step, failures, shutdown."""

    def __init__(self, store: dist.Store, size: int, procs: list[subprocess.Popen]) -> None:
        self.store = store
        self.control = dist.PrefixStore(PREFIX, store)
        self.size = size
        self.procs = procs
        self.reports: dict[int, dict[str, float]] = {}  # each worker's weight memory (see serve_rank)
        self.failed: RuntimeError | None = None
        self._messages = itertools.count()
        self._finalizer = weakref.finalize(self, _close, self.control, procs, self._messages)

    def start(self, plan: dict, device: torch.device) -> None:
        """Tell the workers what to load, wait until each is up, then form the process group."""
        self.control.set("plan", json.dumps(plan))
        self._wait("hello")
        _init_group(self.store, 0, self.size, rank_device(device, 0))

    def runner(self, model: LoopCoderForCausalLM, cache: KVCache) -> TensorParallelRunner:
        """Give the workers rank 0's cache block counts and wait until they have loaded and allocated."""
        self._publish([cache.num_global_blocks, cache.num_local_blocks, cache.block_size])
        self.reports = {rank: json.loads(value) for rank, value in self._wait("ready").items()}
        return TensorParallelRunner(model, cache, self)

    def send(self, seqs: list[Sequence], num_new: list[int], logit_rows: torch.Tensor) -> None:
        """Publish one step for the workers to run."""
        if self.failed is not None:
            raise self.failed
        if (reason := self._dead_process()) is not None:
            raise self.fail(reason)
        seq_parts = [
            [s.num_computed, s.token_ids[s.num_computed : s.num_computed + n], s.global_blocks, s.local_blocks]
            for s, n in zip(seqs, num_new, strict=True)
        ]
        self._publish([seq_parts, list(num_new), logit_rows.tolist()])

    def _publish(self, message: list) -> None:
        """Append to the stream of messages the workers read in order (cache sizes, steps, then null to stop).

        The previous message is deleted: every worker has read it, having finished its step with rank 0.
        """
        index = next(self._messages)
        if index:
            self.control.delete_key(f"message/{index - 1}")
        self.control.set(f"message/{index}", json.dumps(message))

    def fail(self, cause: BaseException | str) -> RuntimeError:
        """Stop every rank; the error names the rank that went down once its reason shows up (5 s at most)."""
        reason, deadline = None, time.monotonic() + 5
        while reason is None and time.monotonic() < deadline and not isinstance(cause, str):
            reason = self._dead_rank()
            time.sleep(0.05)
        self.failed = RuntimeError(f"tensor-parallel engine stopped: {reason or cause}")
        for proc in self.procs:
            proc.kill()
        self.shutdown()
        return self.failed

    def shutdown(self) -> None:
        """Stop the workers and leave the process group (also run when this object is collected, or at exit)."""
        self._finalizer()

    def _wait(self, name: str) -> dict[int, str]:
        """Each worker's `name/<rank>` message, raising as soon as one of them fails instead."""
        keys = [f"{name}/{rank}" for rank in range(1, self.size)]
        while not self.control.check(keys):
            if (reason := self._dead_rank()) is not None:
                raise self.fail(reason)
            time.sleep(0.05)
        return {rank: self.control.get(key).decode() for rank, key in enumerate(keys, 1)}

    def _dead_rank(self) -> str | None:
        for rank in range(1, self.size):
            if self.control.check([f"error/{rank}"]):
                return f"rank {rank} failed: {self.control.get(f'error/{rank}').decode()}"
        return self._dead_process()

    def _dead_process(self) -> str | None:
        for rank, proc in enumerate(self.procs, 1):
            code = proc.poll()
            if code is not None:
                how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
                return f"worker rank {rank} {how}"
        return None


def _close(control: dist.Store, procs: list[subprocess.Popen], messages: itertools.count) -> None:
    with suppress(Exception):
        control.set(f"message/{next(messages)}", "null")
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if dist.is_initialized():
        dist.destroy_process_group()


class TensorParallelRunner(ModelRunner):
    """Rank 0's runner: publishes each step to the other ranks, then runs its own shard with them."""

    def __init__(self, model: LoopCoderForCausalLM, cache: KVCache, tp: TensorParallel) -> None:
        super().__init__(model, cache)
        self.tp = tp

    def run(self, seqs: list[Sequence], num_new: list[int], logit_rows: torch.Tensor) -> torch.Tensor:
        self.tp.send(seqs, num_new, logit_rows)
        try:
            return super().run(seqs, num_new, logit_rows)
        except Exception as e:
            raise self.tp.fail(e) from e


class _NewTokens:
    """A sequence's tokens as sent for one step: only the new ones, indexed by absolute position."""

    def __init__(self, first: int, ids: list[int]) -> None:
        self.first = first
        self.ids = ids

    def __getitem__(self, span: slice) -> list[int]:
        return self.ids[span.start - self.first : span.stop - self.first]


@dataclass
class StepSequence:
    """One sequence as a worker sees it for one step: exactly what `ModelRunner.prepare` reads."""

    num_computed: int
    token_ids: _NewTokens
    global_blocks: list[int]
    local_blocks: list[int | None]


def serve_rank(store: dist.Store, rank: int, size: int, local_rank: int) -> None:
    """A worker rank: load this rank's shard, then run every step rank 0 publishes until it says stop.

    Reports its weight memory with `ready`: parameter bytes, and the growth of resident memory
    (now and at its peak) over the load.
    """
    control = dist.PrefixStore(PREFIX, store)
    store.set_timeout(FOREVER)
    try:
        plan = json.loads(control.get("plan"))
        device = rank_device(torch.device(plan["device"]), local_rank)
        control.set(f"hello/{rank}", "")
        _init_group(store, rank, size, device)
        with suppress(OSError), open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # restart this process's peak resident memory (VmHWM) from here
        rss_before = _status_kib("VmRSS")
        model = load_model(plan["path"], **plan["load_args"]).to(device)
        _release_free_memory()
        report = {
            "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "rss_growth_bytes": (_status_kib("VmRSS") - rss_before) * 1024,
            "peak_growth_bytes": (_status_kib("VmHWM") - rss_before) * 1024,
        }
        messages = (json.loads(control.get(f"message/{index}")) for index in itertools.count())
        if (blocks := next(messages)) is None:
            return
        runner = ModelRunner(model, KVCache(model.config, *blocks, model.dtype, device))
        control.set(f"ready/{rank}", json.dumps(report))
        while (message := next(messages)) is not None:
            seq_parts, num_new, rows = message
            seqs = [StepSequence(first, _NewTokens(first, ids), g, loc) for first, ids, g, loc in seq_parts]
            runner.run(seqs, num_new, torch.tensor(rows, dtype=torch.long))
    except dist.DistNetworkError:
        return  # rank 0's store went away: the engine is gone, so is this rank
    except BaseException as e:
        with suppress(Exception):
            control.set(f"error/{rank}", "".join(traceback.format_exception_only(e)).strip())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _release_free_memory() -> None:
    """Hand the loader's freed read buffers back to the OS (glibc keeps them in its heap otherwise)."""
    with suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _status_kib(field: str) -> int:
    """A memory figure of this process from /proc/self/status, in KiB (0 where there is none)."""
    with suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def main() -> None:
    """One worker rank started by the engine, from the torchrun-style environment `_spawn` gives it."""
    store, rank, size = next(dist.rendezvous("env://", timeout=COLLECTIVE_TIMEOUT))
    serve_rank(store, rank, size, rank)

