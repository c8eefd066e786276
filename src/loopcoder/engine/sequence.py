"""One sequence's state: its tokens, how many are computed, its blocks, and how it ended."""

from __future__ import annotations

import enum
import itertools

import torch

from loopcoder.outputs import PositionLogprobs
from loopcoder.sampling import SamplingParams
from loopcoder.tokenizer import IncrementalDetokenizer

_seq_ids = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """A prompt plus what has been generated from it (one of a request's `n` samples)."""

    def __init__(self, request_id: str, index: int, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.seq_id = next(_seq_ids)
        self.request_id = request_id
        self.index = index
        self.params = params
        self.prompt_len = len(prompt_token_ids)
        self.token_ids = list(prompt_token_ids)
        self.num_computed = 0
        self.num_cached = 0
        self.global_blocks: list[int] = []
        self.local_blocks: list[int | None] = []
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.text = ""
        self.detokenizer: IncrementalDetokenizer | None = None
        self.logprobs: list[PositionLogprobs] | None = [] if params.logprobs is not None else None
        self.prompt_logprobs: list[PositionLogprobs | None] | None = None
        if params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]
        self.cumulative_logprob = 0.0
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed(params.seed + 1_000_003 * index)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def __repr__(self) -> str:
        return f"Sequence({self.request_id}#{self.index}, {self.num_computed}/{self.num_tokens}, {self.status.value})"
