"""The machine's ceilings, measured in the same run as the figures they bound.

Memory read bandwidth bounds batch-1 decode (every weight is read once per loop per token);
GEMM throughput bounds prefill; the peak of the native kernel's multiply-add bounds batched
decode (vdpbf16ps on AVX512-BF16 CPUs; elsewhere each bf16 weight is widened and multiplied by
fp32 FMAs). Bandwidth and GEMM use PyTorch's own kernels on all of its threads, the peak a
register-only loop of the native kernels on as many.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from loopcoder import kernels


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def memory_read_gbps(gib: float = 1.0, repeats: int = 5) -> float:
    """GB/s of a plain read: the sum of an fp32 tensor far larger than the caches."""
    x = torch.ones(int(gib * 2**30) // 4)
    return x.numel() * 4 / median_seconds(x.sum, repeats) / 1e9


def memory_copy_gbps(gib: float = 0.5, repeats: int = 5) -> float:
    """GB/s moved (read plus written) by copying a large tensor: for comparison only."""
    x = torch.ones(int(gib * 2**30) // 4)
    y = torch.empty_like(x)
    return 2 * x.numel() * 4 / median_seconds(lambda: y.copy_(x), repeats) / 1e9


def gemm_gflops(dtype: torch.dtype, m: int = 2048, k: int = 1024, n: int = 2816, repeats: int = 3) -> float:
    """GFLOP/s of PyTorch's GEMM x [m, k] . w [n, k]^T in `dtype` (an MLP projection of a 2048-token prefill)."""
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(m, k, generator=gen).to(dtype), torch.randn(n, k, generator=gen).to(dtype)
    return 2 * m * k * n / median_seconds(lambda: torch.nn.functional.linear(x, w), repeats) / 1e9


def product_peak_gflops(iterations: int = 20_000_000) -> float | None:
    """GFLOP/s of independent multiply-adds of the batched bf16 kernel's instruction on registers
    (vdpbf16ps in an AVX-512 build, fp32 FMA in an AVX2 one; None without the native kernels)."""
    ops = kernels.load()
    return None if ops is None else ops.product_peak_gflops(iterations)
