"""OpenAI-style error bodies, so clients' error handling (the `openai` package's exception
classes, editor plugins) sees the message, the offending field and a status it understands."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

logger = logging.getLogger("loopcoder.server")


class APIError(Exception):
    """A request the server refuses, with the status and body to answer it with."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        type_: str = "invalid_request_error",
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    """The body; text echoed from the request is made encodable (JSON may carry lone surrogates)."""
    return {"error": {"message": _printable(message), "type": type_, "param": param and _printable(param), "code": code}}


def _printable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def bad_value(error: ValueError, fields: set[str]) -> APIError:
    """A 400 for a ValueError from the engine or SamplingParams, whose messages start with the
    parameter's name ("temperature must be >= 0, got -1")."""
    message = str(error)
    first = message.split(" ", 1)[0]
    return APIError(400, message, param=first if first in fields else None)


def _validation_error(exc: RequestValidationError) -> APIError:
    """The first pydantic error as a 400 naming the field (`messages.0.role`)."""
    errors = exc.errors()
    if not errors:
        return APIError(400, "invalid request body")
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return APIError(400, f"malformed JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}")
    if not loc:
        return APIError(400, f"request body: {first.get('msg')}")
    path = ".".join(loc)
    return APIError(400, f"{path}: {first.get('msg')}", param=loc[0])


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), type_), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("internal error while serving a request", exc_info=exc)
        return JSONResponse(error_body("internal server error", "server_error"), status_code=500)
