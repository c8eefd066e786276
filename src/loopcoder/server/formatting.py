"""Pieces of OpenAI response bodies shared by both endpoints: logprobs, usage, SSE framing."""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Iterable

from loopcoder.outputs import Logprob, PositionLogprobs, RequestOutput

# OpenAI and vLLM report an impossible token as this rather than -inf (JSON has no infinity).
MIN_LOGPROB = -9999.0


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else MIN_LOGPROB


def token_text(token_id: int, entry: Logprob) -> str:
    return entry.decoded_token if entry.decoded_token is not None else f"token_id:{token_id}"


def ranked(position: PositionLogprobs, k: int) -> list[tuple[int, Logprob]]:
    """The k most likely tokens of a position, most likely first."""
    return sorted(position.items(), key=lambda item: -item[1].logprob)[:k]


def completion_logprobs(
    token_ids: list[int], positions: Iterable[PositionLogprobs | None], offset: int
) -> dict[str, list]:
    """The legacy completions `logprobs` object; a None position (the first prompt token) has none."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, position in zip(token_ids, positions, strict=True):
        if position is None:
            out["tokens"].append("")
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
        else:
            text = token_text(token, position[token])
            out["tokens"].append(text)
            out["token_logprobs"].append(finite(position[token].logprob))
            out["top_logprobs"].append({token_text(t, e): finite(e.logprob) for t, e in position.items()})
        out["text_offset"].append(offset)
        offset += len(out["tokens"][-1])
    return out


def chat_logprobs(token_ids: list[int], positions: list[PositionLogprobs], top: int) -> dict[str, list]:
    """The chat `logprobs` object: each token with its bytes and the `top` most likely tokens."""
    content = []
    for token, position in zip(token_ids, positions, strict=True):
        entry = position[token]
        content.append({
            **_chat_entry(token, entry),
            "top_logprobs": [_chat_entry(t, e) for t, e in ranked(position, top)],
        })
    return {"content": content}


def _chat_entry(token: int, entry: Logprob) -> dict:
    text = token_text(token, entry)
    return {"token": text, "logprob": finite(entry.logprob), "bytes": list(text.encode("utf-8", errors="replace"))}


def usage(outputs: Iterable[RequestOutput]) -> dict[str, int]:
    prompt = completion = 0
    for out in outputs:
        prompt += len(out.prompt_token_ids)
        completion += sum(len(c.token_ids) for c in out.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def sse(chunks: AsyncIterator[dict]) -> AsyncIterator[str]:
    """Server-sent events: one `data:` line per chunk, then `data: [DONE]`."""
    async for chunk in chunks:
        yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
    yield "data: [DONE]\n\n"
