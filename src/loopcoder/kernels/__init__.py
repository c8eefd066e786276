"""Fast CPU paths, with the plain PyTorch path always one switch away.

`cpu_kernels.cpp` holds the native kernels: for decode, the skinny bf16/int8 GEMM, RMSNorm, RoPE
and paged decode attention with the gate fused in; for prompts, SwiGLU and (AVX-512 only) causal
and window attention. It is compiled on first use by PyTorch's C++
extension builder and cached (under ~/.cache/torch_extensions), so only the first process on a
machine pays the compile, with AVX-512 bf16/int16 dot products where the CPU has them and AVX2
otherwise (LOOPCODER_KERNELS=avx2 forces the latter). Without a compiler or AVX2, when compiling
fails, with LOOPCODER_KERNELS=0, or inside `plain()`, every op takes the plain path; so do
tensors on a GPU.
"""

from __future__ import annotations

import ctypes
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

_SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
_NATIVE_DTYPES = (torch.bfloat16, torch.float32)
_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-pthread"]
# Where the CPU has them, AVX-512 with bf16 and int16 dot products (Zen 4+, Cooper Lake+).
_WIDE_FLAGS = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mavx512vnni"]
_state: dict = {
    "enabled": os.environ.get("LOOPCODER_KERNELS", "1") != "0", "module": None, "tried": False, "seconds": None, "fast_bf16": None,
}


def load() -> ModuleType | None:
    """The compiled kernels (built on the first call in the machine's life), or None where they cannot run."""
    if not _state["tried"]:
        _state["tried"] = True
        if platform.machine().lower() in ("x86_64", "amd64") and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
            from torch.utils.cpp_extension import load as build

            wide = wide_build()
            start = time.perf_counter()
            try:
                _state["module"] = build(
                    name="loopcoder_cpu_kernels" + ("_avx512" if wide else ""), sources=[str(_SOURCE)],
                    extra_cflags=_FLAGS + (_WIDE_FLAGS if wide else []), extra_ldflags=["-pthread"],
                )
            except Exception as e:  # noqa: BLE001 - any build failure leaves the plain path, which is always correct
                warnings.warn(f"loopcoder: native CPU kernels unavailable, using plain PyTorch ({e})", stacklevel=2)
            _state["seconds"] = time.perf_counter() - start
            _keep_freed_memory()
            if _state["seconds"] > 5:
                print(f"loopcoder: compiled the native CPU kernels in {_state['seconds']:.0f} s (cached from now on)", file=sys.stderr)
    return _state["module"]


def _keep_freed_memory() -> None:
    """Let glibc keep freed blocks of up to 32 MiB in the heap rather than unmapping them.

    A prompt allocates and frees tensors of a few to tens of MB in every layer (activations, the
    unpacked weights); mapped fresh each time, their pages fault in again on every use: unpacking
    a weight ran 2-4x slower, a 2048-token prefill of a 0.5B model about 1.1x. Larger blocks (the
    KV cache) are still mapped and returned on free.
    """
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD (its largest value)
        libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD: keep up to this much free at the top of the heap
    except (OSError, AttributeError):  # not glibc
        pass


def wide_build() -> bool:
    """Whether to build the AVX-512 (bf16 and int16 dot product) kernels: the CPU has them (as Linux
    reports its flags) and LOOPCODER_KERNELS is not "avx2" (which asks for the AVX2 build)."""
    if os.environ.get("LOOPCODER_KERNELS") == "avx2":
        return False
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "avx512_vnni"} <= set(flags)


def skinny_rows(packed: bool) -> int:
    """Activation rows up to which the native linear beats PyTorch's GEMM (benchmarks/kernels.py).

    AVX2: 32. AVX-512 with bf16 units, where PyTorch's bf16 GEMM is fast: 8 against a plain weight,
    and 256 against a packed one, which the GEMM would first have to unpack.
    """
    module = _state["module"] if _state["tried"] else load()
    if module is None or not module.wide:
        return 32
    return 256 if packed else 8


def load_seconds() -> float | None:
    """How long building or loading the kernels took in this process (None before the first `load`)."""
    return _state["seconds"]


def fast_bf16_gemm() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX), so PyTorch's bf16 GEMM beats its fp32 one.

    Without those units (AVX2 only) the bf16 GEMM runs several times slower than the fp32 one.
    """
    if _state["fast_bf16"] is None:
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        _state["fast_bf16"] = any(getattr(torch.cpu, name, lambda: False)() for name in probes)
    return _state["fast_bf16"]


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
