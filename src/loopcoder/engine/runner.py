"""Turns a scheduled batch into model inputs over the paged caches and runs the model.

A step takes any number of new tokens per sequence: sequences with one new token (decodes)
attend as one batch, the others (prompt chunks, drafted tokens) one sequence each. Slot
arithmetic is done in numpy, once per step, and shared by every layer and loop.
"""

from __future__ import annotations

import numpy as np
import torch

from loopcoder import kernels
from loopcoder.engine.sequence import Sequence
from loopcoder.model.attention import AttentionMetadata, DecodeGroup, PagedAttention, PrefillSpan, positional_mask
from loopcoder.model.kv_cache import KVCache
from loopcoder.model.layers import pack_weights
from loopcoder.model.loopcoder import LoopCoderForCausalLM

# Queries per tile of the local window band in prefill (at least the window).
BAND_TILE = 64


class ModelRunner:
    def __init__(self, model: LoopCoderForCausalLM, cache: KVCache) -> None:
        self.model = model
        self.cache = cache
        self.block_size = cache.block_size
        self.window = model.config.loop_window_size
        self.device = cache.global_state.device
        self.tile = max(BAND_TILE, self.window)
        if kernels.native(cache.global_state) is not None:  # builds or loads the CPU kernels now, not in the first step
            pack_weights(model)

    def _slots(self, table: list[int | None], first: int, last: int) -> np.ndarray:
        """Flat cache slots of positions [first, last) of a sequence with this block table."""
        bs = self.block_size
        blocks = np.array([-1 if b is None else b for b in table[first // bs : -(-last // bs)]], dtype=np.int64)
        slots = (blocks[:, None] * bs + np.arange(bs)).ravel()
        return slots[first % bs : first % bs + last - first]

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(self.device)

    def prepare(self, seqs: list[Sequence], num_new: list[int]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        ids, positions, write_global, write_local = [], [], [], []
        decodes, prefills, row = [], [], 0
        bs = self.block_size
        for seq, n in zip(seqs, num_new, strict=True):
            start, end = seq.num_computed, seq.num_computed + n
            ids.extend(seq.token_ids[start:end])
            if n == 1:  # the common case, in plain integers
                block, offset = divmod(start, bs)
                positions.append((start,))
                write_global.append((seq.global_blocks[block] * bs + offset,))
                write_local.append((seq.local_blocks[block] * bs + offset,))
                decodes.append((row, seq))
            else:
                positions.append(np.arange(start, end))
                write_global.append(self._slots(seq.global_blocks, start, end))
                write_local.append(self._slots(seq.local_blocks, start, end))
                prefills.append(self._prefill_span(seq, row, start, end))
            row += n
        meta = AttentionMetadata(
            write_global=self._tensor(np.concatenate(write_global)),
            write_local=self._tensor(np.concatenate(write_local)),
            decode=self._decode_group(decodes, only=not prefills) if decodes else None,
            prefills=prefills,
        )
        return torch.tensor(ids, device=self.device), self._tensor(np.concatenate(positions)), meta

    def _prefill_span(self, seq: Sequence, row: int, start: int, end: int) -> PrefillSpan:
        q_pos = torch.arange(start, end)
        global_mask = None if start == 0 else positional_mask(q_pos, torch.arange(end), None).to(self.device)
        local_first = max(start - self.window + 1, 0)
        held = self._slots(seq.local_blocks, local_first, end)
        slots, mask = self._band(held, local_first, start, end)
        return PrefillSpan(
            first=row,
            last=row + end - start,
            global_slots=self._tensor(self._slots(seq.global_blocks, 0, end)),
            global_mask=global_mask,
            band_slots=self._tensor(slots),
            band_mask=torch.from_numpy(mask).to(self.device),
            local_slots=self._tensor(held),
            local_first=local_first,
            window=self.window,
        )

    def _band(self, held: np.ndarray, first: int, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """Local keys per query tile, from `held` (the slots of positions first..end-1): slots
        [tiles, tile + W - 1] and mask [tiles, 1, tile, tile + W - 1].

        Padding queries past `end` see every key (their outputs are dropped); keys outside the
        sequence's held local blocks point at a held slot and are masked out.
        """
        w, tile = self.window, self.tile
        tiles = -(-(end - start) // tile)
        q_pos = start + np.arange(tiles * tile).reshape(tiles, tile)
        k_pos = q_pos[:, :1] - w + 1 + np.arange(tile + w - 1)
        slots = held[np.clip(k_pos, first, end - 1) - first]
        q, k = q_pos[:, :, None], k_pos[:, None, :]
        mask = ((k <= q) & (k > q - w) & (k >= 0)) | (q >= end)
        return slots, mask[:, None]

    def _decode_group(self, rows: list[tuple[int, Sequence]], only: bool) -> DecodeGroup:
        seqs = [seq for _, seq in rows]
        width = max(len(seq.global_blocks) for seq in seqs)
        global_table = np.zeros((len(seqs), width), dtype=np.int64)
        local_table = np.zeros((len(seqs), width), dtype=np.int64)
        for i, seq in enumerate(seqs):
            global_table[i, : len(seq.global_blocks)] = seq.global_blocks
            local_table[i, : len(seq.local_blocks)] = [0 if b is None else b for b in seq.local_blocks]
        positions = [seq.num_computed for seq in seqs]
        return DecodeGroup(
            tokens=torch.tensor([r for r, _ in rows], device=self.device),
            positions=torch.tensor(positions, device=self.device),
            global_table=self._tensor(global_table),
            local_table=self._tensor(local_table),
            block_size=self.block_size,
            window=self.window,
            longest=max(positions) + 1,
            only=only,
        )

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], num_new: list[int], logit_rows: torch.Tensor) -> torch.Tensor:
        """Float32 logits at the flat batch rows `logit_rows` after running the step's tokens."""
        ids, positions, meta = self.prepare(seqs, num_new)
        hidden = self.model(ids, positions, PagedAttention(self.cache, meta))
        return self.model.compute_logits(hidden[logit_rows.to(self.device)]).cpu()
