"""Block bookkeeping for the two kinds of state, and automatic prefix caching.

Global blocks (loop 0) are kept for every token of a sequence. Local blocks (the later
loops' own keys/values) are kept only while the window can still reach them: a block all of
whose positions are older than the window (plus a small rollback margin) goes back to the
pool at once, so a sequence holds a constant number of local blocks however long it grows.

Full blocks are registered under a hash of the whole prefix up to their end. A freed block
keeps its hash until the pool reuses it (oldest first), so a later prompt with the same prefix
finds loop 0's blocks for the prefix and the local blocks covering its last W - 1 tokens.
"""

from __future__ import annotations

from collections import OrderedDict

from loopcoder.engine.sequence import Sequence


class BlockPool:
    """Reference-counted blocks; free ones are reused least recently freed first."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.ref_count = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.cached: dict[int, int] = {}

    @property
    def num_free(self) -> int:
        return len(self.free)

    def allocate(self) -> int:
        block, _ = self.free.popitem(last=False)
        old = self.block_hash[block]
        if old is not None:
            del self.cached[old]
            self.block_hash[block] = None
        self.ref_count[block] = 1
        return block

    def acquire(self, block: int) -> None:
        """Take another reference to a block found in the prefix cache."""
        if self.ref_count[block] == 0:
            del self.free[block]
        self.ref_count[block] += 1

    def release(self, block: int) -> None:
        self.ref_count[block] -= 1
        if self.ref_count[block] == 0:
            self.free[block] = None

    def register(self, block: int, key: int) -> None:
        if self.block_hash[block] is None and key not in self.cached:
            self.block_hash[block] = key
            self.cached[key] = block

    def forget(self, block: int) -> None:
        key = self.block_hash[block]
        if key is not None:
            del self.cached[key]
            self.block_hash[block] = None


class BlockManager:
    def __init__(
        self, num_global_blocks: int, num_local_blocks: int, block_size: int, window: int, max_rollback: int = 0,
        enable_prefix_caching: bool = True,
    ) -> None:
        self.block_size = block_size
        self.window = window
        self.max_rollback = max_rollback
        self.enable_prefix_caching = enable_prefix_caching
        self.global_pool = BlockPool(num_global_blocks)
        self.local_pool = BlockPool(num_local_blocks)
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.hashes: dict[int, list[int]] = {}

    # -- sizes -------------------------------------------------------------------------------

    def first_kept_position(self, num_computed: int) -> int:
        """Oldest position whose local keys/values a sequence with `num_computed` tokens still needs."""
        return max(num_computed - self.window + 1 - self.max_rollback, 0)

    def blocks_needed(self, seq: Sequence, num_new: int) -> tuple[int, int]:
        """(global, local) blocks to allocate before `num_new` more tokens of `seq` can run."""
        end = seq.num_computed + num_new
        total = -(-end // self.block_size)
        first_local = self.first_kept_position(seq.num_computed) // self.block_size
        local = sum(1 for j in range(first_local, total) if j >= len(seq.local_blocks) or seq.local_blocks[j] is None)
        return max(total - len(seq.global_blocks), 0), local

    def local_blocks_per_sequence(self, chunk: int) -> int:
        """Most local blocks one sequence can hold at once while running `chunk` new tokens."""
        return -(-(self.window - 1 + self.max_rollback + chunk) // self.block_size) + 1

    def can_allocate(self, seq: Sequence, num_new: int) -> bool:
        g, l_ = self.blocks_needed(seq, num_new)
        return g <= self.global_pool.num_free and l_ <= self.local_pool.num_free

    # -- allocation ----------------------------------------------------------------------------

    def allocate(self, seq: Sequence, num_new: int) -> None:
        """Give `seq` every block its next `num_new` tokens write to (call `can_allocate` first)."""
        end = seq.num_computed + num_new
        total = -(-end // self.block_size)
        while len(seq.global_blocks) < total:
            seq.global_blocks.append(self.global_pool.allocate())
        while len(seq.local_blocks) < total:
            seq.local_blocks.append(None)
        first_local = self.first_kept_position(seq.num_computed) // self.block_size
        for j in range(first_local, total):
            if seq.local_blocks[j] is None:
                seq.local_blocks[j] = self.local_pool.allocate()

    def free(self, seq: Sequence) -> None:
        """Return all of a sequence's blocks (their prefix-cache entries stay until reused)."""
        if self.enable_prefix_caching and seq.global_blocks:
            self._register(seq, margin=0)
        for block in reversed(seq.global_blocks):
            self.global_pool.release(block)
        for block in reversed(seq.local_blocks):
            if block is not None:
                self.local_pool.release(block)
        seq.global_blocks, seq.local_blocks = [], []
        self.hashes.pop(seq.seq_id, None)

    def after_step(self, seq: Sequence) -> None:
        """Register newly completed blocks and drop local blocks the window has left behind."""
        if self.enable_prefix_caching:
            self._register(seq)
        for j in range(self.first_kept_position(seq.num_computed) // self.block_size):
            block = seq.local_blocks[j]
            if block is not None:
                self.local_pool.release(block)
                seq.local_blocks[j] = None

    def _register(self, seq: Sequence, margin: int | None = None) -> None:
        # A block is registered once no rollback can reach it any more.
        margin = self.max_rollback if margin is None else margin
        settled = max(seq.num_computed - margin, 0) // self.block_size
        hashes = self.hashes.setdefault(seq.seq_id, [])
        bs = self.block_size
        while len(hashes) < settled:
            j = len(hashes)
            parent = hashes[-1] if hashes else 0
            key = hash((parent, tuple(seq.token_ids[j * bs : (j + 1) * bs])))
            hashes.append(key)
            self.global_pool.register(seq.global_blocks[j], key)
            local = seq.local_blocks[j]
            if local is not None:
                self.local_pool.register(local, key)

    def rollback(self, seq: Sequence, num_tokens: int) -> None:
        """Forget the last `num_tokens` computed tokens' state (e.g. rejected draft tokens)."""
        if num_tokens > self.max_rollback:
            raise ValueError(f"cannot roll back {num_tokens} tokens: the engine keeps state for {self.max_rollback}")
        if seq.num_computed - num_tokens < seq.num_cached:
            raise ValueError("cannot roll back into a prefix-cache hit")
        seq.num_computed -= num_tokens
        keep = -(-seq.num_computed // self.block_size)
        for block in seq.global_blocks[keep:]:
            self.global_pool.release(block)
        for block in seq.local_blocks[keep:]:
            if block is not None:
                self.local_pool.release(block)
        del seq.global_blocks[keep:], seq.local_blocks[keep:]

    # -- prefix caching ------------------------------------------------------------------------

    def match_prefix(self, seq: Sequence) -> None:
        """Reuse cached blocks for the longest usable prefix of a new sequence's prompt.

        Usable means: loop 0's blocks for the whole prefix, and the later loops' blocks for the
        positions the next token's window reaches. At least one prompt token is always left to
        compute so the sequence gets its logits.
        """
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return
        self.prefix_queries += 1
        bs = self.block_size
        keys, parent = [], 0
        for j in range((seq.num_tokens - 1) // bs):
            parent = hash((parent, tuple(seq.token_ids[j * bs : (j + 1) * bs])))
            if parent not in self.global_pool.cached:
                break
            keys.append(parent)
        for n in range(len(keys), 0, -1):
            first_local = self.first_kept_position(n * bs) // bs
            if all(keys[j] in self.local_pool.cached for j in range(first_local, n)):
                self._take(seq, keys[:n], first_local)
                self.prefix_hits += 1
                return

    def _take(self, seq: Sequence, keys: list[int], first_local: int) -> None:
        for j, key in enumerate(keys):
            block = self.global_pool.cached[key]
            self.global_pool.acquire(block)
            seq.global_blocks.append(block)
            local = None
            if j >= first_local:
                local = self.local_pool.cached[key]
                self.local_pool.acquire(local)
            seq.local_blocks.append(local)
        seq.num_computed = seq.num_cached = len(keys) * self.block_size
        self.hashes[seq.seq_id] = list(keys)
