"""The key/value storage the paged engine fills: one flat slot array per layer and loop.

Slot s belongs to block s // block_size. Loop 0 (the global state) has its own pool of
blocks, kept for every token of a sequence; all later loops share a second, much smaller
pool (the window state), so one local block holds a slot in every later loop and layer.
"""

from __future__ import annotations

import torch

from loopcoder.config import LoopCoderConfig
from loopcoder.parallel import tp_size


class KVCache:
    def __init__(
        self,
        config: LoopCoderConfig,
        num_global_blocks: int,
        num_local_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        self.block_size = block_size
        self.num_global_blocks = num_global_blocks
        self.num_local_blocks = num_local_blocks
        kv_heads = kv_heads_per_rank(config)
        layers, later = config.num_hidden_layers, max(config.loop_num - 1, 0)
        global_shape = (2, layers, num_global_blocks * block_size, kv_heads, config.head_dim)
        local_shape = (2, later, layers, num_local_blocks * block_size, kv_heads, config.head_dim)
        self.global_state = torch.zeros(global_shape, dtype=dtype, device=device)
        self.local_state = torch.zeros(local_shape, dtype=dtype, device=device)
        # Each layer's (keys, values) views, made once: every decode step asks for them per layer and loop.
        self._global = [(self.global_state[0, i], self.global_state[1, i]) for i in range(layers)]
        self._local = [[(self.local_state[0, j, i], self.local_state[1, j, i]) for i in range(layers)] for j in range(later)]

    def global_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._global[layer]

    def local_kv(self, loop: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._local[loop - 1][layer]


def kv_heads_per_rank(config: LoopCoderConfig) -> int:
    """KV heads held by each rank; replicated when there are fewer KV heads than ranks."""
    return max(config.num_key_value_heads // tp_size(), 1)


def bytes_per_block(config: LoopCoderConfig, block_size: int, dtype: torch.dtype, loops: int) -> int:
    """Bytes of one block holding keys and values of `loops` loops for every layer."""
    item = torch.empty((), dtype=dtype).element_size()
    return 2 * loops * config.num_hidden_layers * block_size * kv_heads_per_rank(config) * config.head_dim * item
