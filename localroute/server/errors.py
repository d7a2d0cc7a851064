"""The one place where errors become JSON bodies, in the shape of the API the client speaks: OpenAI's
`{"error": {message, type, param, code}}` (Chat Completions, Completions, Responses and the rest)
or Anthropic's `{"type": "error", "error": {type, message}}` on `/v1/messages` (`api_for_path`)."""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from localroute.errors import LocalrouteError

log = logging.getLogger(__name__)

Api = Literal["openai", "anthropic"]

# Anthropic's error type by HTTP status (platform.claude.com/docs/en/api/errors)
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
                    403: "permission_error", 404: "not_found_error", 408: "timeout_error",
                    413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error",
                    504: "timeout_error", 529: "overloaded_error"}


def api_for_path(path: str) -> Api:
    return "anthropic" if path == "/v1/messages" or path.startswith("/v1/messages/") else "openai"


def anthropic_error_type(status: int) -> str:
    return _ANTHROPIC_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")


def anthropic_error_body(status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": anthropic_error_type(status), "message": message}}


def api_error_body(api: Api, status: int, message: str, type_: str, param: str | None = None,
                   code: str | None = None) -> dict[str, Any]:
    """An error body in `api`'s shape (Anthropic's has no param or code: the message names the field)."""
    if api == "anthropic":
        return anthropic_error_body(status, message)
    return error_body(message, type_, param, code)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(exc: LocalrouteError, api: Api = "openai") -> JSONResponse:
    headers = {}
    if exc.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
    if exc.status_code == 401 and api == "openai":
        headers["WWW-Authenticate"] = 'Bearer realm="localroute"'
    if exc.status_code == 408:  # a stalled body: the rest of it must not be read as the next request
        headers["Connection"] = "close"
    return JSONResponse(
        api_error_body(api, exc.status_code, exc.message, exc.error_type, exc.param, exc.code),
        status_code=exc.status_code,
        headers=headers,
    )


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    msg = str(first.get("msg", "invalid value"))
    if first.get("type") == "json_invalid":
        return "request body is not valid JSON", None
    return (f"{param}: {msg}" if param else msg), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(LocalrouteError)
    async def _localroute(request: Request, exc: LocalrouteError) -> JSONResponse:
        return error_response(exc, api_for_path(request.url.path))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(api_error_body(api_for_path(request.url.path), 400, message, "invalid_request_error",
                                           param, "invalid_value"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status_code)
        return JSONResponse(
            api_error_body(api_for_path(request.url.path), exc.status_code, str(exc.detail), type_, None, code),
            status_code=exc.status_code, headers=exc.headers,
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled %s on %s", type(exc).__name__, request.url.path)
        return JSONResponse(api_error_body(api_for_path(request.url.path), 500, "internal server error",
                                           "server_error", None, "internal_error"), 500)
