"""Does int8 change what the model predicts? Held-out text, teacher-forced, bf16 against int8.

The demo model was trained on the standard library with ~5% of its files held out
(scripts/train_demo.py). The windows are those scripts/eval_demo.py scores (same count, length
and seed by default). At every position both engines give their greedy (top-1) next token:
agreement is how often the two are the same token, accuracy how often a model's token is the
text's actual next token.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tokenizers import Tokenizer

from loopcoder.engine.engine import LLMEngine
from loopcoder.sampling import SamplingParams

ROOT = Path(__file__).resolve().parents[1]


def heldout_windows(model_dir: Path, windows: int = 64, length: int = 256, seed: int = 0) -> list[list[int]]:
    """eval_demo.py's held-out windows: `windows` token windows of `length` + 1 at seeded offsets."""
    spec = importlib.util.spec_from_file_location("eval_demo", ROOT / "scripts" / "eval_demo.py")
    eval_demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eval_demo)
    _, heldout = eval_demo.split_corpus()
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    return eval_demo.heldout_windows(tok, [text for _, text in heldout], windows, length, seed).tolist()


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
