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
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def specs(self, prefix: str) -> list[WeightSpec]:
        return [WeightSpec(f"{prefix}.weight", tuple(self.weight.shape), self.weight, slice(None))]


class ColumnParallelLinear(nn.Module):
    """y = x W^T with W's output rows split over ranks; several checkpoint tensors may be fused.

    `parts` lists (checkpoint suffix, full rows, this rank's row range) in fused order.
    """

    def __init__(self, in_features: int, parts: list[tuple[str, int, tuple[int, int]]], dtype: torch.dtype) -> None:
        super().__init__()
        self.parts = parts
        self.in_features = in_features
        rows = sum(stop - start for _, _, (start, stop) in parts)
        self.weight = nn.Parameter(torch.empty(rows, in_features, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def specs(self, prefix: str) -> list[WeightSpec]:
        out, offset = [], 0
        for suffix, full_rows, (start, stop) in self.parts:
            rows = slice(offset, offset + stop - start)
            out.append(WeightSpec(f"{prefix}.{suffix}.weight", (full_rows, self.in_features), self.weight, rows, 0, start, stop))
            offset += stop - start
        return out


class RowParallelLinear(nn.Module):
    """y = x W^T with W's input columns split over ranks; partial sums are all-reduced."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features = in_features
        self.start, self.stop = shard_range(in_features)
        self.weight = nn.Parameter(torch.empty(out_features, self.stop - self.start, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(F.linear(x, self.weight))

    def specs(self, name: str) -> list[WeightSpec]:
        shape = (self.weight.shape[0], self.in_features)
        return [WeightSpec(f"{name}.weight", shape, self.weight, slice(None), 1, self.start, self.stop)]


class VocabParallelEmbedding(nn.Module):
    """Embedding rows split over ranks by vocabulary; the last shard is zero-padded."""

    def __init__(self, vocab_size: int, dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        per_rank = math.ceil(vocab_size / tp_size())
        self.start = tp_rank() * per_rank
        self.stop = min(self.start + per_rank, vocab_size)
        self.weight = nn.Parameter(torch.zeros(per_rank, dim, dtype=dtype), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if tp_size() == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return all_reduce(out.masked_fill(outside.unsqueeze(-1), 0))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states times the (vocab-sharded) matrix, gathered to the full vocabulary."""
        return all_gather_last_dim(F.linear(hidden, self.weight))[..., : self.vocab_size]

    def specs(self, name: str) -> list[WeightSpec]:
        shape = (self.vocab_size, self.weight.shape[1])
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)

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


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [..., tokens, heads, head_dim]; cos/sin: [..., tokens, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.unsqueeze(-2) + rotated * sin.unsqueeze(-2)
