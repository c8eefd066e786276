"""A tiny LoopCoder checkpoint whose greedy output is known in advance, for the server tests.

The model is a "bigram machine": embeddings are one-hot, every attention and MLP output weight
is zero (so the final hidden state is the current token's embedding) and `lm_head` maps each
token to one successor with logit `MARGIN` (all others 0). Greedy decoding therefore follows a
fixed successor table, while sampling at temperature 1 still strays often enough to tell seeds
apart. Added tokens make two chains free of repeated tokens:

- after the chat template's ``assistant\\n`` the model announces and emits a ``get_weather``
  tool call, then ``<|im_end|>``;
- after ``<|fim_middle|>`` it writes ``return a + b`` and ``<|endoftext|>``.

Every other token leads to a random plain-ASCII token, so ordinary prompts produce
deterministic text that never stops before max_tokens.
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import tokenizers
import torch
from safetensors.torch import save_file

from loopcoder.config import LoopCoderConfig
from loopcoder.model.loopcoder import LoopCoderForCausalLM

IQUEST = Path(__file__).resolve().parents[2] / "shared" / "iquest"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>"]
TAGS = ["<tool_call>", "</tool_call>", "<tools>", "</tools>", "<tool_response>", "</tool_response>", "<think>", "</think>"]
CONTENT = "Let me check the weather."
TOOL_CHAIN = ['\n{"name": ', '"get_weather"', ', "arguments": ', '{"city": ', '"Paris"', ', "days": ', "3}", "}\n"]
CHAT_CHAIN = ["assistant\n", CONTENT, "<tool_call>", *TOOL_CHAIN, "</tool_call>", "<|im_end|>"]
FIM_MIDDLE = "return a + b"
FIM_CHAIN = ["<|fim_middle|>", FIM_MIDDLE, "<|endoftext|>"]
TOOL_ARGUMENTS = '{"city": "Paris", "days": 3}'
MARGIN = 8.0
CORPUS = [
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n",
    "The quick brown fox jumps over the lazy dog. Hello world, it is sunny in Paris today.\n",
    "for i in range(10):\n    total = total + i * 2\n",
]
PLAIN = re.compile(r"^[A-Za-z0-9 _.,()=+:]+$")


def train_tokenizer() -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=360, special_tokens=SPECIALS, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    chain_words = [t for t in CHAT_CHAIN + FIM_CHAIN if t not in SPECIALS and t not in TAGS]
    tok.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False) for t in TAGS + chain_words])
    return tok


def successors(tok: tokenizers.Tokenizer) -> dict[int, int]:
    """The greedy successor of every token id."""
    ids = tok.token_to_id
    vocab = tok.get_vocab_size(with_added_tokens=True)
    added = set(tok.get_added_tokens_decoder())
    plain = [i for i in range(vocab) if i not in added and PLAIN.match(tok.decode([i]))]
    rng = random.Random(0)
    table = {i: rng.choice(plain) for i in range(vocab)}
    for chain in (CHAT_CHAIN, FIM_CHAIN):
        for a, b in zip(chain, chain[1:]):
            table[ids(a)] = ids(b)
    return table


def write_checkpoint(path: Path) -> Path:
    """Tokenizer files, config and bigram-machine weights in Hugging Face layout under `path`."""
    path.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer()
    tok.save(str(path / "tokenizer.json"))
    vocab = tok.get_vocab_size(with_added_tokens=True)
    template = json.loads((IQUEST / "tokenizer_config.json").read_text())["chat_template"]
    tokenizer_config = {
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "clean_up_tokenization_spaces": False, "chat_template": template,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    hidden = -(-vocab // 64) * 64
    config = {
        "architectures": ["IQuestLoopCoderForCausalLM"], "model_type": "iquestloopcoder", "torch_dtype": "float32",
        "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "loop_num": 2, "loop_window_size": 4,
        "max_position_embeddings": 1024, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "eos_token_id": [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")],
    }
    (path / "config.json").write_text(json.dumps(config))
    save_file(bigram_weights(config, successors(tok)), str(path / "model.safetensors"))
    return path


def bigram_weights(raw_config: dict, table: dict[int, int]) -> dict[str, torch.Tensor]:
    model = LoopCoderForCausalLM(LoopCoderConfig.from_dict(raw_config), torch.float32)
    gen = torch.Generator().manual_seed(0)
    tensors = {spec.name: torch.randn(spec.shape, generator=gen) * 0.1 for spec in model.weight_specs()}
    for name in tensors:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            tensors[name].zero_()
        elif name.endswith("norm.weight"):
            tensors[name].fill_(1.0)
    vocab, hidden = raw_config["vocab_size"], raw_config["hidden_size"]
    tensors["model.embed_tokens.weight"] = torch.eye(vocab, hidden)
    head = torch.zeros(vocab, hidden)
    for token, nxt in table.items():
        head[nxt, token] = MARGIN / hidden**0.5  # the final RMSNorm scales a one-hot row by sqrt(hidden)
    tensors["lm_head.weight"] = head
    return tensors


def greedy_ids(tok: tokenizers.Tokenizer, last: int, count: int) -> list[int]:
    """The ids the bigram machine generates greedily after a prompt ending in `last`."""
    table = successors(tok)
    ids = []
    for _ in range(count):
        last = table[last]
        ids.append(last)
    return ids


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`loopcoder serve` in a subprocess on a free loopback port, its log in a file."""

    def __init__(self, checkpoint: Path, log: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {**os.environ, "OMP_NUM_THREADS": "1", "LOOPCODER_API_KEY": ""}
        command = [sys.executable, "-m", "loopcoder.cli", "serve", str(checkpoint), "--port", str(self.port), *args]
        with open(log, "wb") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 120.0) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
