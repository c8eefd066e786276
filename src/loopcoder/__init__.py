"""loopcoder: exact, fast inference for IQuest LoopCoder models."""

import os

# PyTorch's OpenMP threads spin for a while after each parallel op; on a small CPU they then hold
# the cores the native kernels' helper threads need next (a 0.5B model on 2 cores: decode 1.1-1.2x,
# prefill 1.1x with them sleeping instead). Only takes effect if torch is not imported yet; a value
# the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from loopcoder.engine.llm import LLM, AsyncLLM  # noqa: E402 - after the OpenMP setting
from loopcoder.outputs import CompletionOutput, Logprob, RequestOutput  # noqa: E402
from loopcoder.sampling import SamplingParams  # noqa: E402

__all__ = ["LLM", "AsyncLLM", "CompletionOutput", "Logprob", "RequestOutput", "SamplingParams"]
