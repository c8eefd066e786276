"""Turns a scheduled batch into model inputs over the paged caches and runs the model.

A step takes any number of new tokens per sequence: sequences with one new token (decodes)
attend as one padded batch, the others (prompt chunks, drafted tokens) one sequence each.
"""

from __future__ import annotations

import torch

from loopcoder.engine.sequence import Sequence
from loopcoder.model.attention import AttentionMetadata, DecodeGroup, PagedAttention, PrefillSpan, positional_mask
from loopcoder.model.kv_cache import KVCache
from loopcoder.model.loopcoder import LoopCoderForCausalLM


class ModelRunner:
    def __init__(self, model: LoopCoderForCausalLM, cache: KVCache) -> None:
        self.model = model
        self.cache = cache
        self.block_size = cache.block_size
        self.window = model.config.loop_window_size
        self.device = cache.global_state.device

    def _slots(self, table: list[int | None], first: int, last: int) -> torch.Tensor:
        """Flat cache slots of positions [first, last) of a sequence with this block table."""
        bs = self.block_size
        blocks = torch.tensor([-1 if b is None else b for b in table[first // bs : -(-last // bs)]], dtype=torch.long)
        slots = (blocks.unsqueeze(1) * bs + torch.arange(bs)).flatten()
        return slots[first % bs : first % bs + last - first]

    def prepare(self, seqs: list[Sequence], num_new: list[int]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        ids, positions, write_global, write_local = [], [], [], []
        decode_rows, prefills, row = [], [], 0
        for seq, n in zip(seqs, num_new, strict=True):
            start, end = seq.num_computed, seq.num_computed + n
            ids.extend(seq.token_ids[start:end])
            positions.append(torch.arange(start, end))
            write_global.append(self._slots(seq.global_blocks, start, end))
            write_local.append(self._slots(seq.local_blocks, start, end))
            if n == 1:
                decode_rows.append((row, seq))
            else:
                prefills.append(self._prefill_span(seq, row, start, end))
            row += n
        meta = AttentionMetadata(
            write_global=torch.cat(write_global).to(self.device),
            write_local=torch.cat(write_local).to(self.device),
            decode=self._decode_group(decode_rows) if decode_rows else None,
            prefills=prefills,
        )
        return torch.tensor(ids, device=self.device), torch.cat(positions).to(self.device), meta

    def _prefill_span(self, seq: Sequence, row: int, start: int, end: int) -> PrefillSpan:
        q_pos = torch.arange(start, end)
        k_first = max(start - self.window + 1, 0)
        k_pos = torch.arange(k_first, end)
        global_mask = None if start == 0 else positional_mask(q_pos, torch.arange(end), None).to(self.device)
        return PrefillSpan(
            first=row,
            last=row + end - start,
            global_slots=self._slots(seq.global_blocks, 0, end).to(self.device),
            global_mask=global_mask,
            local_slots=self._slots(seq.local_blocks, k_first, end).to(self.device),
            local_mask=positional_mask(q_pos, k_pos, self.window).to(self.device),
        )

    def _decode_group(self, rows: list[tuple[int, Sequence]]) -> DecodeGroup:
        positions = torch.tensor([seq.num_computed for _, seq in rows])
        longest = int(positions.max()) + 1
        global_slots = torch.zeros(len(rows), longest, dtype=torch.long)
        local_slots = torch.zeros(len(rows), self.window, dtype=torch.long)
        for i, (_, seq) in enumerate(rows):
            p = seq.num_computed
            global_slots[i, : p + 1] = self._slots(seq.global_blocks, 0, p + 1)
            first = max(p - self.window + 1, 0)
            local_slots[i, : p + 1 - first] = self._slots(seq.local_blocks, first, p + 1)
        global_mask = torch.arange(longest) <= positions.unsqueeze(1)
        local_mask = torch.arange(self.window) <= (positions - (positions - self.window + 1).clamp(min=0)).unsqueeze(1)
        return DecodeGroup(
            tokens=torch.tensor([r for r, _ in rows], device=self.device),
            global_slots=global_slots.to(self.device),
            global_mask=global_mask[:, None, None, :].to(self.device),
            local_slots=local_slots.to(self.device),
            local_mask=local_mask[:, None, None, :].to(self.device),
        )

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], num_new: list[int], logit_rows: torch.Tensor) -> torch.Tensor:
        """Float32 logits at the flat batch rows `logit_rows` after running the step's tokens."""
        ids, positions, meta = self.prepare(seqs, num_new)
        hidden = self.model(ids, positions, PagedAttention(self.cache, meta))
        return self.model.compute_logits(hidden[logit_rows.to(self.device)]).cpu()
