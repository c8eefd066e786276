"""Weight-only int8 quantization, applied at load to a bf16 (or fp32) checkpoint.

Each row of every linear weight (projections, MLP, embedding and head) becomes int8 values q
and one fp32 scale s = max|w| / 127, so w ~ s * q with per-output-channel precision. Decode
streams half the bytes of bf16 per token, and the looped model streams its weights once per
loop, so batch-1 decode speeds up by nearly that factor. Activations, norms, gates and the KV
cache keep the model dtype; products accumulate in fp32.
"""

from __future__ import annotations

import torch
from torch import nn

from loopcoder import kernels
from loopcoder.model.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

METHODS = ("int8",)
_CHUNK_ROWS = 4096


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [N, K], scale fp32 [N]) with weight ~ scale[:, None] * q, rounding to nearest (ties to even)."""
    ops = kernels.native(weight)
    if ops is not None and weight.is_contiguous():
        return tuple(ops.quantize_int8(weight))
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scale = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    for start in range(0, weight.shape[0], _CHUNK_ROWS):  # bounded fp32 temporaries for the large embedding
        w = weight[start : start + _CHUNK_ROWS].float()
        s = w.abs().amax(dim=1) / 127
        s = torch.where(s > 0, s, torch.ones_like(s))
        q[start : start + _CHUNK_ROWS] = torch.round(w / s[:, None]).clamp_(-127, 127).to(torch.int8)
        scale[start : start + _CHUNK_ROWS] = s
    return q, scale


def quantize_model(model: nn.Module, method: str | None) -> None:
    """Quantize every linear weight of `model` in place (`method` None: leave it as loaded)."""
    if method is None:
        return
    if method not in METHODS:
        raise ValueError(f"quantization {method!r} is not one of {list(METHODS)}")
    for module in model.modules():
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)):
            q, scale = quantize_int8(module.weight.data)
            module.weight = nn.Parameter(q, requires_grad=False)
            module.scale = scale
