"""The benchmarked model shapes, random checkpoints of them, and what a token costs on them.

Bytes and FLOPs are counted from the model's own parameter list, so they follow the config:
decode streams every layer's weights once per loop plus the head once per token; prefill does
2 FLOPs per weight per loop per token, plus the attention products that are not masked out.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from loopcoder.config import LoopCoderConfig
from loopcoder.model.loopcoder import LoopCoderForCausalLM

# A LoopCoder shaped like a ~0.5B model (the benchmark shape).
HALF_B = {
    "architectures": ["IQuestLoopCoderForCausalLM"], "model_type": "iquestloopcoder",
    "vocab_size": 76800, "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 24,
    "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 64, "loop_num": 2, "loop_window_size": 64,
    "max_position_embeddings": 4096, "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "eos_token_id": [2],
}


def write_random_checkpoint(folder: Path, config: dict, seed: int = 0) -> Path:
    """A bf16 safetensors checkpoint of `config` with random weights (reused when already written)."""
    folder.mkdir(parents=True, exist_ok=True)
    done = folder / "config.json"
    if done.is_file() and json.loads(done.read_text()) == config and (folder / "model.safetensors").is_file():
        return folder
    model = LoopCoderForCausalLM(LoopCoderConfig.from_dict(config), torch.bfloat16)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for spec in model.weight_specs():
        if spec.name in tensors:
            continue
        if spec.name.endswith("norm.weight"):
            tensors[spec.name] = torch.ones(spec.shape, dtype=torch.bfloat16)
        elif "gate_projections" in spec.name and spec.name.endswith("bias"):
            tensors[spec.name] = torch.full(spec.shape, 2.0, dtype=torch.bfloat16)
        else:
            tensors[spec.name] = (torch.randn(spec.shape, generator=gen) * 0.02).to(torch.bfloat16)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    done.write_text(json.dumps(config))
    return folder


def weight_counts(config: LoopCoderConfig) -> tuple[int, int]:
    """(parameters of one pass over the layers, parameters of the head)."""
    h, d, inter = config.hidden_size, config.head_dim, config.intermediate_size
    attn = h * (config.num_attention_heads + 2 * config.num_key_value_heads) * d + config.num_attention_heads * d * h
    layer = attn + 3 * h * inter + 2 * h
    return config.num_hidden_layers * layer, config.vocab_size * h


def decode_bytes_per_token(config: LoopCoderConfig, bytes_per_weight: float) -> float:
    """Weight bytes one decoded token streams: the layers once per loop, the head once."""
    layers, head = weight_counts(config)
    return (config.loop_num * layers + head) * bytes_per_weight


def prefill_flops_per_token(config: LoopCoderConfig, prompt_len: int) -> float:
    """FLOPs per prompt token: every loop's matmuls, the causal and window attention products, the head once per prompt."""
    layers, head = weight_counts(config)
    per_key = 4 * config.num_attention_heads * config.head_dim * config.num_hidden_layers  # q.k and p.v, per layer
    causal_keys = (prompt_len + 1) / 2
    window_keys = sum(min(i + 1, config.loop_window_size) for i in range(prompt_len)) / prompt_len
    attention = per_key * (config.loop_num * causal_keys + (config.loop_num - 1) * window_keys)
    return 2 * config.loop_num * layers + attention + 2 * head / prompt_len

