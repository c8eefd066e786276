"""POST /v1/completions: text or token-id prompts, fill-in-the-middle via `suffix`, echo, logprobs.

A streamed choice and its non-streamed counterpart come from the same `_ChoiceCursor`: the
non-streamed body is a single advance over the final output, so the chunks of a stream
always concatenate to the non-streamed text and logprobs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi.responses import Response
from starlette.requests import Request

from loopcoder.outputs import CompletionOutput, RequestOutput
from loopcoder.server.formatting import completion_logprobs, new_id, now, usage
from loopcoder.server.inputs import EnginePrompt, completion_prompts, sampling_params
from loopcoder.server.protocol import CompletionRequest
from loopcoder.server.serving import Output, ServerContext, respond


@dataclass
class _ChoiceCursor:
    """How much of one choice the client has been sent."""

    index: int
    prompt: EnginePrompt
    chars: int = 0
    tokens: int = 0
    offset: int = 0
    started: bool = False
    finished: bool = False

    def advance(self, req: CompletionRequest, out: RequestOutput, seq: CompletionOutput) -> dict | None:
        """The choice's new text (and logprobs) since the last call; None when there is none."""
        if self.finished or (not seq.token_ids and seq.finish_reason is None):
            return None
        text, ids = seq.text[self.chars :], seq.token_ids[self.tokens :]
        positions = list(seq.logprobs[self.tokens :]) if seq.logprobs is not None else []
        if req.echo and not self.started:
            text = (self.prompt.text or "") + text
            ids = self.prompt.token_ids + ids
            positions = list(out.prompt_logprobs or [None] * len(self.prompt.token_ids)) + positions
        self.chars, self.tokens = len(seq.text), len(seq.token_ids)
        self.started, self.finished = True, seq.finish_reason is not None
        logprobs = None
        if req.logprobs is not None and ids:
            logprobs = completion_logprobs(ids, positions, self.offset)
            self.offset = logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])
        if not text and not self.finished and logprobs is None:
            return None
        return {
            "index": self.index, "text": text, "logprobs": logprobs,
            "finish_reason": seq.finish_reason, "stop_reason": seq.stop_reason,
        }


async def create_completion(ctx: ServerContext, req: CompletionRequest, request: Request) -> Response:
    ctx.check_model(req.model)
    prompts = completion_prompts(req, ctx.tokenizer, ctx.limits)
    prompt_logprobs = req.logprobs if req.echo and req.logprobs is not None else None
    params = sampling_params(req, req.max_tokens, req.logprobs, prompt_logprobs, ctx.limits)
    generation = ctx.client.start(prompts, params)
    request_id, created = new_id("cmpl"), now()
    cursors = {(i, j): _ChoiceCursor(i * req.n + j, p) for i, p in enumerate(prompts) for j in range(req.n)}

    def chunk(choices: list[dict]) -> dict:
        return {"id": request_id, "object": "text_completion", "created": created, "model": ctx.model_name, "choices": choices}

    async def stream(first: Output) -> AsyncIterator[dict]:
        finals: dict[int, RequestOutput] = {}
        item: Output | None = first
        while item is not None:
            index, out = item
            for seq in out.outputs:
                choice = cursors[index, seq.index].advance(req, out, seq)
                if choice is not None:
                    yield chunk([choice]) | ({"usage": None} if req.include_usage else {})
            if out.finished:
                finals[index] = out
            item = await generation.next()
        if req.include_usage:
            yield chunk([]) | {"usage": usage(finals.values())}

    def body(finals: dict[int, RequestOutput]) -> dict:
        choices = [
            cursors[index, seq.index].advance(req, finals[index], seq) for index in range(len(prompts)) for seq in finals[index].outputs
        ]
        return chunk(choices) | {"usage": usage(finals.values())}

    return await respond(ctx, request, generation, set(CompletionRequest.model_fields), stream if req.stream else None, body)
