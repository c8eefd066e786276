"""Does int8 change what the model predicts? Held-out text, teacher-forced, bf16 against int8.

The demo model was trained on the standard library with ~5% of its files held out
(scripts/train_demo.py); those files are the text here. At every position both engines give
their greedy (top-1) next token: agreement is how often the two are the same token, accuracy
how often a model's token is the text's actual next token.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from loopcoder.engine.engine import LLMEngine
from loopcoder.sampling import SamplingParams

ROOT = Path(__file__).resolve().parents[1]


def heldout_windows(engine: LLMEngine, windows: int, length: int) -> list[list[int]]:
    """Up to `windows` token windows of `length` from the demo's held-out files (in path order)."""
    spec = importlib.util.spec_from_file_location("train_demo", ROOT / "scripts" / "train_demo.py")
    train_demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_demo)
    _, heldout = train_demo.split_corpus()
    out = []
    for _, text in heldout:
        ids = engine.tokenizer.encode(text, add_special_tokens=False)
        out += [ids[i : i + length] for i in range(0, len(ids) - length + 1, length)]
        if len(out) >= windows:
            break
    return out[:windows]


def greedy_predictions(engine: LLMEngine, windows: list[list[int]]) -> list[tuple[int, int]]:
    """(predicted token, actual token) at every position after the first of every window."""
    requests = {
        engine.add_request({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)): ids
        for ids in windows
    }
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    pairs = []
    for request_id, ids in requests.items():
        for pos, logprobs in enumerate(done[request_id].prompt_logprobs):
            if logprobs is not None:
                top = next(token for token, lp in logprobs.items() if lp.rank == 1)
                pairs.append((top, ids[pos]))
    return pairs


def compare(reference: list[tuple[int, int]], candidate: list[tuple[int, int]]) -> dict:
    """Greedy agreement and both accuracies (percent) over the same positions."""
    n = len(reference)
    agree = sum(r[0] == c[0] for r, c in zip(reference, candidate, strict=True))
    return {
        "positions": n,
        "greedy_agreement_pct": 100 * agree / n,
        "reference_accuracy_pct": 100 * sum(p == a for p, a in reference) / n,
        "candidate_accuracy_pct": 100 * sum(p == a for p, a in candidate) / n,
    }
