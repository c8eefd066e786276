"""The IQuest LoopCoder model: embed, `loop_num` passes over the same layers, norm, head.

Loop 0 is a plain Llama pass whose keys/values become the global state. Each later loop
mixes, per head, attention over loop 0's keys/values (A) with window attention over its own
(B): o_proj(g * A + (1 - g) * B), where g = sigmoid(q . w_gate + b_gate) is computed from
the post-RoPE query of that loop (see DESIGN.md).
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import nn

from loopcoder.config import LoopCoderConfig
from loopcoder.model.attention import DenseAttention, PagedAttention
from loopcoder.model.kv_cache import kv_heads_per_rank
from loopcoder.model.layers import (
    ColumnParallelLinear,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    SwiGLU,
    VocabParallelEmbedding,
    WeightSpec,
    shard_range,
    split_qkv_rope,
)
from loopcoder.parallel import tp_rank, tp_size

Attention = DenseAttention | PagedAttention


def check_tensor_parallel(config: LoopCoderConfig, size: int) -> None:
    """Refuse a tensor-parallel size the model's heads cannot be split over."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    if heads % size:
        raise ValueError(f"num_attention_heads {heads} is not divisible by tensor parallel size {size}")
    if kv_heads % size and size % kv_heads:
        raise ValueError(f"num_key_value_heads {kv_heads} and tensor parallel size {size} do not divide each other")
    if config.intermediate_size % size:
        raise ValueError(f"intermediate_size {config.intermediate_size} is not divisible by tensor parallel size {size}")


def kv_head_range(config: LoopCoderConfig) -> tuple[int, int]:
    kv_heads = config.num_key_value_heads
    if kv_heads >= tp_size():
        return shard_range(kv_heads)
    first = tp_rank() * kv_heads // tp_size()
    return first, first + 1


class LoopAttentionLayer(nn.Module):
    """Projections of one layer's attention; the attention itself is the backend's."""

    def __init__(self, config: LoopCoderConfig, dtype: torch.dtype) -> None:
        super().__init__()
        d = config.head_dim
        self.head_dim = d
        self.heads = config.num_attention_heads // tp_size()
        self.kv_heads = kv_heads_per_rank(config)
        q_start, q_stop = shard_range(config.num_attention_heads)
        kv_start, kv_stop = kv_head_range(config)
        self.qkv_proj = ColumnParallelLinear(
            config.hidden_size,
            [
                ("q_proj", config.num_attention_heads * d, (q_start * d, q_stop * d)),
                ("k_proj", config.num_key_value_heads * d, (kv_start * d, kv_stop * d)),
                ("v_proj", config.num_key_value_heads * d, (kv_start * d, kv_stop * d)),
            ],
            dtype,
        )
        self.o_proj = RowParallelLinear(config.num_attention_heads * d, config.hidden_size, dtype)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return split_qkv_rope(self.qkv_proj(x), self.heads, self.kv_heads, cos, sin)


class LoopGate(nn.Module):
    """Per-head mixing gate of the later loops: g = sigmoid(sum_d q[h, d] * w[h, d] + b[h])."""

    def __init__(self, config: LoopCoderConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.heads = config.num_attention_heads
        self.start, self.stop = shard_range(self.heads)
        self.weight = nn.Parameter(torch.empty(self.stop - self.start, config.head_dim, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(self.stop - self.start, dtype=dtype), requires_grad=False)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        logit = (q.float() * self.weight.float()).sum(-1) + self.bias.float()
        return torch.sigmoid(logit).to(q.dtype).unsqueeze(-1)

    def mix(self, q: torch.Tensor, global_out: torch.Tensor, local_out: torch.Tensor) -> torch.Tensor:
        """g * global + (1 - g) * local, per head."""
        g = self(q)
        return g * global_out + (1 - g) * local_out

    def specs(self, prefix: str) -> list[WeightSpec]:
        return [
            WeightSpec(f"{prefix}.weight", (self.heads, self.weight.shape[1]), self.weight, slice(None), 0, self.start, self.stop),
            WeightSpec(f"{prefix}.bias", (self.heads,), self.bias, slice(None), 0, self.start, self.stop),
        ]


class DecoderLayer(nn.Module):
    def __init__(self, config: LoopCoderConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.self_attn = LoopAttentionLayer(config, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size, dtype)

    def forward(
        self, h: torch.Tensor, index: int, loop: int, gate: LoopGate, attn: Attention, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        q, k, v = self.self_attn.qkv(self.input_layernorm(h), cos, sin)
        mixed = attn.first_loop(index, q, k, v) if loop == 0 else attn.gated_later_loop(index, loop, q, k, v, gate)
        h = self.self_attn.o_proj(mixed.flatten(-2), residual=h)
        return self.mlp(self.post_attention_layernorm(h), residual=h)

    def native_decode(
        self, ops: ModuleType, h: torch.Tensor, index: int, loop: int, gate: LoopGate, attn: PagedAttention,
        cos: torch.Tensor, sin: torch.Tensor,
    ) -> torch.Tensor | None:
        """The same layer in one native call for a decode-only step (None where its weights are not all laid out alike)."""
        weights = self._decode_weights()
        if weights is None:
            return None
        return ops.decode_layer(h, cos, sin, *weights, *attn.decode_layer_args(index, loop, gate))

    def _decode_weights(self) -> tuple | None:
        """decode_layer's arguments from the layer's weights up to its heads, built again only when a matrix was
        replaced (packed, quantized): a decode step calls this for every layer and loop, and looking the tensors up
        each time took ~5% of an int8 step."""
        cached = self.__dict__.get("_decode_cache")
        if cached is not None and all(w.weight is m for w, m in zip(cached[0], cached[1], strict=True)):
            return cached[2]
        linears = (self.self_attn.qkv_proj, self.self_attn.o_proj, self.mlp.gate_up_proj, self.mlp.down_proj)
        packed = linears[0].packed
        args = None
        if all(w.packed == packed for w in linears):
            qkv, o, gate_up, down = linears
            args = (
                self.input_layernorm.eps, self.input_layernorm.weight, qkv.weight, qkv.scale, o.weight, o.scale,
                self.post_attention_layernorm.weight, gate_up.weight, gate_up.scale, down.weight, down.scale, packed,
                self.self_attn.heads, self.self_attn.kv_heads,
            )
        self.__dict__["_decode_cache"] = (linears, tuple(w.weight for w in linears), args)
        return args

    def specs(self, prefix: str) -> list[WeightSpec]:
        return [
            *self.input_layernorm.specs(f"{prefix}.input_layernorm"),
            *self.self_attn.qkv_proj.specs(f"{prefix}.self_attn"),
            *self.self_attn.o_proj.specs(f"{prefix}.self_attn.o_proj"),
            *self.post_attention_layernorm.specs(f"{prefix}.post_attention_layernorm"),
            *self.mlp.specs(f"{prefix}.mlp"),
        ]


class LoopCoderForCausalLM(nn.Module):
    def __init__(self, config: LoopCoderConfig, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        check_tensor_parallel(config, tp_size())
        self.config = config
        self.dtype = dtype
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, dtype)
        self.layers = nn.ModuleList(DecoderLayer(config, dtype) for _ in range(config.num_hidden_layers))
        self.gate_projections = nn.ModuleList(LoopGate(config, dtype) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.lm_head = self.embed_tokens if config.tie_word_embeddings else VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, dtype
        )
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling, config.max_position_embeddings)

    def run_loops(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: Attention, loops: int | None = None) -> torch.Tensor:
        """Hidden states after `loops` loops (all of them by default), before the final norm."""
        cos, sin = self.rotary.cos_sin(positions, self.dtype)
        h = self.embed_tokens(input_ids)
        ops = attn.native_decode(h) if isinstance(attn, PagedAttention) else None
        for loop in range(self.config.loop_num if loops is None else loops):
            for index, (layer, gate) in enumerate(zip(self.layers, self.gate_projections, strict=True)):
                fused = None if ops is None else layer.native_decode(ops, h, index, loop, gate, attn, cos, sin)
                h = layer(h, index, loop, gate, attn, cos, sin) if fused is None else fused
        return h

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: PagedAttention) -> torch.Tensor:
        """A flattened engine batch [N] over the paged caches: final hidden states [N, hidden]."""
        return self.run_loops(input_ids, positions, attn)

    def forward_dense(self, input_ids: torch.Tensor, loops: int | None = None) -> torch.Tensor:
        """Logits [B, T, vocab] for whole sequences from position 0, without a cache (training, reference)."""
        seq_len = input_ids.shape[-1]
        positions = torch.arange(seq_len, device=input_ids.device)
        attn = DenseAttention(seq_len, self.config.loop_window_size, input_ids.device)
        return self.compute_logits(self.run_loops(input_ids, positions, attn, loops))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.logits(self.norm(hidden)).float()

    def weight_specs(self) -> list[WeightSpec]:
        """How every checkpoint tensor maps onto this rank's parameters."""
        specs = [*self.embed_tokens.specs("model.embed_tokens"), *self.norm.specs("model.norm")]
        for i, layer in enumerate(self.layers):
            specs += layer.specs(f"model.layers.{i}")
            if self.config.loop_num > 1:
                specs += self.gate_projections[i].specs(f"model.gate_projections.{i}")
        if not self.config.tie_word_embeddings:
            specs += self.lm_head.specs("lm_head")
        return specs
