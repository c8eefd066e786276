"""loopcoder: exact, fast inference for IQuest LoopCoder models."""

import os

# After each parallel op, PyTorch's OpenMP threads (libgomp) spin for 300,000 iterations, some
# milliseconds, before they sleep; on a small CPU they then hold the cores the native kernels' helper
# threads need next. Spinning 10,000 iterations keeps back-to-back PyTorch ops about as quick and lets
# a 0.5B model's prompts run 1.2x faster on 2 cores. Only takes effect if torch is not imported yet;
# the user's own OpenMP wait settings win.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")

from loopcoder.engine.llm import LLM, AsyncLLM  # noqa: E402 - after the OpenMP setting
from loopcoder.outputs import CompletionOutput, Logprob, RequestOutput  # noqa: E402
from loopcoder.sampling import SamplingParams  # noqa: E402

__all__ = ["LLM", "AsyncLLM", "CompletionOutput", "Logprob", "RequestOutput", "SamplingParams"]
