"""The FastAPI app: OpenAI's routes (plus vLLM's tokenize, detokenize, health and metrics) on an AsyncLLM."""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from loopcoder.engine.llm import AsyncLLM
from loopcoder.server.chat import create_chat_completion
from loopcoder.server.completions import create_completion
from loopcoder.server.errors import APIError, error_body, install_error_handlers
from loopcoder.server.formatting import now
from loopcoder.server.generation import EngineClient
from loopcoder.server.inputs import ModelLimits, check_token_ids, render_chat
from loopcoder.server.metrics import CONTENT_TYPE, Metrics
from loopcoder.server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from loopcoder.server.serving import ServerContext
from loopcoder.tokenizer import Tokenizer


@dataclass
class ServerSettings:
    model_name: str
    api_key: str | None = None
    max_waiting: int = 256  # prompts waiting for their first token before new requests get 503


def build_app(llm: AsyncLLM, settings: ServerSettings) -> FastAPI:
    engine = llm.engine
    limits = ModelLimits(engine.max_model_len, engine.model.config.vocab_size)
    metrics = Metrics(llm)
    ctx = ServerContext(llm, EngineClient(llm, metrics, settings.max_waiting), metrics, engine.tokenizer, limits, settings.model_name)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        llm.shutdown()  # uvicorn has drained every request by now

    app = FastAPI(title="loopcoder", summary="OpenAI-compatible server for IQuest LoopCoder models", lifespan=lifespan)
    install_error_handlers(app)
    if settings.api_key:
        app.add_middleware(BearerAuth, api_key=settings.api_key)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await create_completion(ctx, body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await create_chat_completion(ctx, body, request)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [_model_card(ctx)]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str) -> dict:
        ctx.check_model(model_id)
        return _model_card(ctx)

    @app.get("/health")
    async def health() -> Response:
        if llm.error is not None:
            return JSONResponse(error_body(f"the engine has stopped: {llm.error!r}", "server_error"), status_code=503)
        return Response(status_code=200)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        ctx.check_model(body.model)
        tokenizer = _tokenizer(ctx)
        try:
            if body.messages is not None:
                text = render_chat(tokenizer, body.messages, body.tools, body.add_generation_prompt)
                tokens = tokenizer.encode(text, add_special_tokens=False)
            else:
                tokens = tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        except (ValueError, TypeError) as e:
            raise APIError(400, f"cannot tokenize: {e}", param="prompt") from None
        return {"count": len(tokens), "max_model_len": limits.max_model_len, "tokens": tokens}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        ctx.check_model(body.model)
        return {"prompt": _tokenizer(ctx).decode(check_token_ids(body.tokens, limits, "tokens"))}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return app


def _model_card(ctx: ServerContext) -> dict:
    return {
        "id": ctx.model_name, "object": "model", "created": now(), "owned_by": "loopcoder",
        "root": ctx.model_name, "parent": None, "max_model_len": ctx.limits.max_model_len,
    }


def _tokenizer(ctx: ServerContext) -> Tokenizer:
    if ctx.tokenizer is None:
        raise APIError(400, "this model has no tokenizer")
    return ctx.tokenizer


class BearerAuth:
    """Every /v1 route needs `Authorization: Bearer <api key>` (vLLM's `--api-key`)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1") and not self._authorized(scope):
            body = error_body("invalid or missing API key: send Authorization: Bearer <key>", code="invalid_api_key")
            response = JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        given = dict(scope["headers"]).get(b"authorization", b"")
        return hmac.compare_digest(given, self.expected)
