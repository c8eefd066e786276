"""Fast CPU paths, with the plain PyTorch path always one switch away.

`cpu_kernels.cpp` holds the native decode kernels (skinny bf16/int8 GEMM, RMSNorm, RoPE, paged
decode attention with the gate fused in). It is compiled on first use by PyTorch's C++
extension builder and cached (under ~/.cache/torch_extensions), so only the first process on a
machine pays the compile. Without a compiler or AVX2, when compiling fails, with
LOOPCODER_KERNELS=0, or inside `plain()`, every op takes the plain path; so do tensors on a GPU.
"""

from __future__ import annotations

import os
import platform
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import torch

# Activation rows up to which the native linear beats PyTorch's GEMM (benchmarks/kernels.py).
SKINNY_ROWS = 32

_SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
_NATIVE_DTYPES = (torch.bfloat16, torch.float32)
_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-pthread"]
_state: dict = {"enabled": os.environ.get("LOOPCODER_KERNELS", "1") != "0", "module": None, "tried": False, "seconds": None}


def load() -> ModuleType | None:
    """The compiled kernels (built on the first call in the machine's life), or None where they cannot run."""
    if not _state["tried"]:
        _state["tried"] = True
        if platform.machine().lower() in ("x86_64", "amd64") and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
            from torch.utils.cpp_extension import load as build

            start = time.perf_counter()
            try:
                _state["module"] = build(
                    name="loopcoder_cpu_kernels", sources=[str(_SOURCE)], extra_cflags=_FLAGS, extra_ldflags=["-pthread"]
                )
            except Exception as e:  # noqa: BLE001 - any build failure leaves the plain path, which is always correct
                warnings.warn(f"loopcoder: native CPU kernels unavailable, using plain PyTorch ({e})", stacklevel=2)
            _state["seconds"] = time.perf_counter() - start
            if _state["seconds"] > 5:
                print(f"loopcoder: compiled the native CPU kernels in {_state['seconds']:.0f} s (cached from now on)", file=sys.stderr)
    return _state["module"]


def load_seconds() -> float | None:
    """How long building or loading the kernels took in this process (None before the first `load`)."""
    return _state["seconds"]


def enabled(x: torch.Tensor) -> bool:
    """Whether `x` may take a fast path at all (on the CPU and not switched off)."""
    return _state["enabled"] and x.is_cpu


def native(x: torch.Tensor) -> ModuleType | None:
    """The kernels module when an op on `x` (bf16 or fp32) should use it, else None (called per op: kept cheap)."""
    if not (_state["enabled"] and x.is_cpu and x.dtype in _NATIVE_DTYPES):
        return None
    return _state["module"] if _state["tried"] else load()


@contextmanager
def plain() -> Iterator[None]:
    """Run every op on the plain PyTorch path inside this block (the reference the fast paths are tested against)."""
    before = _state["enabled"]
    _state["enabled"] = False
    try:
        yield
    finally:
        _state["enabled"] = before
