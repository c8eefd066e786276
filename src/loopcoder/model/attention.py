"""Global and window attention over LoopCoder's two kinds of key/value state.

Loop 0 attends causally over its own keys/values, which are kept for every token (the
global state). Each later loop attends twice: globally over loop 0's keys/values of the same
layer, and locally over its own keys/values of the last W positions, i - W < j <= i.

Two backends hold that state. `DenseAttention` runs whole sequences with no cache (training
and reference). `PagedAttention` reads and writes the engine's block-paged caches for a
flattened batch in which each sequence brings any number of new tokens. Both offer
`later_loop` (the two branches) and `gated_later_loop` (the gate's mix of them, which a CPU
decode step computes in one native kernel). On a CPU with AVX512-BF16 a prompt's attention, both
branches, also runs natively (`prefill_attention`, 2.5x PyTorch's flash attention there).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from types import ModuleType
from typing import Protocol

import torch
import torch.nn.functional as F

from loopcoder import kernels
from loopcoder.model.kv_cache import KVCache
from loopcoder.parallel import tp_size


class Gate(Protocol):
    weight: torch.Tensor
    bias: torch.Tensor

    def mix(self, q: torch.Tensor, global_out: torch.Tensor, local_out: torch.Tensor) -> torch.Tensor: ...


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

    def gated_later_loop(self, layer: int, loop: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: Gate) -> torch.Tensor:
        return gate.mix(q, *self.later_loop(layer, loop, q, k, v))


@dataclass
class DecodeGroup:
    """Sequences bringing one new token each (flat batch rows `tokens`, at `positions` [B]).

    `global_table`/`local_table` [B, blocks] are their block tables (unused entries 0). The
    native kernel reads the caches through them; the plain path gathers the slots they give
    into one padded batch per branch, with masks. `only` says the step holds nothing else.
    """

    tokens: torch.Tensor
    positions: torch.Tensor
    global_table: torch.Tensor
    local_table: torch.Tensor
    block_size: int
    window: int
    longest: int
    only: bool

    @cached_property
    def global_slots(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots [B, longest] of positions 0.. and the mask [B, 1, 1, longest] of those <= each position."""
        pos = torch.arange(self.longest, device=self.positions.device).expand(len(self.positions), -1)
        return self._slots(self.global_table, pos), (pos <= self.positions[:, None])[:, None, None, :]

    @cached_property
    def local_slots(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots [B, W] of the window positions p-W+1..p and the mask of those >= 0."""
        pos = self.positions[:, None] - self.window + 1 + torch.arange(self.window, device=self.positions.device)
        return self._slots(self.local_table, pos.clamp(min=0)), (pos >= 0)[:, None, None, :]

    def _slots(self, table: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return table.gather(1, pos // self.block_size) * self.block_size + pos % self.block_size


@dataclass
class PrefillSpan:
    """One sequence bringing several new tokens: flat batch rows [first, last).

    The local branch runs as a band: queries in tiles of `band_slots.shape[1] - W + 1`, each tile
    attending only to the keys that can reach it (`band_slots` [tiles, keys], `band_mask`
    [tiles, 1, tile, keys]) rather than to a full square of masked keys. The native kernel reads
    the window's keys straight from `local_slots`, the slots of positions `local_first`.. on.
    """

    first: int
    last: int
    global_slots: torch.Tensor
    global_mask: torch.Tensor | None
    band_slots: torch.Tensor
    band_mask: torch.Tensor
    local_slots: torch.Tensor
    local_first: int
    window: int


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

    def native_decode(self, h: torch.Tensor) -> ModuleType | None:
        """The kernels when this step only decodes, on the CPU and one rank: each layer can then run in one
        native call (`decode_layer`, given `decode_layer_args`)."""
        group = self.meta.decode
        if group is None or not group.only or tp_size() > 1 or h.dim() != 2 or self.cache.global_state.shape[-1] % 8:
            return None
        return kernels.native(h)

    def decode_layer_args(self, layer: int, loop: int, gate: Gate) -> tuple:
        """The attention arguments of the kernels' `decode_layer` for one layer and loop."""
        group = self.meta.decode
        keys, values = self.cache.global_kv(layer)
        head = (group.tokens, group.positions, keys, values, group.global_table)
        if loop == 0:
            return (*head, None, None, None, group.block_size, 0, None, None)
        local_keys, local_values = self.cache.local_kv(loop, layer)
        return (*head, local_keys, local_values, group.local_table, group.block_size, group.window, gate.weight, gate.bias)

    def first_loop(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        keys, values = self.cache.global_kv(layer)
        group = self.meta.decode
        ops = _native(q) if group is not None and group.only else None
        if ops is not None:  # a decode step: one native call writes the new keys/values and attends
            return ops.decode_attention(
                q, group.tokens, group.positions, keys, values, group.global_table, group.block_size, 0, k.contiguous(), v.contiguous()
            )
        self._write((keys, values), self.meta.write_global, k, v)
        return self._each_part(q, lambda group: self._decode(q, group, layer, 0), lambda qs, span: self._global(qs, span, layer))

    def later_loop(self, layer: int, loop: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._write(self.cache.local_kv(loop, layer), self.meta.write_local, k, v)
        glob = self._each_part(q, lambda group: self._decode(q, group, layer, 0), lambda qs, span: self._global(qs, span, layer))
        local = self._each_part(q, lambda group: self._decode(q, group, layer, loop), lambda qs, span: self._band(qs, span, layer, loop))
        return glob, local

    def gated_later_loop(self, layer: int, loop: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: Gate) -> torch.Tensor:
        group = self.meta.decode
        ops = _native(q) if group is not None and group.only else None
        if ops is not None:  # a decode step: both branches and the mix in one native call
            k0, v0 = self.cache.global_kv(layer)
            k1, v1 = self.cache.local_kv(loop, layer)
            return ops.gated_decode_attention(
                q, group.tokens, group.positions, k0, v0, group.global_table, k1, v1, group.local_table,
                group.block_size, group.window, gate.weight, gate.bias, k.contiguous(), v.contiguous(),
            )
        glob, local = self.later_loop(layer, loop, q, k, v)
        ops = kernels.native(q)
        if ops is None or gate.weight.dtype != q.dtype:
            return gate.mix(q, glob, local)
        return ops.gate_mix(q.contiguous(), glob.contiguous(), local.contiguous(), gate.weight, gate.bias)  # the mix in one pass

    @staticmethod
    def _write(cache: tuple[torch.Tensor, torch.Tensor], slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        cache[0].index_copy_(0, slots, k)
        cache[1].index_copy_(0, slots, v)

    def _each_part(self, q: torch.Tensor, decode, prefill) -> torch.Tensor:
        """Output [N, H, D] from `decode(group)` for the decode rows and `prefill(q rows, span)` for each span."""
        group = self.meta.decode
        if group is not None and group.only:
            return decode(group)
        spans = self.meta.prefills
        if group is None and len(spans) == 1 and spans[0].first == 0 and spans[0].last == q.shape[0]:
            return prefill(q, spans[0])  # one prompt alone: its output is the whole output
        out = torch.empty_like(q)
        if group is not None:
            out[group.tokens] = decode(group)
        for span in self.meta.prefills:
            rows = slice(span.first, span.last)
            out[rows] = prefill(q[rows], span)
        return out

    def _decode(self, q: torch.Tensor, group: DecodeGroup, layer: int, loop: int) -> torch.Tensor:
        """Loop 0's causal attention (loop 0) or a later loop's window (loop > 0) for the decode rows [B, H, D]."""
        keys, values = self.cache.local_kv(loop, layer) if loop else self.cache.global_kv(layer)
        window = group.window if loop else 0
        ops = _native(q)
        if ops is not None:
            table = group.local_table if loop else group.global_table
            return ops.decode_attention(q, group.tokens, group.positions, keys, values, table, group.block_size, window)
        slots, mask = group.local_slots if loop else group.global_slots
        return attend(q[group.tokens].unsqueeze(1), keys[slots], values[slots], mask).squeeze(1)

    def _global(self, q: torch.Tensor, span: PrefillSpan, layer: int) -> torch.Tensor:
        keys, values = self.cache.global_kv(layer)
        slots = span.global_slots
        ops = _native_prefill(q)
        if ops is not None:
            return ops.prefill_attention(q.contiguous(), keys, values, slots, len(slots) - q.shape[0])
        return attend(q.unsqueeze(0), keys[slots].unsqueeze(0), values[slots].unsqueeze(0), span.global_mask)[0]

    def _band(self, q: torch.Tensor, span: PrefillSpan, layer: int, loop: int) -> torch.Tensor:
        keys, values = self.cache.local_kv(loop, layer)
        ops = _native_prefill(q)
        if ops is not None:
            first = span.local_first + len(span.local_slots) - q.shape[0]
            return ops.prefill_attention(q.contiguous(), keys, values, span.local_slots, first, span.window, span.local_first)
        tiles, tile = span.band_mask.shape[0], span.band_mask.shape[2]
        padded = F.pad(q, (0, 0, 0, 0, 0, tiles * tile - q.shape[0])).view(tiles, tile, *q.shape[1:])
        out = attend(padded, keys[span.band_slots], values[span.band_slots], span.band_mask)
        return out.flatten(0, 1)[: q.shape[0]]


def _native(q: torch.Tensor):
    """The kernels when they can run decode attention on q [N, H, D] (D a multiple of 8), else None."""
    return kernels.native(q) if q.shape[-1] % 8 == 0 else None


def _native_prefill(q: torch.Tensor):
    """The kernels when they can run a prompt's attention on q [T, H, D]: an AVX-512 build, bf16, D 64/128/256."""
    ops = kernels.native(q)
    return ops if ops is not None and ops.wide and q.dtype == torch.bfloat16 and q.shape[-1] in (64, 128, 256) else None
