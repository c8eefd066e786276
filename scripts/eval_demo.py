"""Quality of the demo model on the held-out stdlib files; prints a JSON summary.

- next_token: top-1 accuracy and loss over a fixed sample of held-out windows;
- header_completion: share of held-out function headers whose greedy completion parses with
  `ast.parse`, cut at the last complete line unless the model ended it with an eos. Budget: 256
  new tokens, in which 81% of the held-out functions fit (header included); 64 tokens (41% fit)
  is reported too, from the first 64 tokens of the same greedy completions;
- loop0: how often loop 0 alone (final norm and head on its output) predicts the same next
  token as the full two-loop model, and its own top-1 accuracy.

    python scripts/eval_demo.py [--model DIR] [--show 3]
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import sys
import textwrap
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from loopcoder.demo import DEMO_DIR
from loopcoder.engine.llm import LLM
from loopcoder.loader import load_model
from loopcoder.model.loopcoder import LoopCoderForCausalLM
from loopcoder.sampling import SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_demo import EOT, functions, split_corpus  # noqa: E402


def heldout_windows(tok: Tokenizer, texts: list[str], count: int, length: int, seed: int) -> torch.Tensor:
    """`count` windows [count, length + 1] at seeded random offsets of the held-out token stream."""
    stream: list[int] = []
    for enc in tok.encode_batch(texts):
        stream += enc.ids + [tok.token_to_id(EOT)]
    rng = random.Random(seed)
    starts = [rng.randrange(len(stream) - length - 1) for _ in range(count)]
    return torch.tensor([stream[s : s + length + 1] for s in starts])


@torch.inference_mode()
def next_token_metrics(model: LoopCoderForCausalLM, windows: torch.Tensor, batch: int = 8) -> dict:
    inputs, targets = windows[:, :-1], windows[:, 1:]
    loss = correct = loop0_correct = agree = 0.0
    for i in range(0, len(windows), batch):
        full = model.forward_dense(inputs[i : i + batch])
        first = model.forward_dense(inputs[i : i + batch], loops=1)
        target = targets[i : i + batch]
        loss += F.cross_entropy(full.flatten(0, 1), target.flatten(), reduction="sum").item()
        correct += (full.argmax(-1) == target).sum().item()
        loop0_correct += (first.argmax(-1) == target).sum().item()
        agree += (first.argmax(-1) == full.argmax(-1)).sum().item()
    n = targets.numel()
    return {
        "next_token": {"windows": len(windows), "tokens": n, "top1": correct / n, "loss": loss / n},
        "loop0": {"agrees_with_full": agree / n, "top1": loop0_correct / n},
    }


def function_headers(text: str) -> list[str]:
    """Dedented `def ...:` headers of a file's functions whose body starts on a later line."""
    lines = text.splitlines()
    out = []
    for f in functions(text):
        head = lines[f.lineno - 1 : f.body[0].lineno - 1]
        while head and (not head[-1].strip() or head[-1].strip().startswith("#")):
            head.pop()
        header = textwrap.dedent("\n".join(head)).rstrip()
        if header.endswith(":"):
            out.append(header)
    return out


def completion_parses(header: str, completion: str, ended: bool) -> bool:
    """Header + completion (cut at its last complete line unless it ended at an eos) parses."""
    if not ended:
        completion = completion[: completion.rfind("\n") + 1] if "\n" in completion else ""
    try:
        ast.parse(textwrap.dedent(header + completion))
    except SyntaxError:
        return False
    return True


def header_metrics(model_dir: Path, tok: Tokenizer, texts: list[str], count: int, budgets: list[int], seed: int, show: int) -> dict:
    """Greedy completions by the engine (float32, all headers batched) up to the largest budget or an eos;
    each smaller budget's completion is the first tokens of the same one (greedy decoding)."""
    headers = [h for text in texts for h in function_headers(text)]
    headers = random.Random(seed).sample(headers, min(count, len(headers)))
    llm = LLM(str(model_dir), dtype="float32", max_model_len=1024)
    params = SamplingParams(temperature=0.0, max_tokens=max(budgets))
    outputs = [out.outputs[0] for out in llm.generate([{"prompt_token_ids": tok.encode(h).ids} for h in headers], params)]
    rates = {}
    for budget in sorted(budgets):
        parsed = 0
        for n, (header, out) in enumerate(zip(headers, outputs, strict=True)):
            ended = out.finish_reason == "stop" and len(out.token_ids) <= budget
            text = tok.decode(out.token_ids[:budget], skip_special_tokens=True)
            ok = completion_parses(header, text, ended)
            parsed += ok
            if n < show and budget == max(budgets):
                print(f"--- parses: {ok}\n{header}{text}", file=sys.stderr)
        rates[f"parse_rate_{budget}"] = parsed / len(headers)
    return {"header_completion": {"headers": len(headers), "parse_rate": rates[f"parse_rate_{max(budgets)}"], **rates}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEMO_DIR)
    p.add_argument("--windows", type=int, default=64)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--headers", type=int, default=200)
    p.add_argument("--budgets", type=int, nargs="+", default=[256, 64], help="new-token budgets; the largest is the headline")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--show", type=int, default=0, help="print this many completions to stderr")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    start = time.time()
    model = load_model(args.model, dtype="float32")
    tok = Tokenizer.from_file(str(args.model / "tokenizer.json"))
    _, heldout = split_corpus()
    texts = [text for _, text in heldout]
    summary: dict = {"model": str(args.model), "heldout_files": len(heldout)}
    summary |= next_token_metrics(model, heldout_windows(tok, texts, args.windows, args.context, args.seed))
    summary |= header_metrics(args.model, tok, texts, args.headers, args.budgets, args.seed, args.show)
    summary["seconds"] = round(time.time() - start, 1)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
