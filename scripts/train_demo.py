"""Train the small demo LoopCoder shipped in `src/loopcoder/demo/`, from scratch, on CPU.

Corpus: the running Python's standard library (split by file into train and held-out parts).
Steps: a byte-level BPE tokenizer with the real model's special tokens, then a LoopCoder
(loop_num 2) trained on plain windows, fill-in-the-middle examples and whole functions (Muon for
the layers' matrices, AdamW for the rest), saved in the Hugging Face layout of the released
checkpoints (bf16 safetensors). Deterministic for a seed, whatever the thread count.

    python scripts/train_demo.py                 # the shipped model: ~48 min on 2 idle cores
    python scripts/train_demo.py --steps 50 --out /tmp/demo-trial

`--minutes` (default 58) stops a run that other work slows down that much early, by the wall clock.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import itertools
import json
import math
import os
import random
import sysconfig
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

if TYPE_CHECKING:  # imported in main(), after the native kernels (which have no autograd) are switched off
    from loopcoder.model.loopcoder import LoopCoderForCausalLM

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "src" / "loopcoder" / "demo"
REAL_TOKENIZER_CONFIG = ROOT.parent / "shared" / "iquest" / "tokenizer_config.json"

EOT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX = "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"
SPECIAL_TOKENS = [EOT, IM_START, IM_END, FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX]
EXTRA_TOKENS = ["<tool_call>", "</tool_call>", "<think>", "</think>"]
# GPT-2's split, with `_` a letter (identifiers stay whole) and no English contractions ('s).
SPLIT_PATTERN = r" ?[\p{L}_][\p{L}\p{N}_]*| ?\p{N}+| ?[^\s\p{L}\p{N}_]+|\s+(?!\S)|\s+"
SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__", "pydoc_data"}
MAX_FILE_BYTES = 200_000
HELDOUT_PERCENT = 5
IGNORE = -100


# --- corpus ----------------------------------------------------------------------------------


def is_heldout(rel: str) -> bool:
    """Deterministic ~5% of files, by a hash of the path relative to the stdlib root."""
    return int(hashlib.sha256(rel.encode()).hexdigest()[:8], 16) % 100 < HELDOUT_PERCENT


def corpus_files() -> list[tuple[str, str]]:
    """(relative path, text) of the stdlib's hand-written .py files, sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if SKIP_DIRS & set(rel.split("/")[:-1]) or path.stat().st_size > MAX_FILE_BYTES:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if "generated" in text[:400].lower():  # codec tables, parser tables, ...
            continue
        out.append((rel, text))
    return out


def split_corpus() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train files, held-out files)."""
    files = corpus_files()
    return [f for f in files if not is_heldout(f[0])], [f for f in files if is_heldout(f[0])]


def functions(text: str) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    """Every function and method defined in a source file (none if it does not parse)."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return []
    return [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]


def function_sources(text: str) -> list[str]:
    """Each function's source from its `def` line (decorators left out), dedented."""
    lines = text.splitlines(keepends=True)
    return [textwrap.dedent("".join(lines[f.lineno - 1 : f.end_lineno])) for f in functions(text)]


# --- tokenizer -------------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE with the real model's special tokens (ids 0-5) and extra tokens (the last ids)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(EXTRA_TOKENS),
        min_frequency=2,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in EXTRA_TOKENS])
    return tok


def tokenizer_config(tok: Tokenizer) -> dict:
    """tokenizer_config.json: the real release's chat template and token roles, our ids."""
    real = json.loads(REAL_TOKENIZER_CONFIG.read_text(encoding="utf-8"))
    decoder = {
        str(i): {
            "content": t.content, "lstrip": t.lstrip, "normalized": t.normalized,
            "rstrip": t.rstrip, "single_word": t.single_word, "special": t.special,
        }
        for i, t in sorted(tok.get_added_tokens_decoder().items())
    }
    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": [t for t in SPECIAL_TOKENS if t != EOT] + EXTRA_TOKENS[2:],
        "bos_token": None,
        "chat_template": real["chat_template"],
        "clean_up_tokenization_spaces": False,
        "eos_token": IM_END,
        "model_max_length": 2048,
        "pad_token": EOT,
        "padding_side": "right",
        "split_special_tokens": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }


# --- training data ---------------------------------------------------------------------------


@dataclass
class DataMix:
    """Per batch: `fim` fill-in-the-middle sequences, `func` packed-function sequences (on average), the rest plain."""

    batch: int
    context: int
    fim: int
    func: float


class Batches:
    """Deterministic training batches [B, T+1] of ids and their targets (pad masked out)."""

    def __init__(self, tok: Tokenizer, train: list[tuple[str, str]], mix: DataMix, seed: int) -> None:
        self.tok, self.mix = tok, mix
        self.rng = random.Random(seed)
        self.eot = tok.token_to_id(EOT)
        self.fim_ids = [tok.token_to_id(t) for t in (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE)]
        texts = [text for _, text in train]
        stream: list[int] = []
        for enc in tok.encode_batch(texts):
            stream += enc.ids + [self.eot]
        self.stream = torch.tensor(stream, dtype=torch.long)
        funcs = [f for text in texts for f in function_sources(text)]
        self.funcs = [enc.ids + [self.eot] for enc in tok.encode_batch(funcs)]
        self.windows: list[int] = []

    def _plain(self) -> list[int]:
        n = self.mix.context + 1
        if not self.windows:
            shift = self.rng.randrange(n)
            self.windows = list(range(shift, len(self.stream) - n, n))
            self.rng.shuffle(self.windows)
        start = self.windows.pop()
        return self.stream[start : start + n].tolist()

    def _fim(self) -> list[int]:
        """PSM: <|fim_prefix|>pre<|fim_suffix|>suf<|fim_middle|>mid<|endoftext|>, cut at random characters."""
        start = self.rng.randrange(len(self.stream) - self.mix.context)
        text = self.tok.decode(self.stream[start : start + self.mix.context - 8].tolist())
        a, b = sorted(self.rng.randrange(len(text) + 1) for _ in range(2))
        pre, mid, suf = (self.tok.encode(s).ids for s in (text[:a], text[a:b], text[b:]))
        p, s, m = self.fim_ids
        return [p, *pre, s, *suf, m, *mid, self.eot]

    def _func(self) -> list[int]:
        ids: list[int] = []
        while len(ids) <= self.mix.context:
            ids += self.funcs[self.rng.randrange(len(self.funcs))]
        return ids

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = self.mix.context + 1
        for step in itertools.count():
            func = math.floor((step + 1) * self.mix.func) - math.floor(step * self.mix.func)
            kinds = ["fim"] * self.mix.fim + ["func"] * func
            kinds += ["plain"] * (self.mix.batch - len(kinds))
            rows = []
            for kind in kinds:
                seq = {"plain": self._plain, "fim": self._fim, "func": self._func}[kind]()[:n]
                rows.append(seq + [IGNORE] * (n - len(seq)))
            batch = torch.tensor(rows)
            yield batch[:, :-1].clamp(min=0), batch[:, 1:]


# --- model -----------------------------------------------------------------------------------


def model_config(args: argparse.Namespace, tok: Tokenizer) -> dict:
    """config.json in the released checkpoints' format."""
    eos = [tok.token_to_id(EOT), tok.token_to_id(IM_END)]
    return {
        "_name_or_path": "loopcoder-demo",
        "architectures": ["IQuestLoopCoderForCausalLM"],
        "model_type": "iquestloopcoder",
        "vocab_size": tok.get_vocab_size(),
        "hidden_size": args.hidden,
        "intermediate_size": args.intermediate,
        "num_hidden_layers": args.layers,
        "eos_token_id": eos,
        "pad_token_id": tok.token_to_id(EOT),
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.hidden // args.heads,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-05,
        "use_cache": True,
        "tie_word_embeddings": True,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "loop_num": 2,
        "loop_window_size": args.window,
        "torch_dtype": "bfloat16",
    }


def init_model(config: dict) -> LoopCoderForCausalLM:
    """A trainable fp32 model: N(0, 0.02) weights (output projections scaled down), unit norms, g = 0.5."""
    from loopcoder.config import LoopCoderConfig
    from loopcoder.model.loopcoder import LoopCoderForCausalLM

    model = LoopCoderForCausalLM(LoopCoderConfig.from_dict(config), torch.float32)
    depth = 2 * model.config.num_hidden_layers * model.config.loop_num
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.requires_grad_(True)
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.startswith("gate_projections") and name.endswith("bias"):
                p.zero_()
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                p.normal_(0.0, 0.02 / math.sqrt(depth))
            else:
                p.normal_(0.0, 0.02)
    return model


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to 10% of the peak at `steps`."""
    cosine = peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
    return min(peak * (step + 1) / warmup, cosine)


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Newton-Schulz iteration from g towards the nearest semi-orthogonal matrix (Muon's update)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g / (g.norm() + 1e-7)
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return x.T if tall else x


class Muon(torch.optim.Optimizer):
    """Nesterov momentum whose update is orthogonalized per weight matrix (K. Jordan's Muon).

    Fused parameters (q/k/v, gate/up) are orthogonalized per checkpoint tensor: `parts` maps a
    parameter to its row slices.
    """

    def __init__(self, parts: dict[torch.nn.Parameter, list[slice]], lr: float, momentum: float = 0.95) -> None:
        self.parts = parts
        super().__init__(list(parts), {"lr": lr, "momentum": momentum})

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                buf = self.state[p].setdefault("momentum", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(p.grad)
                g = p.grad.add(buf, alpha=group["momentum"])
                for rows in self.parts[p]:
                    part = g[rows]
                    scale = max(1.0, part.shape[0] / part.shape[1]) ** 0.5
                    p[rows] -= group["lr"] * scale * orthogonalize(part)


def optimizers(model: LoopCoderForCausalLM, args: argparse.Namespace) -> list[torch.optim.Optimizer]:
    """Muon for the layers' matrices, AdamW for the rest (embedding and head, norms, gates); or AdamW for all."""
    hidden = {id(p) for layer in model.layers for p in layer.parameters() if p.dim() == 2}
    if args.optimizer == "adamw":
        hidden = set()
    parts: dict[torch.nn.Parameter, list[slice]] = {}
    for spec in model.weight_specs():
        if id(spec.param) in hidden:
            parts.setdefault(spec.param, []).append(spec.rows)
    rest = [(n, p) for n, p in model.named_parameters() if id(p) not in hidden]
    decay = [p for n, p in rest if p.dim() == 2 and not n.startswith("gate_projections")]
    no_decay = [p for n, p in rest if p.dim() != 2 or n.startswith("gate_projections")]
    adamw = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    return [adamw, Muon(parts, args.muon_lr)] if parts else [adamw]


def train(model: LoopCoderForCausalLM, batches: Batches, args: argparse.Namespace, deadline: float | None) -> int:
    """`args.steps` steps, unless the wall-clock `deadline` stops the run first; returns the steps run."""
    opts = optimizers(model, args)
    for opt in opts:
        for group in opt.param_groups:
            group["peak"] = group["lr"]
    start, smooth, step = time.time(), None, 0
    for step, (inputs, targets) in zip(range(args.steps), batches, strict=False):
        if deadline and time.time() > deadline:
            print(f"stopped by the --minutes budget at step {step}: not annealed, not reproducible", flush=True)
            break
        for opt in opts:
            for group in opt.param_groups:
                group["lr"] = lr_at(step, args.steps, group["peak"], args.warmup)
        logits = model.forward_dense(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
        loss.backward()
        if step == 0 and (frozen := [n for n, p in model.named_parameters() if p.grad is None]):
            raise RuntimeError(f"no gradient reaches {frozen[0]} (and {len(frozen) - 1} more): a path without autograd?")
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        smooth = loss.item() if smooth is None else 0.95 * smooth + 0.05 * loss.item()
        if step % args.log_every == 0:
            elapsed = time.time() - start
            print(f"step {step:5d}  loss {loss.item():.3f}  avg {smooth:.3f}  lr {opts[0].param_groups[0]['lr']:.2e}  "
                  f"{elapsed / (step + 1):.2f}s/step  {elapsed / 60:.1f} min", flush=True)
    else:
        step = args.steps
    print(f"trained {step} steps in {(time.time() - start) / 60:.1f} min; final avg loss {smooth:.3f}", flush=True)
    return step


# --- saving ----------------------------------------------------------------------------------


def hf_state_dict(model: LoopCoderForCausalLM) -> dict[str, torch.Tensor]:
    """Checkpoint tensors under their Hugging Face names, fused q/k/v and gate/up split back."""
    out = {}
    for spec in model.weight_specs():
        out[spec.name] = spec.param.detach()[spec.rows].to(torch.bfloat16).contiguous()
    return out


def save(model: LoopCoderForCausalLM, tok: Tokenizer, config: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_file(hf_state_dict(model), str(out / "model.safetensors"), metadata={"format": "pt"})
    tok.save(str(out / "tokenizer.json"))
    eos = config["eos_token_id"]
    generation = {"eos_token_id": eos, "pad_token_id": config["pad_token_id"], "do_sample": True,
                  "temperature": 0.6, "top_p": 0.85, "top_k": 20}
    for name, data in [("config.json", config), ("generation_config.json", generation),
                       ("tokenizer_config.json", tokenizer_config(tok))]:
        (out / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--fim", type=int, default=1, help="fill-in-the-middle sequences per batch")
    p.add_argument("--func", type=float, default=1.2,
                   help="packed-function sequences per batch, on average (1.2: one, and two in every fifth batch)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--optimizer", choices=["muon", "adamw"], default="muon")
    p.add_argument("--lr", type=float, default=1e-2, help="AdamW's peak learning rate")
    p.add_argument("--muon-lr", type=float, default=0.02, help="Muon's peak learning rate (the layers' matrices)")
    p.add_argument("--warmup", type=int, default=20, help="warmup steps")
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--minutes", type=float, default=58.0,
                   help="wall-clock limit of the whole script, a guard (a stopped run is neither annealed nor "
                        "reproducible); 0: none")
    p.add_argument("--threads", type=int, default=2,
                   help="2 is faster only on an idle machine: where other work holds a core, 2 threads "
                        "wait on each other and run several times slower (the results are the same)")
    p.add_argument("--log-every", type=int, default=10)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    os.environ["LOOPCODER_KERNELS"] = "0"  # the package's native CPU kernels have no autograd
    t0 = time.time()
    deadline = t0 + args.minutes * 60 - 30 if args.minutes else None  # 30 s to save
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    train_files, heldout = split_corpus()
    print(f"corpus: {len(train_files)} train files, {len(heldout)} held-out", flush=True)
    tok = train_tokenizer([text for _, text in train_files], args.vocab)
    print(f"tokenizer: {tok.get_vocab_size()} ids in {time.time() - t0:.0f}s", flush=True)
    mix = DataMix(args.batch, args.context, args.fim, args.func)
    batches = Batches(tok, train_files, mix, args.seed)
    print(f"data: {len(batches.stream)} train tokens, {len(batches.funcs)} functions", flush=True)
    config = model_config(args, tok)
    model = init_model(config)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters", flush=True)
    train(model, batches, args, deadline)
    save(model, tok, config, args.out)
    print(f"saved to {args.out} after {(time.time() - t0) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
