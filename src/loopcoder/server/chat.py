"""POST /v1/chat/completions: the checkpoint's chat template, tool calls, logprobs.

As for completions, the non-streamed message is one `_ChatCursor` step over the final output
and a stream is many steps over growing outputs, so streamed content and tool-call deltas
always add up to the non-streamed message.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi.responses import Response
from starlette.requests import Request

from loopcoder.outputs import CompletionOutput, RequestOutput
from loopcoder.server.formatting import chat_logprobs, new_id, now, usage
from loopcoder.server.inputs import chat_max_tokens, chat_prompt, sampling_params, tools_for_template
from loopcoder.server.protocol import ChatCompletionRequest
from loopcoder.server.serving import Output, ServerContext, respond
from loopcoder.server.tool_calls import ToolCallDelta, ToolCallParser, merge_deltas


@dataclass
class _Step:
    content: str
    tool_calls: list[ToolCallDelta] = field(default_factory=list)
    logprobs: dict | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class _ChatCursor:
    """How much of one choice the client has been sent, and the tool-call parser reading it."""

    parser: ToolCallParser | None
    top_logprobs: int | None
    chars: int = 0
    tokens: int = 0
    finished: bool = False

    def advance(self, seq: CompletionOutput) -> _Step | None:
        """What is new in the choice since the last call; None when nothing is."""
        if self.finished:
            return None
        text, ids = seq.text[self.chars :], seq.token_ids[self.tokens :]
        positions = list(seq.logprobs[self.tokens :]) if seq.logprobs is not None else []
        self.chars, self.tokens = len(seq.text), len(seq.token_ids)
        self.finished = seq.finish_reason is not None
        step = _Step(text)
        if self.parser is not None:
            step.content, step.tool_calls = self.parser.feed(text)
            if self.finished:
                rest, more = self.parser.finish()
                step.content += rest
                step.tool_calls += more
        if self.top_logprobs is not None and ids:
            step.logprobs = chat_logprobs(ids, positions, self.top_logprobs)
        if self.finished:
            called = self.parser is not None and self.parser.called
            step.finish_reason = "tool_calls" if called and seq.finish_reason == "stop" else seq.finish_reason
            step.stop_reason = seq.stop_reason
        elif not step.content and not step.tool_calls and step.logprobs is None:
            return None
        return step


async def create_chat_completion(ctx: ServerContext, req: ChatCompletionRequest, request: Request) -> Response:
    ctx.check_model(req.model)
    tools = tools_for_template(req)
    prompt = chat_prompt(req, tools, ctx.tokenizer, ctx.limits)
    top_logprobs = (req.top_logprobs or 0) if req.logprobs else None
    params = sampling_params(req, chat_max_tokens(req), top_logprobs, None, ctx.limits)
    generation = ctx.client.start([prompt], params)
    request_id, created = new_id("chatcmpl"), now()
    cursors = [_ChatCursor(ToolCallParser() if tools else None, top_logprobs) for _ in range(req.n)]

    def envelope(object_: str, choices: list[dict]) -> dict:
        return {"id": request_id, "object": object_, "created": created, "model": ctx.model_name, "choices": choices}

    async def stream(first: Output) -> AsyncIterator[dict]:
        extra = {"usage": None} if req.include_usage else {}
        for i in range(req.n):
            role = {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            yield envelope("chat.completion.chunk", [role]) | extra
        item: Output | None = first
        final: RequestOutput | None = None
        while item is not None:
            out = item[1]
            for seq in out.outputs:
                step = cursors[seq.index].advance(seq)
                if step is not None:
                    yield envelope("chat.completion.chunk", [_chunk_choice(seq.index, step)]) | extra
            final = out if out.finished else final
            item = await generation.next()
        if req.include_usage:
            yield envelope("chat.completion.chunk", []) | {"usage": usage([final])}

    def body(finals: dict[int, RequestOutput]) -> dict:
        choices = [_message_choice(seq.index, cursors[seq.index].advance(seq)) for seq in finals[0].outputs]
        return envelope("chat.completion", choices) | {"usage": usage(finals.values())}

    return await respond(ctx, request, generation, set(ChatCompletionRequest.model_fields), stream if req.stream else None, body)


def _chunk_choice(index: int, step: _Step) -> dict:
    delta: dict = {}
    if step.content:
        delta["content"] = step.content
    if step.tool_calls:
        delta["tool_calls"] = [d.to_openai() for d in step.tool_calls]
    choice = {"index": index, "delta": delta, "logprobs": step.logprobs, "finish_reason": step.finish_reason}
    if step.finish_reason is not None:
        choice["stop_reason"] = step.stop_reason
    return choice


def _message_choice(index: int, step: _Step) -> dict:
    calls = merge_deltas(step.tool_calls)
    message: dict = {"role": "assistant", "content": step.content or (None if calls else "")}
    if calls:
        message["tool_calls"] = calls
    return {
        "index": index, "message": message, "logprobs": step.logprobs, "finish_reason": step.finish_reason, "stop_reason": step.stop_reason,
    }
