"""config.json: which configs are LoopCoders, head_dim, every RoPE scaling type, loop_num, and clear failures."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from loopcoder.config import ConfigError, LoopCoderConfig
from loopcoder.loader import load_model
from loopcoder.model.layers import RotaryEmbedding, rope_inv_freq
from loopcoder.model.loopcoder import LoopCoderForCausalLM
from test_loader import TINY, tiny_config, write_checkpoint

IDS = torch.tensor([[5, 17, 3, 88, 42, 42, 9, 61, 20, 2, 77, 13, 50, 31]])


# -- what is a LoopCoder config -------------------------------------------------------------------


@pytest.mark.parametrize(
    "labels",
    [
        {"model_type": "iquestloopcoder", "architectures": None},
        {"model_type": None, "architectures": ["IQuestLoopCoderForCausalLM"]},
        {"model_type": "something-else", "architectures": ["IQuestLoopCoderForCausalLM"]},
        {"model_type": "llama", "architectures": ["LlamaForCausalLM"]},
    ],
    ids=["model_type", "architectures", "architectures-only", "relabelled-llama"],
)
def test_accepted_labels(labels: dict[str, Any]) -> None:
    """model_type iquestloopcoder, the IQuest architecture, or `llama` carrying loop_num and loop_window_size."""
    raw = tiny_config(**labels, loop_num=3, loop_window_size=7)
    config = LoopCoderConfig.from_dict(raw)
    assert (config.loop_num, config.loop_window_size) == (3, 7)
    assert (config.num_attention_heads, config.num_key_value_heads, config.num_gqa_groups) == (4, 2, 2)


def test_plain_llama_is_refused() -> None:
    raw = tiny_config(model_type="llama", architectures=["LlamaForCausalLM"], loop_num=None, loop_window_size=None)
    with pytest.raises(ConfigError, match="model_type 'llama' without loop_num: not a LoopCoder config"):
        LoopCoderConfig.from_dict(raw)


def test_other_model_type_is_refused() -> None:
    raw = tiny_config(model_type="qwen2", architectures=["Qwen2ForCausalLM"])
    with pytest.raises(ConfigError, match=r"model_type 'qwen2' is not a LoopCoder \(expected 'iquestloopcoder'\)"):
        LoopCoderConfig.from_dict(raw)


def test_defaults() -> None:
    """Absent optional fields: loop_num 2, window 64, MHA when num_key_value_heads is absent, bf16."""
    raw = tiny_config(loop_num=None, loop_window_size=None, num_key_value_heads=None, head_dim=None, torch_dtype=None, eos_token_id=None)
    config = LoopCoderConfig.from_dict(raw)
    assert (config.loop_num, config.loop_window_size, config.num_key_value_heads, config.head_dim) == (2, 64, 4, 16)
    assert (config.torch_dtype, config.rope_scaling, config.eos_token_ids) == ("bfloat16", None, [])


def test_golden_configs_read() -> None:
    """The configs the official code wrote (transformers 4.56: `dtype`, not `torch_dtype`)."""
    from conftest import GOLDEN

    config = LoopCoderConfig.from_pretrained(GOLDEN / "tiny-loop3-llama3-bf16-sharded")
    assert (config.loop_num, config.loop_window_size, config.torch_dtype) == (3, 4, "bfloat16")
    assert config.rope_scaling is not None and config.rope_scaling["rope_type"] == "llama3"
    assert LoopCoderConfig.from_pretrained(GOLDEN / "tiny-tied-w64").tie_word_embeddings


# -- head_dim -------------------------------------------------------------------------------------


def test_head_dim_honoured_when_not_hidden_over_heads(tmp_path: Path) -> None:
    """head_dim 32 with hidden 64 and 4 heads: projections are [4*32, 64], gates [4, 32], and it runs."""
    raw = tiny_config(head_dim=32)
    config = LoopCoderConfig.from_dict(raw)
    assert config.head_dim == 32 != raw["hidden_size"] // raw["num_attention_heads"]
    write_checkpoint(tmp_path, raw)
    model = load_model(tmp_path, dtype="float32")
    shapes = {s.name: s.shape for s in model.weight_specs()}
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (128, 64)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (64, 64)
    assert shapes["model.layers.0.self_attn.o_proj.weight"] == (64, 128)
    assert shapes["model.gate_projections.1.weight"] == (4, 32)
    assert model.rotary.inv_freq.shape == (16,)
    with torch.no_grad():
        logits = model.forward_dense(IDS)
    assert logits.shape == (1, IDS.shape[1], 97) and torch.isfinite(logits).all()


def test_head_dim_absent_is_hidden_over_heads() -> None:
    assert LoopCoderConfig.from_dict(tiny_config(head_dim=None, hidden_size=96, num_attention_heads=4)).head_dim == 24


def test_head_dim_must_be_even() -> None:
    with pytest.raises(ConfigError, match="head_dim must be even for rotary embeddings, got 15"):
        LoopCoderConfig.from_dict(tiny_config(head_dim=15))


def test_hidden_not_divisible_by_heads_without_head_dim() -> None:
    with pytest.raises(ConfigError, match="hidden_size 66 is not divisible by num_attention_heads 4"):
        LoopCoderConfig.from_dict(tiny_config(head_dim=None, hidden_size=66))


# -- RoPE scaling -----------------------------------------------------------------------------------

D, THETA, MAX_POS = 16, 10000.0, 512
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
SCALINGS = {
    "default": {"rope_type": "default"},
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": LLAMA3,
    "yarn": {"rope_type": "yarn", "factor": 4.0},
}


def rotary_for(scaling: dict[str, Any] | None) -> RotaryEmbedding:
    """The RotaryEmbedding the model builds for a config with this rope_scaling."""
    config = LoopCoderConfig.from_dict(tiny_config(rope_scaling=scaling))
    model = LoopCoderForCausalLM(config)
    assert model.rotary.inv_freq.shape == (D // 2,)
    return RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling, config.max_position_embeddings)


def default_inv_freq() -> list[float]:
    return [1.0 / THETA ** (2 * i / D) for i in range(D // 2)]


@pytest.mark.parametrize("rope_type", list(SCALINGS))
def test_every_rope_type_builds(rope_type: str) -> None:
    """Each rope type gives D/2 finite, positive, non-increasing inverse frequencies."""
    rotary = rotary_for(SCALINGS[rope_type])
    inv = rotary.inv_freq
    assert inv.shape == (D // 2,) and torch.isfinite(inv).all() and (inv > 0).all()
    assert (inv[1:] <= inv[:-1]).all()
    cos, sin = rotary.cos_sin(torch.arange(6), torch.float32)
    assert cos.shape == sin.shape == (6, D)


def test_no_scaling_and_default_are_the_plain_frequencies() -> None:
    want = torch.tensor(default_inv_freq())
    for scaling in (None, {"rope_type": "default"}, {"type": "default"}):
        rotary = rotary_for(scaling)
        assert torch.allclose(rotary.inv_freq, want, rtol=1e-6, atol=0) and rotary.scale == 1.0


def test_linear_is_default_over_factor_exactly() -> None:
    """The old `type` key is read like `rope_type`."""
    default = rotary_for(None).inv_freq
    for key in ("rope_type", "type"):
        linear = rotary_for({key: "linear", "factor": 4.0})
        assert torch.equal(linear.inv_freq, default / 4.0) and linear.scale == 1.0


def test_dynamic_is_ntk_base_at_the_longest_context() -> None:
    """Dynamic NTK computed once for the longest context (factor x original length): base' = theta*(f*f - f + 1)^(D/(D-2))."""
    factor = 2.0
    rotary = rotary_for({"rope_type": "dynamic", "factor": factor, "original_max_position_embeddings": MAX_POS})
    base = THETA * (factor * factor - factor + 1) ** (D / (D - 2))
    want = torch.tensor([1.0 / base ** (2 * i / D) for i in range(D // 2)])
    assert torch.allclose(rotary.inv_freq, want, rtol=1e-5, atol=0)
    assert rotary.inv_freq[0] == 1.0 and (rotary.inv_freq[1:] < torch.tensor(default_inv_freq())[1:]).all()


def hf_llama3(freq: float, s: dict[str, Any]) -> float:
    """One frequency by Hugging Face's llama3 rule, re-derived per frequency in float64."""
    factor, low, high, old = s["factor"], s["low_freq_factor"], s["high_freq_factor"], s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / freq
    if wavelen < old / high:
        return freq
    if wavelen > old / low:
        return freq / factor
    smooth = (old / wavelen - low) / (high - low)
    return (1 - smooth) * freq / factor + smooth * freq


def test_llama3_matches_the_hf_rule_in_all_three_bands() -> None:
    """With old length 32: frequency 0 is high (unchanged), 1 is medium (smoothed), 2.. are low (divided by factor)."""
    rotary = rotary_for(LLAMA3)
    freqs = default_inv_freq()
    want = [hf_llama3(f, LLAMA3) for f in freqs]
    assert want[0] == freqs[0] and want[2] == freqs[2] / 8.0 and freqs[1] / 8.0 < want[1] < freqs[1]
    for i in (0, 1, 2, D // 2 - 1):
        assert rotary.inv_freq[i].item() == pytest.approx(want[i], rel=1e-6)


def test_llama3_requires_its_fields() -> None:
    scaling = {k: v for k, v in LLAMA3.items() if k != "low_freq_factor"}
    with pytest.raises(ConfigError, match="rope_scaling of type llama3 needs low_freq_factor"):
        LoopCoderConfig.from_dict(tiny_config(rope_scaling=scaling))


@pytest.mark.parametrize("factor", [2.0, 4.0, 40.0])
def test_yarn_attention_factor(factor: float) -> None:
    """yarn scales cos/sin by 0.1 ln(factor) + 1; fastest frequency kept, slowest divided by factor."""
    rotary = rotary_for({"rope_type": "yarn", "factor": factor})
    assert rotary.scale == pytest.approx(0.1 * math.log(factor) + 1)
    cos, _ = rotary.cos_sin(torch.tensor([0]), torch.float32)
    assert torch.allclose(cos, torch.full((1, D), 0.1 * math.log(factor) + 1))
    freqs = default_inv_freq()
    assert rotary.inv_freq[0].item() == pytest.approx(freqs[0], rel=1e-6)
    assert rotary.inv_freq[-1].item() == pytest.approx(freqs[-1] / factor, rel=1e-5)


def test_yarn_explicit_attention_factor_wins() -> None:
    assert rotary_for({"rope_type": "yarn", "factor": 4.0, "attention_factor": 1.5}).scale == 1.5


def test_rope_inv_freq_function_directly() -> None:
    inv, scale = rope_inv_freq(D, THETA, {"rope_type": "linear", "factor": 2.0}, MAX_POS)
    assert torch.equal(inv, rope_inv_freq(D, THETA, None, MAX_POS)[0] / 2.0) and scale == 1.0


def test_unknown_rope_type_is_named() -> None:
    with pytest.raises(ConfigError, match=r"rope_scaling\.rope_type 'ntk-by-parts' is not one of \['default', 'linear', 'dynamic'"):
        LoopCoderConfig.from_dict(tiny_config(rope_scaling={"rope_type": "ntk-by-parts", "factor": 2.0}))


@pytest.mark.parametrize("factor", [None, 0, -2.0, "4"])
def test_bad_rope_factor_is_named(factor: Any) -> None:
    with pytest.raises(ConfigError, match=rf"rope_scaling\.factor must be a positive number, got {factor!r}"):
        LoopCoderConfig.from_dict(tiny_config(rope_scaling={"rope_type": "linear", "factor": factor}))


# -- loop_num ---------------------------------------------------------------------------------------


def test_loop_num_1_and_3_run_and_agree_on_loop_0(tmp_path: Path) -> None:
    """loop_num 1 is a plain Llama pass: the same logits as a loop_num 3 model stopped after loop 0."""
    raw3 = tiny_config(loop_num=3, loop_window_size=4)
    tensors = write_checkpoint(tmp_path / "three", raw3, seed=3)
    write_checkpoint(tmp_path / "one", tiny_config(loop_num=1), tensors={n: t for n, t in tensors.items() if ".gate_projections." not in n})
    three = load_model(tmp_path / "three", dtype="float32")
    one = load_model(tmp_path / "one", dtype="float32")
    assert not any(".gate_projections." in s.name for s in one.weight_specs())
    with torch.no_grad():
        logits1, logits3 = one.forward_dense(IDS), three.forward_dense(IDS)
        assert torch.equal(logits1, three.forward_dense(IDS, loops=1))
        assert torch.equal(three.forward_dense(IDS, loops=3), logits3)
        # Each later loop changes the result.
        assert (logits3 - three.forward_dense(IDS, loops=2)).abs().max() > 1e-2
        assert (three.forward_dense(IDS, loops=2) - logits1).abs().max() > 1e-2
    assert logits1.shape == logits3.shape == (1, IDS.shape[1], 97)


@pytest.mark.parametrize("loop_num", [1, 2, 3, 5])
def test_any_loop_num_from_one(tmp_path: Path, loop_num: int) -> None:
    raw = tiny_config(loop_num=loop_num, num_hidden_layers=1)
    write_checkpoint(tmp_path, raw)
    model = load_model(tmp_path, dtype="float32")
    assert model.config.loop_num == loop_num
    with torch.no_grad():
        assert torch.isfinite(model.forward_dense(IDS)).all()


# -- failures with the field and value named --------------------------------------------------------


def test_heads_not_divisible_by_kv_heads() -> None:
    with pytest.raises(ConfigError, match="num_attention_heads 6 is not divisible by num_key_value_heads 4"):
        LoopCoderConfig.from_dict(tiny_config(num_attention_heads=6, num_key_value_heads=4, head_dim=16))


BAD_SHAPES = [("num_key_value_heads", -2), ("num_key_value_heads", 0), ("head_dim", -16), ("head_dim", 16.0)]


@pytest.mark.parametrize(("name", "value"), BAD_SHAPES)
def test_bad_kv_heads_and_head_dim_are_named(name: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=rf"{name}.*{value!r}"):
        LoopCoderConfig.from_dict(tiny_config(**{name: value}))


@pytest.mark.parametrize("name", ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"])
def test_missing_size_field_is_named(name: str) -> None:
    with pytest.raises(ConfigError, match=rf"config field {name} must be a positive integer, got None"):
        LoopCoderConfig.from_dict(tiny_config(**{name: None}))


@pytest.mark.parametrize("value", [0, -8, 64.0, "64", True])
def test_bad_size_field_value_is_named(value: Any) -> None:
    with pytest.raises(ConfigError, match=rf"config field hidden_size must be a positive integer, got {value!r}"):
        LoopCoderConfig.from_dict(tiny_config(hidden_size=value))


@pytest.mark.parametrize("window", [0, -3, "5", 2.5])
def test_loop_window_size_below_one_is_named(window: Any) -> None:
    with pytest.raises(ConfigError, match=rf"config field loop_window_size must be a positive integer, got {window!r}"):
        LoopCoderConfig.from_dict(tiny_config(loop_window_size=window))


@pytest.mark.parametrize("loop_num", [0, -1, 2.0])
def test_loop_num_below_one_is_named(loop_num: Any) -> None:
    with pytest.raises(ConfigError, match=rf"config field loop_num must be a positive integer, got {loop_num!r}"):
        LoopCoderConfig.from_dict(tiny_config(loop_num=loop_num))


def test_unknown_dtype_is_named() -> None:
    with pytest.raises(ConfigError, match=r"torch_dtype 'float8_e4m3fn' is not one of \['bfloat16', 'float16', 'float32'\]"):
        LoopCoderConfig.from_dict(tiny_config(torch_dtype="float8_e4m3fn"))


def test_window_of_one_is_valid() -> None:
    assert LoopCoderConfig.from_dict(tiny_config(loop_window_size=1)).loop_window_size == 1


def test_config_json_that_is_not_json(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config\.json is not valid JSON"):
        LoopCoderConfig.from_pretrained(tmp_path)


# -- generation_config.json -------------------------------------------------------------------------


def test_generation_config_eos_list_is_merged(tmp_path: Path) -> None:
    """config eos 2 plus generation_config's [2, 75864, 75869] (the release's list) -> all three, once each."""
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 75864, 75869], "top_k": 20}))
    assert LoopCoderConfig.from_pretrained(tmp_path).eos_token_ids == [2, 75864, 75869]


def test_eos_from_config_list_and_generation_int(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(tiny_config(eos_token_id=[75864, 7])))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 75869}))
    assert LoopCoderConfig.from_pretrained(tmp_path).eos_token_ids == [7, 75864, 75869]


def test_no_generation_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    assert LoopCoderConfig.from_pretrained(tmp_path).eos_token_ids == [2]
