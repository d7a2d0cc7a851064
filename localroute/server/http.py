"""ASGI plumbing of the HTTP edge: body size/time limits, JSON parsing with clear 400s, the
client-disconnect watch, the JSON renderer and the route class whose handlers parse their own body."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar, cast

import orjson
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from localroute.errors import (
    ClientDisconnectedError,
    InvalidRequestError,
    RequestTimeoutError,
    RequestTooLargeError,
)
from localroute.server.errors import api_for_path, error_response

__all__ = ["AnswerResponse", "BodyLimitMiddleware", "RequestRoute", "dumps", "parse_body", "parse_json_body",
           "request_body_schema", "until_disconnect", "validate"]

M = TypeVar("M", bound=BaseModel)
_KEY_BEFORE = re.compile(r'"((?:[^"\\]|\\.){1,100})"\s*:\s*-?$')  # the key whose value failed to parse


class BodyLimitMiddleware:
    """Size and time limits on a request body, before any parsing. Size: 413 at once by
    Content-Length, else (chunked bodies) as soon as the bytes received pass the cap, without
    buffering the rest. Time: the whole body must arrive within `timeout_s` of its headers, else 408
    (8 of 100 promised bytes, or a chunked body that never ends, no longer hold a connection and a
    task for ever). Pure ASGI, so it adds no task; once the body is in, reads are not timed (the
    disconnect watcher's wait for `http.disconnect` is not a body read)."""

    def __init__(self, app: Any, max_bytes: int, timeout_s: float | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    def _error(self) -> RequestTooLargeError:
        return RequestTooLargeError(f"request body over {self.max_bytes} bytes")

    async def __call__(self, scope: Any, receive: Callable[[], Awaitable[Any]], send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or ()).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            await error_response(self._error(), api_for_path(scope.get("path", "")))(scope, receive, send)
            return
        received = 0
        timeout_s = self.timeout_s
        deadline = None if timeout_s is None else asyncio.get_running_loop().time() + timeout_s

        async def limited() -> Any:
            nonlocal received, deadline
            if deadline is None:
                message = await receive()
            else:
                try:
                    async with asyncio.timeout_at(deadline):
                        message = await receive()
                except TimeoutError:
                    raise RequestTimeoutError(f"request body not received within {timeout_s:g}s") from None
            if message.get("type") == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._error()  # mapped to the 413 body by the LocalrouteError handler
                if not message.get("more_body", False):
                    deadline = None  # the body is in
            else:
                deadline = None  # http.disconnect
            return message

        await self.app(scope, limited, send)


async def until_disconnect(request: Request, work: Awaitable[Any]) -> Any:
    """Await `work` in this task, cancelling it if the client disconnects first
    (ClientDisconnectedError): a local decode for nobody must stop and free its slot; a frontier
    call must be aborted. A watcher task waits for the ASGI `http.disconnect` message (the body has
    been read, so that is the only message left) and cancels this task when it comes: no polling,
    and the work's result needs no extra hop through another task."""
    me = asyncio.current_task()
    gone = False

    async def watch() -> None:
        nonlocal gone
        while True:
            message = await request.receive()
            if message.get("type") == "http.disconnect":
                gone = True
                if me is not None:
                    me.cancel()
                return

    watcher = asyncio.create_task(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if not gone:
            raise
        if me is not None:
            me.uncancel()  # the cancellation was ours, turned into an error: not the task's own
        raise ClientDisconnectedError("client disconnected") from None
    finally:
        watcher.cancel()


def parse_json_body(raw: bytes, max_depth: int) -> dict[str, Any]:
    """A request body as a JSON object, or InvalidRequestError (400) saying why not.

    orjson, because the standard parser lets through what JSON forbids and no engine may see (NaN
    and Infinity literals, numbers that overflow to infinity such as 1e400, lone "\\ud800"
    surrogates) and raises RecursionError, a 500, past about 1,000 levels of nesting. orjson refuses
    all of these (its own nesting limit is 1,024); the tighter `max_depth` is then checked without
    recursion, because what reads the body next (pydantic, a grammar, jsonschema, the frontier
    client's encoder) recurses."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if "depth" in exc.msg:
            raise InvalidRequestError(f"request body nests deeper than {max_depth} levels") from None
        key = _KEY_BEFORE.search(exc.doc, max(0, exc.pos - 200), exc.pos) if isinstance(exc.doc, str) else None
        param = key.group(1) if key else None  # `"temperature": NaN` names temperature
        where = f" in {param!r}" if param else ""
        raise InvalidRequestError(f"request body is not valid JSON{where}: {exc.msg} at position {exc.pos}",
                                  param=param) from None
    if not isinstance(data, dict):
        raise InvalidRequestError("request body must be a JSON object")
    if nests_deeper(data, max_depth):
        raise InvalidRequestError(f"request body nests deeper than {max_depth} levels")
    return data


def nests_deeper(value: Any, limit: int) -> bool:
    """Whether `value` holds objects/arrays nested more than `limit` deep (the top one is level 1).
    Iterative: a stack of (container, level), each container visited once."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, level = stack.pop()
        children = node.values() if isinstance(node, dict) else node
        for child in children:
            if isinstance(child, (dict, list)):
                if level >= limit:
                    return True
                stack.append((child, level + 1))
    return False


def dumps(content: Any) -> bytes:
    """Compact JSON for answers and stream chunks, by orjson (numpy scalars and non-string keys
    included; NaN and infinities, which answers never carry, become null). What orjson refuses, a
    lone surrogate in a frontier's text or an integer beyond 64 bits, goes through the standard
    encoder, which escapes it."""
    try:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)
    except TypeError:  # orjson.JSONEncodeError
        return json.dumps(content, separators=(",", ":"), default=_plain).encode()


def _plain(value: Any) -> Any:
    item = getattr(value, "item", None)  # numpy scalars
    return item() if callable(item) else str(value)


class AnswerResponse(JSONResponse):
    """An answer's JSON body, encoded by `dumps`."""

    def render(self, content: Any) -> bytes:
        return dumps(content)


class RequestRoute(APIRoute):
    """A route whose endpoint takes the Request and returns a Response itself (it reads and validates
    its own body, so bad input gets an OpenAI-shaped 400): FastAPI's dependency solving and response
    serialisation are skipped on the request path, and OpenAPI still documents the route."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        return cast(Callable[[Request], Coroutine[Any, Any, Response]], self.endpoint)


def _inline_refs(schema: Any, defs: dict[str, Any]) -> Any:
    if isinstance(schema, dict):
        if "$ref" in schema:
            return _inline_refs(defs[schema["$ref"].rsplit("/", 1)[-1]], defs)
        return {k: _inline_refs(v, defs) for k, v in schema.items() if k != "$defs"}
    if isinstance(schema, list):
        return [_inline_refs(v, defs) for v in schema]
    return schema


def request_body_schema(model: type[Any]) -> dict[str, Any]:
    """OpenAPI requestBody for a route that parses its raw body itself (so bad input gets an
    OpenAI-shaped 400, not FastAPI's 422): the pydantic model's JSON schema, refs inlined."""
    schema = model.model_json_schema()
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": _inline_refs(schema, schema.get("$defs", {}))}}}}


async def parse_body(request: Request, model: type[M], max_depth: int) -> M:
    """The request's JSON body as `model`; a client that left mid-body, bad JSON or a field that
    fails validation each get their own clear error (499, 400, 400 naming the field)."""
    try:
        raw = await request.body()
    except ClientDisconnect:  # the client left (or its connection was closed) mid-body
        raise ClientDisconnectedError("client disconnected") from None
    return validate(parse_json_body(raw, max_depth), model)


def validate(data: dict[str, Any], model: type[M]) -> M:
    """A parsed JSON body as `model`, or a 400 naming the first field that fails."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        # the error that got deepest into the body: a union's branches each report one
        loc, msg = max(((_body_path(data, e.get("loc", ()), e.get("type") == "missing"), e.get("msg"))
                        for e in exc.errors()), key=lambda pair: len(pair[0]))
        param = ".".join(str(p) for p in loc) or None
        raise InvalidRequestError(f"{param}: {msg}" if param else str(msg),
                                  param=param, code="invalid_value") from None


def _body_path(data: Any, loc: tuple[Any, ...], missing: bool) -> list[Any]:
    """A validation error's location as a path in the body: pydantic's union branch labels
    (`str`, `list[...]`, a discriminator's tag) are not keys of the body, so they are dropped."""
    path: list[Any] = []
    node = data
    for i, seg in enumerate(loc):
        in_body = (isinstance(node, dict) and seg in node
                   or isinstance(node, list) and isinstance(seg, int) and 0 <= seg < len(node))
        if in_body:
            node = node[seg]
        elif not (missing and i == len(loc) - 1):
            continue
        path.append(seg)
    return path
