"""Building blocks: RMSNorm, rotary embedding with scaling, tensor-parallel linears, SwiGLU.

Every weight-holding layer says how each checkpoint tensor maps onto its (possibly fused,
possibly sharded) parameter through `WeightSpec`s, so the loader stays generic and each rank
reads only its own slice of each tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loopcoder import kernels
from loopcoder.parallel import all_gather_last_dim, all_reduce, tp_rank, tp_size


@dataclass
class WeightSpec:
    """Checkpoint tensor `name` (full `shape`) fills `param[rows]` with its slice `start:stop` along `dim`."""

    name: str
    shape: tuple[int, ...]
    param: nn.Parameter
    rows: slice
    dim: int = 0
    start: int = 0
    stop: int | None = None


def shard_range(total: int) -> tuple[int, int]:
    """This rank's [start, stop) of a dimension of `total` split evenly over ranks."""
    size, rank = tp_size(), tp_rank()
    if total % size:
        raise ValueError(f"dimension {total} is not divisible by tensor parallel size {size}")
    part = total // size
    return rank * part, (rank + 1) * part


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = kernels.native(x)
        if ops is not None:
            if x.dim() == 2 and x.is_contiguous():
                return ops.rms_norm(x, self.weight, self.eps)
            return ops.rms_norm(x.reshape(-1, x.shape[-1]).contiguous(), self.weight, self.eps).view(x.shape)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def specs(self, prefix: str) -> list[WeightSpec]:
        return [WeightSpec(f"{prefix}.weight", tuple(self.weight.shape), self.weight, slice(None))]


def linear(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None,
    residual: torch.Tensor | None = None, swiglu: bool = False, packed: bool = False,
) -> torch.Tensor:
    """residual + x W^T, W an int8 weight times its per-row `scale` if given; with `swiglu`, x holds
    [gate | up] halves and stands for silu(gate) * up. `packed`: W is in the native kernel's layout.

    A few rows (decode) on the CPU take the native kernel, which streams each weight row once.
    """
    rows = x.numel() // x.shape[-1]
    ops = kernels.native(x) if rows <= kernels.skinny_rows(packed) else None
    if ops is not None:
        if x.dim() == 2 and x.is_contiguous() and (residual is None or residual.is_contiguous()):  # decode: no reshapes
            return ops.linear(x, weight, scale, residual, swiglu, packed)
        out_features = weight.shape[0]
        flat = None if residual is None else residual.reshape(rows, out_features).contiguous()
        y = ops.linear(x.reshape(rows, x.shape[-1]).contiguous(), weight, scale, flat, swiglu, packed)
        return y.view(*x.shape[:-1], out_features)
    if packed:
        weight = kernels.load().unpack(weight, x.shape[-1] // 2 if swiglu else x.shape[-1])
    if swiglu:
        ops = kernels.native(x)
        if ops is not None and x.is_contiguous():
            x = ops.swiglu(x.view(-1, x.shape[-1])).view(*x.shape[:-1], x.shape[-1] // 2)
        else:
            gate, up = x.chunk(2, dim=-1)
            x = F.silu(gate) * up
    y = matmul(x, weight, scale)
    return y if residual is None else residual + y


def matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """x W^T (times `scale` for int8 weights) for many rows.

    The product runs in the activation dtype, except on a CPU for bf16 and int8 weights: without
    bf16 units (AVX2 only) PyTorch's bf16 GEMM is several times slower than its fp32 one, so the
    fast path widens to fp32 there and rounds the result back; an int8 weight is widened to fp32
    on the plain path and on such CPUs, and to bf16 on CPUs with bf16 units (its values are exact
    in bf16). An int8 weight's scale is applied in fp32.
    """
    compute = x.dtype
    if x.device.type == "cpu" and x.dtype != torch.float32 and weight.dtype in (torch.int8, torch.bfloat16):
        native_bf16 = x.dtype == torch.bfloat16 and kernels.enabled(x) and kernels.fast_bf16_gemm()
        if not native_bf16 and (weight.dtype == torch.int8 or kernels.enabled(x)):
            compute = torch.float32
    if weight.dtype == compute and scale is None:
        return F.linear(x, weight)
    y = F.linear(x.to(compute), weight.to(compute))
    return (y if scale is None else y.float() * scale).to(x.dtype)


class Weight(nn.Module):
    """A [rows, cols] weight matrix, optionally int8 with per-row `scale` (loopcoder.quantization),
    optionally `packed` into the native CPU kernel's layout (`pack`, done by the engine's runner)."""

    def __init__(self, rows: int, cols: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, cols, dtype=dtype), requires_grad=False)
        self.register_buffer("scale", None)
        self.cols = cols
        self.dtype = dtype
        self.packed = False

    def matmul(self, x: torch.Tensor, residual: torch.Tensor | None = None, swiglu: bool = False) -> torch.Tensor:
        return linear(x, self.weight, self.scale, residual, swiglu, self.packed)

    def packable(self) -> bool:
        """Whether `pack` applies: a bf16 or int8 weight on the CPU, not packed yet."""
        return not self.packed and self.weight.device.type == "cpu" and self.weight.dtype in (torch.bfloat16, torch.int8)

    def packed_shape(self) -> tuple[int, int]:
        """The weight's shape in the packed layout: rows padded to a multiple of 16 columns."""
        return self.weight.shape[0], -(-self.cols // 16) * 16

    def pack(self, into: torch.Tensor) -> None:
        """Lay the weight out for the native decode kernel in `into` (a [packed_shape] tensor; see `packable`)."""
        self.weight = nn.Parameter(kernels.load().pack(self.weight.data, into), requires_grad=False)
        self.packed = True

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of the (dequantized) matrix, [..., cols] in the model dtype: an embedding lookup."""
        if self.packed:
            out = kernels.load().packed_rows(self.weight, ids.reshape(-1), self.cols).view(*ids.shape, self.cols)
        else:
            out = F.embedding(ids, self.weight)
        return out if self.scale is None else out.to(self.dtype) * self.scale[ids].unsqueeze(-1).to(self.dtype)


def pack_weights(model: nn.Module) -> None:
    """Lay every bf16 or int8 weight matrix on the CPU out for the native decode kernel.

    The packed matrices of a dtype sit one after another in one buffer, in module order, which is
    the order a decode step reads them: a step then streams memory front to back and the kernel's
    prefetch runs on from one matrix into the next (measured on Zen 1: the layer weights of a 0.5B
    model stream at 1.15x the rate of one allocation per matrix). The buffer's pages are touched
    only as each matrix is copied in and its old storage freed, so memory does not peak at twice
    the weights.
    """
    if kernels.load() is None:
        return
    weights = [m for m in model.modules() if isinstance(m, Weight) and m.packable()]
    for dtype in {w.weight.dtype for w in weights}:
        group = [w for w in weights if w.weight.dtype == dtype]
        buffer = torch.empty(sum(math.prod(w.packed_shape()) for w in group), dtype=dtype)
        offset = 0
        for w in group:
            size = math.prod(w.packed_shape())
            w.pack(buffer[offset : offset + size].view(w.packed_shape()))
            offset += size


class ColumnParallelLinear(Weight):
    """y = x W^T with W's output rows split over ranks; several checkpoint tensors may be fused.

    `parts` lists (checkpoint suffix, full rows, this rank's row range) in fused order.
    """

    def __init__(self, in_features: int, parts: list[tuple[str, int, tuple[int, int]]], dtype: torch.dtype) -> None:
        super().__init__(sum(stop - start for _, _, (start, stop) in parts), in_features, dtype)
        self.parts = parts
        self.in_features = in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x)

    def specs(self, prefix: str) -> list[WeightSpec]:
        out, offset = [], 0
        for suffix, full_rows, (start, stop) in self.parts:
            rows = slice(offset, offset + stop - start)
            out.append(WeightSpec(f"{prefix}.{suffix}.weight", (full_rows, self.in_features), self.weight, rows, 0, start, stop))
            offset += stop - start
        return out


class RowParallelLinear(Weight):
    """y = x W^T with W's input columns split over ranks; partial sums are all-reduced."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype) -> None:
        start, stop = shard_range(in_features)
        super().__init__(out_features, stop - start, dtype)
        self.in_features = in_features
        self.start, self.stop = start, stop

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, swiglu: bool = False) -> torch.Tensor:
        """residual + all-reduced x W^T (see `linear` for swiglu)."""
        if tp_size() == 1:
            return self.matmul(x, residual, swiglu)
        y = all_reduce(self.matmul(x, swiglu=swiglu))
        return y if residual is None else residual + y

    def specs(self, name: str) -> list[WeightSpec]:
        shape = (self.weight.shape[0], self.in_features)
        return [WeightSpec(f"{name}.weight", shape, self.weight, slice(None), 1, self.start, self.stop)]


class VocabParallelEmbedding(Weight):
    """Embedding rows split over ranks by vocabulary; the last shard is zero-padded."""

    def __init__(self, vocab_size: int, dim: int, dtype: torch.dtype) -> None:
        per_rank = math.ceil(vocab_size / tp_size())
        super().__init__(per_rank, dim, dtype)
        self.vocab_size = vocab_size
        self.start = tp_rank() * per_rank
        self.stop = min(self.start + per_rank, vocab_size)
        self.weight.data[max(self.stop - self.start, 0) :].zero_()  # rows past the vocabulary (last shard) stay zero

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if tp_size() == 1:
            return self.rows(ids)
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = self.rows(local.masked_fill(outside, 0))
        return all_reduce(out.masked_fill(outside.unsqueeze(-1), 0))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states times the (vocab-sharded) matrix, gathered to the full vocabulary."""
        return all_gather_last_dim(self.matmul(hidden))[..., : self.vocab_size]

    def specs(self, name: str) -> list[WeightSpec]:
        shape = (self.vocab_size, self.cols)
        rows = slice(0, self.stop - self.start)
        return [WeightSpec(f"{name}.weight", shape, self.weight, rows, 0, self.start, self.stop)]


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, intermediate: int, dtype: torch.dtype) -> None:
        super().__init__()
        shard = shard_range(intermediate)
        self.gate_up_proj = ColumnParallelLinear(
            hidden, [("gate_proj", intermediate, shard), ("up_proj", intermediate, shard)], dtype
        )
        self.down_proj = RowParallelLinear(intermediate, hidden, dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return self.down_proj(self.gate_up_proj(x), residual, swiglu=True)

    def specs(self, prefix: str) -> list[WeightSpec]:
        return self.gate_up_proj.specs(prefix) + self.down_proj.specs(f"{prefix}.down_proj")


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None, max_positions: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the cos/sin scale (yarn's attention factor) for a rope_scaling config.

    `dynamic` is computed statically for the longest context, as serving engines do, so a
    token's logits never depend on how long the batch it runs in happens to be.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "default":
        return inv_freq, 1.0
    factor = float(scaling["factor"])
    if rope_type == "linear":
        return inv_freq / factor, 1.0
    if rope_type == "dynamic":
        original = scaling.get("original_max_position_embeddings", max_positions)
        longest = max(original * factor, max_positions)
        base = theta * ((factor * longest / original) - (factor - 1)) ** (head_dim / (head_dim - 2))
        return 1.0 / (base**exponents), 1.0
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling), 1.0
    return _yarn_inv_freq(head_dim, theta, scaling, max_positions)


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_len = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


def _yarn_inv_freq(dim: int, theta: float, s: dict[str, Any], max_positions: int) -> tuple[torch.Tensor, float]:
    factor = float(s["factor"])
    original = s.get("original_max_position_embeddings") or max_positions

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        if s.get("mscale") and s.get("mscale_all_dim"):
            attention_factor = mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """NeoX-style (rotate_half) rotary embedding; cos/sin are computed per step from positions."""

    def __init__(self, head_dim: int, theta: float, scaling: dict[str, Any] | None, max_positions: int) -> None:
        super().__init__()
        inv_freq, self.scale = rope_inv_freq(head_dim, theta, scaling, max_positions)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float().unsqueeze(-1) * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scale).to(dtype), (emb.sin() * self.scale).to(dtype)


def split_qkv_rope(
    qkv: torch.Tensor, heads: int, kv_heads: int, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused projection rows [..., (heads + 2 kv_heads) * d] into q, k, v [..., heads, d], RoPE on q and k."""
    d = cos.shape[-1]
    ops = kernels.native(qkv) if qkv.dim() == 2 and cos.dtype == qkv.dtype else None
    if ops is not None:
        return tuple(ops.rope_qkv(qkv.contiguous(), cos.contiguous(), sin.contiguous(), heads, kv_heads))
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    q = apply_rope(q.unflatten(-1, (heads, d)), cos, sin)
    k = apply_rope(k.unflatten(-1, (kv_heads, d)), cos, sin)
    return q, k, v.unflatten(-1, (kv_heads, d))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [..., tokens, heads, head_dim]; cos/sin: [..., tokens, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.unsqueeze(-2) + rotated * sin.unsqueeze(-2)
