"""The demo model shipped in the package: its files, its Hugging Face layout, and pinned greedy output."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from loopcoder.config import LoopCoderConfig
from loopcoder.demo import DEMO_DIR
from loopcoder.loader import load_model

FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
PROMPT = "def fibonacci(n):"
# Greedy continuation (8 tokens, float32) of PROMPT: regenerate when the demo model is retrained.
PINNED = [273, 364, 668, 275, 656, 375, 275, 656]


@pytest.fixture(scope="module")
def model():
    return load_model(DEMO_DIR, dtype="float32")


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(DEMO_DIR / "tokenizer.json"))


def test_files_small_and_config_valid():
    assert sorted(p.name for p in DEMO_DIR.iterdir() if p.suffix in (".json", ".safetensors")) == FILES
    assert sum((DEMO_DIR / name).stat().st_size for name in FILES) <= 30 * 10**6
    raw = json.loads((DEMO_DIR / "config.json").read_text())
    assert raw["architectures"] == ["IQuestLoopCoderForCausalLM"] and raw["model_type"] == "iquestloopcoder"
    config = LoopCoderConfig.from_pretrained(DEMO_DIR)
    assert config.loop_num == 2
    assert config.loop_window_size < 256 and config.num_key_value_heads < config.num_attention_heads


def test_special_tokens_have_the_real_roles(tokenizer):
    ids = {t: tokenizer.token_to_id(t) for t in ["<|endoftext|>", "<|im_end|>", "<|im_start|>", "<|fim_prefix|>",
                                                  "<|fim_middle|>", "<|fim_suffix|>", "<tool_call>", "</think>"]}
    assert None not in ids.values()
    tok_config = json.loads((DEMO_DIR / "tokenizer_config.json").read_text())
    assert tok_config["eos_token"] == "<|im_end|>" and tok_config["pad_token"] == "<|endoftext|>"
    assert "<|im_start|>" in tok_config["chat_template"]
    generation = json.loads((DEMO_DIR / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [ids["<|endoftext|>"], ids["<|im_end|>"]]
    assert (generation["temperature"], generation["top_p"], generation["top_k"]) == (0.6, 0.85, 20)
    # One id per special token, whatever the text around it.
    assert tokenizer.encode("x<|fim_prefix|>y<tool_call>").ids[1::2] == [ids["<|fim_prefix|>"], ids["<tool_call>"]]


def test_checkpoint_has_hf_names_and_loads_unchanged(model):
    tensors = load_file(DEMO_DIR / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert "model.layers.0.self_attn.k_proj.weight" in tensors and "model.gate_projections.0.bias" in tensors
    assert not any("qkv" in name or "gate_up" in name for name in tensors)
    for spec in model.weight_specs():
        assert torch.equal(spec.param[spec.rows], tensors[spec.name].float()), spec.name
    # q/k/v are fused in the model, in that order.
    q, k, v = (tensors[f"model.layers.0.self_attn.{p}_proj.weight"].float() for p in "qkv")
    assert torch.equal(model.layers[0].self_attn.qkv_proj.weight, torch.cat([q, k, v]))


def test_greedy_continuation_is_pinned(model, tokenizer):
    ids = torch.tensor([tokenizer.encode(PROMPT).ids])
    with torch.inference_mode():
        for _ in range(8):
            ids = torch.cat([ids, model.forward_dense(ids)[:, -1:].argmax(-1)], dim=1)
    new = ids[0, -8:].tolist()
    assert new == PINNED, tokenizer.decode(new)


def test_readme_first_command_prints_a_completion():
    """`loopcoder generate "def fibonacci(n):"` with no model uses the demo and prints prompt + completion."""
    done = subprocess.run(
        [sys.executable, "-m", "loopcoder.cli", "generate", PROMPT, "--max-tokens", "16"],
        capture_output=True, text=True, timeout=300, check=True,
    )
    assert done.stdout.startswith(PROMPT) and len(done.stdout.strip()) > len(PROMPT) + 5
