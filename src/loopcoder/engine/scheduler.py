"""Continuous batching: which sequences run in the next step, and how many tokens each.

Every step has a token budget. Running sequences go first (a decode costs one token, an
unfinished prompt takes what budget is left, so a long prompt is prefilled in chunks and
never stalls the others); then waiting sequences are admitted while budget, sequence slots
and blocks last. When blocks run out, the newest running sequence is preempted: its blocks
are freed and it is recomputed later from its tokens, giving the same results.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from loopcoder.engine.kv_cache import BlockManager
from loopcoder.engine.sequence import Sequence, Status


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_new: list[int]

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        batch = ScheduledBatch([], [])
        for seq in list(self.running):
            if budget == 0:
                break
            if seq not in self.running:
                continue  # preempted while making room for an earlier one
            num_new = min(seq.num_tokens - seq.num_computed, budget)
            while not self.blocks.can_allocate(seq, num_new):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                self.blocks.allocate(seq, num_new)
                batch.seqs.append(seq)
                batch.num_new.append(num_new)
                budget -= num_new
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.num_computed == 0:
                self.blocks.match_prefix(seq)
            num_new = min(seq.num_tokens - seq.num_computed, budget)
            if not self.blocks.can_allocate(seq, num_new):
                if seq.num_cached and not self.running:
                    self.blocks.free(seq)
                    seq.num_computed = seq.num_cached = 0
                break
            self.waiting.popleft()
            self.blocks.allocate(seq, num_new)
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new.append(num_new)
            budget -= num_new
        return batch

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.num_computed = seq.num_cached = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence wherever it is and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status = Status.FINISHED
