"""Read and validate a LoopCoder `config.json` and its `generation_config.json`.

A config that cannot work fails here, at load, with the field and value named, rather
than as a shape error deep inside the first forward pass.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ConfigError(ValueError):
    """A config.json that cannot describe a working LoopCoder."""


@dataclass
class LoopCoderConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    loop_num: int = 2
    loop_window_size: int = 64
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    torch_dtype: str = "bfloat16"
    eos_token_ids: list[int] = field(default_factory=list)

    @property
    def num_gqa_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> LoopCoderConfig:
        model_type = raw.get("model_type")
        archs = raw.get("architectures") or []
        if model_type not in ("iquestloopcoder", "llama") and "IQuestLoopCoderForCausalLM" not in archs:
            raise ConfigError(f"model_type {model_type!r} is not a LoopCoder (expected 'iquestloopcoder')")
        if model_type == "llama" and "loop_num" not in raw:
            raise ConfigError("model_type 'llama' without loop_num: not a LoopCoder config")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        for name in required:
            _positive_int(name, raw.get(name))
        heads = raw["num_attention_heads"]
        kv_heads = raw.get("num_key_value_heads")
        kv_heads = heads if kv_heads is None else _positive_int("num_key_value_heads", kv_heads)
        if heads % kv_heads:
            raise ConfigError(
                f"num_attention_heads {heads} is not divisible by num_key_value_heads {kv_heads}"
            )
        head_dim = raw.get("head_dim")
        if head_dim is None:
            if raw["hidden_size"] % heads:
                raise ConfigError(f"hidden_size {raw['hidden_size']} is not divisible by num_attention_heads {heads}")
            head_dim = raw["hidden_size"] // heads
        head_dim = _positive_int("head_dim", head_dim)
        if head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {head_dim}")
        loop_num = _positive_int("loop_num", raw.get("loop_num", 2))
        window = _positive_int("loop_window_size", raw.get("loop_window_size", 64))
        rope_scaling = _check_rope_scaling(raw.get("rope_scaling"))
        dtype = raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"
        if dtype not in DTYPES:
            raise ConfigError(f"torch_dtype {dtype!r} is not one of {sorted(DTYPES)}")
        eos = raw.get("eos_token_id")
        return cls(
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            loop_num=loop_num,
            loop_window_size=window,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
            rope_theta=float(raw.get("rope_theta", 10000.0)),
            rope_scaling=rope_scaling,
            max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            torch_dtype=dtype,
            eos_token_ids=_as_id_list(eos),
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> LoopCoderConfig:
        """Read `config.json` from a checkpoint folder, and its generation config's eos ids."""
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"no config.json in {path}")
        try:
            raw = json.loads(config_file.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{config_file} is not valid JSON: {e}") from None
        config = cls.from_dict(raw)
        generation = read_generation_config(path)
        eos = _as_id_list(generation.get("eos_token_id"))
        config.eos_token_ids = sorted(set(config.eos_token_ids) | set(eos))
        return config


def read_generation_config(path: str | Path) -> dict[str, Any]:
    """The checkpoint's `generation_config.json` (empty when absent)."""
    file = Path(path) / "generation_config.json"
    return json.loads(file.read_text()) if file.is_file() else {}


def _positive_int(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"config field {name} must be a positive integer, got {value!r}")
    return value


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _check_rope_scaling(scaling: dict[str, Any] | None) -> dict[str, Any] | None:
    if not scaling:
        return None
    scaling = dict(scaling)
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"rope_scaling.rope_type {rope_type!r} is not one of {list(ROPE_TYPES)}")
    scaling["rope_type"] = rope_type
    if rope_type != "default":
        factor = scaling.get("factor")
        if not isinstance(factor, (int, float)) or factor <= 0:
            raise ConfigError(f"rope_scaling.factor must be a positive number, got {factor!r}")
    if rope_type == "llama3":
        for name in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if name not in scaling:
                raise ConfigError(f"rope_scaling of type llama3 needs {name}")
    return scaling
