"""What the API translators share (server/anthropic/, server/responses/): the 400 for a field
that has no Chat Completions counterpart, and the encoding of named SSE events.

Every translator carries a field or refuses it with `untranslatable`: none is dropped silently.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from typing import Any, NoReturn

from pydantic import BaseModel

from localroute.errors import InvalidRequestError, LocalrouteError
from localroute.monitoring.record import RequestRecord
from localroute.server.http import dumps, parse_body

__all__ = ["answer_failed", "arguments_object", "read_body", "refuse_set", "rejected", "sse_event", "untranslatable"]


def untranslatable(param: str, why: str = "") -> NoReturn:
    """A field localroute cannot carry to a chat tier: a 400 naming it, never a silent drop."""
    detail = f" ({why})" if why else ""
    raise InvalidRequestError(f"{param}: cannot be translated to the router's chat request{detail}; remove it",
                              param=param, code="unsupported_field")


def refuse_set(obj: Mapping[str, Any], where: str, fields: Mapping[str, tuple[Any, ...]]) -> None:
    """Refuse each of `fields` that `obj` sets to something other than one of its harmless values
    (null, the API's default): those are accepted because they ask for nothing."""
    for name, harmless in fields.items():
        if name in obj and obj[name] is not None and obj[name] not in harmless:
            untranslatable(f"{where}{name}")


def arguments_object(arguments: str, where: str) -> dict[str, Any]:
    """A chat tool call's JSON-string arguments as the object the Messages API carries."""
    try:
        value = json.loads(arguments or "{}")
    except ValueError:
        value = None
    if not isinstance(value, dict):
        from localroute.errors import UpstreamError

        raise UpstreamError(f"{where}: the tier's tool call arguments are not a JSON object", code="bad_tool_call")
    return value


def sse_event(event: str, data: Mapping[str, Any]) -> bytes:
    """One named SSE event (`event:` and `data:` lines): both APIs dispatch on the event name."""
    return b"event: " + event.encode() + b"\ndata: " + dumps(data) + b"\n\n"


async def read_body(request: Any, model: type[BaseModel], max_depth: int) -> dict[str, Any]:
    """The request body validated by `model` (a 400 naming the field otherwise), as the JSON the
    client sent: only the fields it set, none filled in."""
    body = await parse_body(request, model, max_depth)
    return body.model_dump(by_alias=True, exclude_unset=True)


def rejected(svc: Any, endpoint: str, exc: LocalrouteError, started: float) -> None:
    """A request refused before routing still gets its row; the policy label is fixed (`rejected`)."""
    svc.record(RequestRecord(f"{endpoint}-{uuid.uuid4().hex}", endpoint, "rejected", False, exc.status_code,
                             started, time.perf_counter() - started, error=exc.code or exc.error_type))


def answer_failed(routed: Any, exc: BaseException) -> None:
    """Translating a served answer failed: its record says how (a tier's untranslatable answer is
    the error's own status, anything else a 500), then goes to the observers."""
    if isinstance(exc, LocalrouteError):
        routed.record.status_code, routed.record.error = exc.status_code, exc.code or exc.error_type
        routed.service.record(routed.record)
    else:
        routed.failed()
