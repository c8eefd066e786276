"""The linear kernels alone, per activation row count, over a model's worth of weights.

Weights stream from memory (they are far larger than the caches), as in decode. This is where
`kernels.skinny_rows` comes from, and it shows what the native kernel buys over PyTorch's bf16
GEMM and over `torch._weight_int8pack_mm` (PyTorch's own int8 weight-only kernel).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks.ceilings import median_seconds
from loopcoder import kernels
from loopcoder.quantization import quantize_int8


def weight_set(hidden: int, intermediate: int, layers: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """The MLP weights of `layers` layers ([2I, H] and [H, I]): most of a layer's bytes."""
    gen = torch.Generator().manual_seed(0)
    return [
        (torch.randn(shape, generator=gen) * 0.02).to(dtype)
        for _ in range(layers) for shape in ((2 * intermediate, hidden), (hidden, intermediate))
    ]


def linear_rates(rows: list[int], hidden: int = 1024, intermediate: int = 2816, layers: int = 8, repeats: int = 5) -> list[dict]:
    """Weight GB/s and GFLOP/s of each way to run x [rows, K] . W^T over every weight of the set."""
    bf16 = weight_set(hidden, intermediate, layers, torch.bfloat16)
    params = sum(w.numel() for w in bf16)
    candidates = Candidates(bf16)
    out = []
    for m in rows:
        xs = {w.shape[1]: torch.randn(m, w.shape[1]).to(torch.bfloat16) for w in bf16}
        for name, fn in candidates.ways(xs).items():
            seconds = median_seconds(fn, repeats)
            weight_bytes = params * (1 if "int8" in name else 2)
            out.append({"rows": m, "kernel": name, "weight_gbps": weight_bytes / seconds / 1e9, "gflops": 2 * m * params / seconds / 1e9})
    return out


class Candidates:
    """The same weights in every form a kernel takes: bf16, int8 with scales, packed."""

    def __init__(self, bf16: list[torch.Tensor]) -> None:
        self.ops = kernels.load()
        self.bf16 = bf16
        self.int8 = [quantize_int8(w) for w in bf16]
        self.int8_bf16_scales = [(q, s.to(torch.bfloat16)) for q, s in self.int8]
        self.packed = [self.ops.pack(w) for w in bf16] if self.ops else []
        self.packed_int8 = [(self.ops.pack(q), s) for q, s in self.int8] if self.ops else []

    def ways(self, xs: dict[int, torch.Tensor]) -> dict[str, Callable[[], object]]:
        """Each kernel over every weight, for activations `xs` (keyed by K)."""
        ops, pairs = self.ops, list(zip(self.bf16, self.packed, strict=False))
        ways = {
            "torch_bf16": lambda: [F.linear(xs[w.shape[1]], w) for w in self.bf16],
            "torch_fp32_widened": lambda: [F.linear(xs[w.shape[1]].float(), w.float()) for w in self.bf16],
            "torch_int8pack_mm": lambda: [torch._weight_int8pack_mm(xs[q.shape[1]], q, s) for q, s in self.int8_bf16_scales],
        }
        if ops is not None:
            ways |= {
                "native_bf16": lambda: [ops.linear(xs[w.shape[1]], w) for w in self.bf16],
                "native_bf16_packed": lambda: [ops.linear(xs[w.shape[1]], p, packed=True) for w, p in pairs],
                "native_int8": lambda: [ops.linear(xs[q.shape[1]], q, s) for q, s in self.int8],
                "native_int8_packed": lambda: [
                    ops.linear(xs[q.shape[1]], p, s, packed=True) for (q, s), (p, _) in zip(self.int8, self.packed_int8, strict=True)
                ],
            }
        return ways


def window_attention_seconds(tokens: int, heads: int, kv_heads: int, head_dim: int, window: int, repeats: int = 3) -> dict:
    """A later loop's window attention over a whole prompt in bf16: a full square of masked keys against the band."""
    from loopcoder.model.attention import attend, positional_mask

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, tokens, heads, head_dim, generator=gen).to(torch.bfloat16)
    k, v = (torch.randn(1, tokens, kv_heads, head_dim, generator=gen).to(torch.bfloat16) for _ in range(2))
    pos = torch.arange(tokens)
    square = positional_mask(pos, pos, window)
    tile = max(64, window)
    tiles = -(-tokens // tile)
    q_pos = torch.arange(tiles * tile).view(tiles, tile)
    k_pos = q_pos[:, :1] - window + 1 + torch.arange(tile + window - 1)
    band = positional_mask(q_pos, k_pos, window) & (k_pos >= 0)[:, None, :]
    band |= (q_pos >= tokens)[:, :, None]
    index = k_pos.clamp(0, tokens - 1)
    padded = F.pad(q[0], (0, 0, 0, 0, 0, tiles * tile - tokens)).view(tiles, tile, heads, head_dim)
    return {
        "square_s": median_seconds(lambda: attend(q, k, v, square), repeats),
        "band_s": median_seconds(lambda: attend(padded, k[0][index], v[0][index], band[:, None]), repeats),
    }
