"""Global and window attention over LoopCoder's two kinds of key/value state.

Loop 0 attends causally over its own keys/values, which are kept for every token (the
global state). Each later loop attends twice: globally over loop 0's keys/values of the same
layer, and locally over its own keys/values of the last W positions, i - W < j <= i.

Two backends hold that state. `DenseAttention` runs whole sequences with no cache (training
and reference). `PagedAttention` reads and writes the engine's block-paged caches for a
flattened batch in which each sequence brings any number of new tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loopcoder.model.kv_cache import KVCache


def positional_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """True where a query at q_pos may see a key at k_pos: causal, and within the window if given."""
    seen = k_pos.unsqueeze(-2) <= q_pos.unsqueeze(-1)
    if window is not None:
        seen &= k_pos.unsqueeze(-2) > q_pos.unsqueeze(-1) - window
    return seen


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """q: [B, Tq, H, D], k/v: [B, Tk, KVH, D], mask broadcastable to [B, 1, Tq, Tk] (None: causal)."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=mask, is_causal=mask is None, enable_gqa=True,
    )
    return out.transpose(1, 2)


class DenseAttention:
    """Full sequences [B, T] at positions 0..T-1, no cache: the training and reference path."""

    def __init__(self, seq_len: int, window: int, device: torch.device) -> None:
        pos = torch.arange(seq_len, device=device)
        self.window_mask = positional_mask(pos, pos, window)
        self.loop0: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def first_loop(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.loop0[layer] = (k, v)
        return attend(q, k, v, None)

    def later_loop(self, layer: int, loop: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k0, v0 = self.loop0[layer]
        return attend(q, k0, v0, None), attend(q, k, v, self.window_mask)


@dataclass
class DecodeGroup:
    """Sequences bringing one new token each, attended as one padded batch.

    `global_slots`/`local_slots` [B, L] index the flat cache (padding points at slot 0 and is
    masked out by the matching `*_mask` [B, 1, 1, L]).
    """

    tokens: torch.Tensor
    global_slots: torch.Tensor
    global_mask: torch.Tensor
    local_slots: torch.Tensor
    local_mask: torch.Tensor


@dataclass
class PrefillSpan:
    """One sequence bringing several new tokens: flat batch rows [first, last)."""

    first: int
    last: int
    global_slots: torch.Tensor
    global_mask: torch.Tensor | None
    local_slots: torch.Tensor
    local_mask: torch.Tensor


@dataclass
class AttentionMetadata:
    """Where a step's tokens write their keys/values and what each attends to."""

    write_global: torch.Tensor
    write_local: torch.Tensor
    decode: DecodeGroup | None
    prefills: list[PrefillSpan]


class PagedAttention:
    """A flattened batch [N] over the engine's paged caches (see `AttentionMetadata`)."""

    def __init__(self, cache: KVCache, meta: AttentionMetadata) -> None:
        self.cache = cache
        self.meta = meta

    def first_loop(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        keys, values = self.cache.global_kv(layer)
        keys.index_copy_(0, self.meta.write_global, k)
        values.index_copy_(0, self.meta.write_global, v)
        return self._run(q, keys, values, local=False)

    def later_loop(self, layer: int, loop: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.cache.local_kv(loop, layer)
        keys.index_copy_(0, self.meta.write_local, k)
        values.index_copy_(0, self.meta.write_local, v)
        k0, v0 = self.cache.global_kv(layer)
        return self._run(q, k0, v0, local=False), self._run(q, keys, values, local=True)

    def _run(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, local: bool) -> torch.Tensor:
        out = torch.empty_like(q)
        group = self.meta.decode
        if group is not None:
            slots, mask = (group.local_slots, group.local_mask) if local else (group.global_slots, group.global_mask)
            out[group.tokens] = attend(q[group.tokens].unsqueeze(1), keys[slots], values[slots], mask).squeeze(1)
        for span in self.meta.prefills:
            slots, mask = (span.local_slots, span.local_mask) if local else (span.global_slots, span.global_mask)
            rows = slice(span.first, span.last)
            out[rows] = attend(q[rows].unsqueeze(0), keys[slots].unsqueeze(0), values[slots].unsqueeze(0), mask)[0]
        return out
