"""What the endpoints share: the served model, and the request/response cycle of a generation
(wait for the engine, answer as JSON or as a stream, turn failures into OpenAI errors)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from loopcoder.engine.llm import AsyncLLM
from loopcoder.outputs import RequestOutput
from loopcoder.server.errors import APIError, bad_value, error_body
from loopcoder.server.formatting import sse
from loopcoder.server.generation import ClientDisconnected, EngineClient, Generation, unless_disconnected
from loopcoder.server.inputs import ModelLimits
from loopcoder.server.metrics import Metrics
from loopcoder.tokenizer import Tokenizer

logger = logging.getLogger("loopcoder.server")

Output = tuple[int, RequestOutput]


@dataclass
class ServerContext:
    llm: AsyncLLM
    client: EngineClient
    metrics: Metrics
    tokenizer: Tokenizer | None
    limits: ModelLimits
    model_name: str

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"the model `{name}` does not exist; this server serves `{self.model_name}`",
                           param="model", code="model_not_found")


async def respond(
    ctx: ServerContext,
    request: Request,
    generation: Generation,
    fields: set[str],
    stream: Callable[[Output], AsyncIterator[dict]] | None,
    body: Callable[[dict[int, RequestOutput]], dict],
) -> Response:
    """Stream `stream(first output)` as SSE, or answer `body(final outputs)` as JSON.

    Streams start only once the first output is in, so a request the engine refuses is still
    a plain 400, and a client that leaves while its request waits is noticed and aborted.
    """
    try:
        return await _answer(request, generation, stream, body)
    except ClientDisconnected:
        return Response(status_code=499)
    except ValueError as e:
        raise bad_value(e, fields) from None
    except RuntimeError:
        if ctx.llm.error is not None:
            raise APIError(503, f"the engine has stopped: {ctx.llm.error!r}", type_="server_error") from None
        raise


async def _answer(
    request: Request,
    generation: Generation,
    stream: Callable[[Output], AsyncIterator[dict]] | None,
    body: Callable[[dict[int, RequestOutput]], dict],
) -> Response:
    try:
        if stream is not None:
            first = await unless_disconnected(request, generation.next())
            return _EventStream(_reporting_errors(stream(first)), generation)
        return JSONResponse(body(await unless_disconnected(request, generation.finals())))
    except BaseException:
        generation.close()  # nobody will read the rest
        raise


class _EventStream(StreamingResponse):
    """An SSE response that aborts what is left of its generation however it ends (finished,
    client gone, or the connection failing before the first byte)."""

    def __init__(self, chunks: AsyncIterator[dict], generation: Generation) -> None:
        super().__init__(sse(chunks), media_type="text/event-stream")
        self.generation = generation

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.generation.close()


async def _reporting_errors(chunks: AsyncIterator[dict]) -> AsyncIterator[dict]:
    """Chunks, then an error event if the stream fails midway (its status line is already sent)."""
    try:
        async for chunk in chunks:
            yield chunk
    except Exception as e:  # noqa: BLE001 - reported in the stream, which then ends normally
        logger.exception("stream failed")
        if isinstance(e, ValueError):
            yield error_body(str(e))
        else:
            yield error_body("internal server error", "server_error")
