"""loopcoder: exact, fast inference for IQuest LoopCoder models."""

from loopcoder.engine.llm import LLM, AsyncLLM
from loopcoder.outputs import CompletionOutput, Logprob, RequestOutput
from loopcoder.sampling import SamplingParams

__all__ = ["LLM", "AsyncLLM", "CompletionOutput", "Logprob", "RequestOutput", "SamplingParams"]
