"""Chat Completions answers -> Responses objects and events, as pure functions over JSON dicts
(requests go the other way: translate_request.py). `response_from_chat` makes the Response of one
chat answer; `ResponsesStream` turns chat chunks into the Responses event sequence and ends with
the same Response object. A tier speaking the Responses API answers as it sent it (`passed_through`,
`NativeResponsesStream`), with localroute's id, model, store fields and routing block.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from localroute.backends.openai_wire import NATIVE_ANSWER, NATIVE_EVENTS
from localroute.backends.responses_wire import LOGPROBS_INCLUDE
from localroute.server.translate import untranslatable

__all__ = ["NativeResponsesStream", "ResponsesStream", "passed_through", "response_events", "response_from_chat"]

# ---- answers: chat -> Response ----


def _suffix(chat_id: str) -> str:
    return chat_id.split("-", 1)[-1]


def message_item_id(chat_id: str) -> str:
    return "msg_" + _suffix(chat_id)


def call_item_id(chat_id: str, index: int) -> str:
    return f"fc_{_suffix(chat_id)}_{index}"


def response_logprobs(logprobs: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    def one(t: Mapping[str, Any]) -> dict[str, Any]:
        return {"token": t["token"], "bytes": t.get("bytes") or [], "logprob": t["logprob"]}

    return [{**one(t), "top_logprobs": [one(a) for a in t.get("top_logprobs") or ()]}
            for t in (logprobs or {}).get("content") or ()]


def usage_from_chat(usage: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not usage:
        return None
    prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    return {"input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": int((usage.get("prompt_tokens_details") or {})
                                                          .get("cached_tokens") or 0)},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": int((usage.get("completion_tokens_details") or {})
                                                              .get("reasoning_tokens") or 0)},
            "total_tokens": prompt + completion}


def response_object(body: Mapping[str, Any], response_id: str, created_at: float, status: str,
                    output: list[dict[str, Any]], usage: dict[str, Any] | None) -> dict[str, Any]:
    """The Response object, echoing the request's settings as OpenAI does."""
    return {
        "id": response_id, "object": "response", "created_at": created_at, "status": status,
        "error": None, "incomplete_details": None, "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"), "model": body["model"], "output": output,
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": body.get("previous_response_id"), "reasoning": body.get("reasoning"),
        "service_tier": body.get("service_tier"), "store": body.get("store", True),
        "temperature": body.get("temperature"), "text": body.get("text") or {"format": {"type": "text"}},
        "tool_choice": body.get("tool_choice", "auto"), "tools": body.get("tools") or [],
        "top_logprobs": body.get("top_logprobs"), "top_p": body.get("top_p"),
        "truncation": body.get("truncation", "disabled"), "usage": usage, "user": body.get("user"),
        "metadata": body.get("metadata") or {},
    }


def wants_logprobs(body: Mapping[str, Any]) -> bool:
    """Whether the client asked for logprobs (a remote tier may send them unasked)."""
    return LOGPROBS_INCLUDE in (body.get("include") or ()) or (body.get("top_logprobs") or 0) > 0


def response_from_chat(answer: Mapping[str, Any], body: Mapping[str, Any], response_id: str,
                       created_at: float) -> dict[str, Any]:
    """A chat completion (one choice) as a Response; the routing block stays `localroute`."""
    chat_id = str(answer.get("id", ""))
    choice = answer["choices"][0]
    msg = choice.get("message") or {}
    parts: list[dict[str, Any]] = []
    content = msg.get("content")
    text = "".join(p.get("text", "") for p in content) if isinstance(content, list) else content
    if text:
        part: dict[str, Any] = {"type": "output_text", "text": text, "annotations": msg.get("annotations") or []}
        if wants_logprobs(body):
            part["logprobs"] = response_logprobs(choice.get("logprobs"))
        parts.append(part)
    if msg.get("refusal"):
        parts.append({"type": "refusal", "refusal": msg["refusal"]})
    output: list[dict[str, Any]] = []
    if parts:
        output.append({"type": "message", "id": message_item_id(chat_id), "status": "completed",
                       "role": "assistant", "content": parts})
    for i, call in enumerate(msg.get("tool_calls") or ()):
        if call.get("type", "function") != "function":
            untranslatable(f"choices.0.message.tool_calls.{i}", f"a {call.get('type')} tool call")
        output.append({"type": "function_call", "id": call_item_id(chat_id, i), "call_id": call["id"],
                       "name": call["function"]["name"], "arguments": call["function"].get("arguments", ""),
                       "status": "completed"})
    finish = choice.get("finish_reason")
    incomplete = {"length": "max_output_tokens", "content_filter": "content_filter"}.get(finish or "")
    out = response_object(body, response_id, created_at, "incomplete" if incomplete else "completed", output,
                          usage_from_chat(answer.get("usage")))
    if incomplete:
        out["incomplete_details"] = {"reason": incomplete}
    if "localroute" in answer:
        out["localroute"] = answer["localroute"]
    return out


# ---- streams: chat chunks -> Responses events ----


Event = tuple[str, dict[str, Any]]


class ResponsesStream:
    """Chat chunks in, Responses events out: `start()`, `feed(chunk)` per chunk, `finish()` once.
    The chunks are also gathered into one chat answer, so the terminal event carries exactly the
    Response a non-streamed request would have got (`self.response`)."""

    def __init__(self, body: Mapping[str, Any], response_id: str, created_at: float, chat_id: str) -> None:
        self.body, self.response_id, self.created_at, self.chat_id = body, response_id, created_at, chat_id
        self._seq = 0
        self._text: list[str] = []
        self._refusal: list[str] = []
        self._logprobs: list[dict[str, Any]] = []
        self._want_logprobs = wants_logprobs(body)
        self._calls: list[dict[str, Any]] = []
        self._open: str | None = None  # "text", "refusal" or "call"
        self._items = 0  # output items opened so far
        self._message_index: int | None = None
        self._message_done = False
        self._parts = 0
        self._finish: str | None = None
        self._usage: Any = None
        self._routing: Any = None
        self.failed = False
        self.response: dict[str, Any] | None = None

    def _event(self, kind: str, **data: Any) -> Event:
        self._seq += 1
        return kind, {"type": kind, "sequence_number": self._seq - 1, **data}

    def start(self) -> list[Event]:
        skeleton = response_object(self.body, self.response_id, self.created_at, "in_progress", [], None)
        return [self._event("response.created", response=skeleton),
                self._event("response.in_progress", response=skeleton)]

    def _msg_id(self) -> str:
        return message_item_id(self.chat_id)

    def _message_item(self, status: str, content: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self._msg_id(), "type": "message", "status": status, "role": "assistant", "content": content}

    def _part(self, kind: str) -> dict[str, Any]:
        if kind == "text":
            part: dict[str, Any] = {"type": "output_text", "text": "".join(self._text), "annotations": []}
            if self._want_logprobs:
                part["logprobs"] = list(self._logprobs)
            return part
        return {"type": "refusal", "refusal": "".join(self._refusal)}

    def _close(self) -> list[Event]:
        kind, self._open = self._open, None
        if kind is None:
            return []
        if kind == "call":
            call = self._calls[-1]
            i = len(self._calls) - 1
            item = {"type": "function_call", "id": call_item_id(self.chat_id, i), "call_id": call["id"],
                    "name": call["name"], "arguments": call["arguments"], "status": "completed"}
            return [self._event("response.function_call_arguments.done", item_id=item["id"],
                                output_index=call["output_index"], name=call["name"], arguments=call["arguments"]),
                    self._event("response.output_item.done", output_index=call["output_index"], item=item)]
        part = self._part(kind)
        where = {"item_id": self._msg_id(), "output_index": self._message_index, "content_index": self._parts - 1}
        events = []
        if kind == "text":
            events.append(self._event("response.output_text.done", **where, text=part["text"],
                                      logprobs=part.get("logprobs", [])))
        else:
            events.append(self._event("response.refusal.done", **where, refusal=part["refusal"]))
        events.append(self._event("response.content_part.done", **where, part=part))
        return events

    def _close_message(self) -> list[Event]:
        events = self._close()
        if self._message_index is not None and not self._message_done:
            self._message_done = True
            content = [self._part(k) for k in ("text", "refusal") if (self._text if k == "text" else self._refusal)]
            events.append(self._event("response.output_item.done", output_index=self._message_index,
                                      item=self._message_item("completed", content)))
        return events

    def _piece(self, kind: str, delta: str, logprobs: list[dict[str, Any]]) -> list[Event]:
        events: list[Event] = []
        if self._open == "call" or (self._open is None and self._calls):
            untranslatable("choices.0.delta", "text after a tool call")
        if self._message_index is None:
            self._message_index = self._items
            self._items += 1
            events.append(self._event("response.output_item.added", output_index=self._message_index,
                                      item=self._message_item("in_progress", [])))
        if self._open != kind:
            events += self._close()
            self._open = kind
            self._parts += 1
            empty = ({"type": "output_text", "text": "", "annotations": []} if kind == "text"
                     else {"type": "refusal", "refusal": ""})
            events.append(self._event("response.content_part.added", item_id=self._msg_id(),
                                      output_index=self._message_index, content_index=self._parts - 1, part=empty))
        where = {"item_id": self._msg_id(), "output_index": self._message_index, "content_index": self._parts - 1}
        if kind == "text":
            self._text.append(delta)
            self._logprobs += logprobs
            events.append(self._event("response.output_text.delta", **where, delta=delta, logprobs=logprobs))
        else:
            self._refusal.append(delta)
            events.append(self._event("response.refusal.delta", **where, delta=delta))
        return events

    def feed(self, chunk: Mapping[str, Any]) -> list[Event]:
        if chunk.get("error") is not None:
            return self._fail(chunk["error"])
        events: list[Event] = []
        if chunk.get("usage"):
            self._usage = chunk["usage"]
        if chunk.get("localroute") is not None:
            self._routing = chunk["localroute"]
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            if delta.get("content"):
                logprobs = response_logprobs(choice.get("logprobs")) if self._want_logprobs else []
                events += self._piece("text", delta["content"], logprobs)
            if delta.get("refusal"):
                events += self._piece("refusal", delta["refusal"], [])
            for call in delta.get("tool_calls") or ():
                f = call.get("function") or {}
                if call.get("id"):
                    events += self._close() if self._open == "call" else self._close_message()
                    self._open = "call"
                    self._calls.append({"id": call["id"], "name": f.get("name", ""), "arguments": "",
                                        "output_index": self._items, "index": call.get("index", 0)})
                    self._items += 1
                    item = {"type": "function_call", "id": call_item_id(self.chat_id, len(self._calls) - 1),
                            "call_id": call["id"], "name": f.get("name", ""), "arguments": "", "status": "in_progress"}
                    events.append(self._event("response.output_item.added", output_index=self._items - 1, item=item))
                elif self._open != "call" or self._calls[-1]["index"] != call.get("index", 0):
                    untranslatable("choices.0.delta.tool_calls", "tool call deltas interleaved across calls")
                if f.get("arguments"):
                    current = self._calls[-1]
                    current["arguments"] += f["arguments"]
                    events.append(self._event("response.function_call_arguments.delta",
                                              item_id=call_item_id(self.chat_id, len(self._calls) - 1),
                                              output_index=current["output_index"], delta=f["arguments"]))
            if choice.get("finish_reason") is not None:
                self._finish = choice["finish_reason"]
        return events

    def _fail(self, error: Any) -> list[Event]:
        self.failed = True
        err = error if isinstance(error, dict) else {"message": str(error)}
        code, message = err.get("code") or err.get("type") or "server_error", str(err.get("message", "error"))
        failed = response_object(self.body, self.response_id, self.created_at, "failed", [], None)
        failed["error"] = {"code": code, "message": message}
        return [self._event("error", code=code, message=message, param=err.get("param")),
                self._event("response.failed", response=failed)]

    def not_stored(self, message: str) -> list[Event]:
        """After the terminal event: the answer stands (no response.failed), but it was not stored."""
        return [self._event("error", code="store_failed", message=message, param=None)]

    def answer(self) -> dict[str, Any]:
        """The chunks gathered into one chat answer."""
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self._text) or None,
                                   "refusal": "".join(self._refusal) or None}
        if self._calls:
            message["tool_calls"] = [{"id": c["id"], "type": "function",
                                      "function": {"name": c["name"], "arguments": c["arguments"]}}
                                     for c in self._calls]
        choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": self._finish,
                                  "logprobs": {"content": self._logprobs} if self._want_logprobs else None}
        answer: dict[str, Any] = {"id": self.chat_id, "choices": [choice], "usage": self._usage}
        if self._routing is not None:
            answer["localroute"] = self._routing
        return answer

    def finish(self) -> list[Event]:
        if self.failed:
            return []
        events = self._close() if self._open == "call" else self._close_message()
        self.response = response_from_chat(self.answer(), self.body, self.response_id, self.created_at)
        kind = "response.completed" if self.response["status"] == "completed" else "response.incomplete"
        return events + [self._event(kind, response=self.response)]


# ---- passthrough: a tier speaking the Responses API (responses_api = true) ----


def passed_through(native: Mapping[str, Any], body: Mapping[str, Any], response_id: str,
                   routing: Any) -> dict[str, Any]:
    """A Response as the tier sent it, with localroute's id, the model the client named, its
    `store` and `previous_response_id` (localroute's, not what the tier was sent) and the routing block."""
    out = {**native, "id": response_id, "model": body["model"], "store": body.get("store", True),
           "previous_response_id": body.get("previous_response_id")}
    if routing is not None:
        out["localroute"] = routing
    return out


_TERMINAL = ("response.completed", "response.incomplete", "response.failed")


def _part_events(item_id: str, output_index: int, content_index: int, part: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One content part of a message item as its added / delta / done events."""
    where = {"item_id": item_id, "output_index": output_index, "content_index": content_index}
    kind = part.get("type")
    if kind == "output_text":
        text, logprobs = str(part.get("text", "")), list(part.get("logprobs") or [])
        empty = {**part, "text": "", "annotations": [], **({"logprobs": []} if "logprobs" in part else {})}
        events = [{"type": "response.content_part.added", **where, "part": empty}]
        if text:
            events.append({"type": "response.output_text.delta", **where, "delta": text, "logprobs": logprobs})
        events += [{"type": "response.output_text.annotation.added", **where, "annotation_index": i,
                    "annotation": annotation} for i, annotation in enumerate(part.get("annotations") or ())]
        events.append({"type": "response.output_text.done", **where, "text": text, "logprobs": logprobs})
    elif kind == "refusal":
        refusal = str(part.get("refusal", ""))
        events = [{"type": "response.content_part.added", **where, "part": {**part, "refusal": ""}}]
        if refusal:
            events.append({"type": "response.refusal.delta", **where, "delta": refusal})
        events.append({"type": "response.refusal.done", **where, "refusal": refusal})
    else:  # a part type added later: added and done as sent
        events = [{"type": "response.content_part.added", **where, "part": part}]
    return [*events, {"type": "response.content_part.done", **where, "part": part}]


def _item_events(index: int, item: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One output item as the events a Responses stream carries it in, between its
    output_item.added (the item as it opens) and output_item.done (the item as sent)."""
    kind, item_id = item.get("type"), str(item.get("id", ""))
    at = {"item_id": item_id, "output_index": index}
    opened: dict[str, Any] = {**item}
    inner: list[dict[str, Any]] = []
    if "status" in item:
        opened["status"] = "in_progress"
    if kind == "message" and isinstance(item.get("content"), list):
        opened["content"] = []
        for j, part in enumerate(item["content"]):
            inner += _part_events(item_id, index, j, part)
    elif kind == "function_call":
        opened["arguments"] = ""
        arguments = str(item.get("arguments", ""))
        if arguments:
            inner.append({"type": "response.function_call_arguments.delta", **at, "delta": arguments})
        inner.append({"type": "response.function_call_arguments.done", **at, "name": item.get("name"),
                      "arguments": arguments})
    elif kind == "reasoning":
        opened["summary"] = []
        for j, part in enumerate(item.get("summary") or ()):
            where = {**at, "summary_index": j}
            text = str(part.get("text", ""))
            inner += [{"type": "response.reasoning_summary_part.added", **where, "part": {**part, "text": ""}},
                      *([{"type": "response.reasoning_summary_text.delta", **where, "delta": text}] if text else []),
                      {"type": "response.reasoning_summary_text.done", **where, "text": text},
                      {"type": "response.reasoning_summary_part.done", **where, "part": part}]
        if isinstance(item.get("content"), list):
            opened["content"] = []
            for j, part in enumerate(item["content"]):
                where = {**at, "content_index": j}
                text = str(part.get("text", ""))
                inner += [*([{"type": "response.reasoning_text.delta", **where, "delta": text}] if text else []),
                          {"type": "response.reasoning_text.done", **where, "text": text}]
    # any other item (a hosted tool's call or output, mcp, custom tool): opened and done as sent
    else:
        opened = dict(item)
    return [{"type": "response.output_item.added", "output_index": index, "item": opened}, *inner,
            {"type": "response.output_item.done", "output_index": index, "item": dict(item)}]


def response_events(response: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A whole Response (a buffered answer of a tier speaking the Responses API, sent to a client
    that streams) as the event sequence that tier would have streamed: created, in_progress, every
    output item as sent (messages, function calls, reasoning, hosted tools' items, in order), and
    the terminal event carrying the Response itself. Numbered from 0; for NativeResponsesStream."""
    running = {**response, "status": "in_progress", "output": [], "usage": None}
    events = [{"type": "response.created", "response": running}, {"type": "response.in_progress", "response": running}]
    for i, item in enumerate(response.get("output") or ()):
        events += _item_events(i, item)
    status = response.get("status")
    terminal = "response.incomplete" if status == "incomplete" else \
        "response.failed" if status == "failed" else "response.completed"
    events.append({"type": terminal, "response": dict(response)})
    return [{**e, "sequence_number": i} for i, e in enumerate(events)]


class NativeResponsesStream(ResponsesStream):
    """The events of a tier speaking the Responses API (carried on the chunks: NATIVE_EVENTS), as
    it sent them, or its buffered Response (NATIVE_ANSWER) as the events of `response_events`; each Response they carry gets `passed_through`'s id, model, store and
    previous_response_id, and the terminal one (held until the last chunk) the routing block. An
    error after the first byte ends it as ResponsesStream does, numbered after the tier's events."""

    def __init__(self, body: Mapping[str, Any], response_id: str, created_at: float, chat_id: str) -> None:
        super().__init__(body, response_id, created_at, chat_id)
        self._held: list[Event] = []

    def start(self) -> list[Event]:
        return []

    def feed(self, chunk: Mapping[str, Any]) -> list[Event]:
        if chunk.get("error") is not None:
            return self._fail(chunk["error"])
        if chunk.get("localroute") is not None:
            self._routing = chunk["localroute"]
        out: list[Event] = []
        answer = chunk.get(NATIVE_ANSWER)
        for event in chunk.get(NATIVE_EVENTS) or (response_events(answer) if isinstance(answer, dict) else ()):
            kind = str(event.get("type", ""))
            if isinstance(event.get("sequence_number"), int):
                self._seq = event["sequence_number"] + 1
            if isinstance(event.get("response"), dict):
                event = {**event, "response": passed_through(event["response"], self.body, self.response_id, None)}
            if kind in _TERMINAL:
                self._held.append((kind, event))
            else:
                out.append((kind, event))
        return out

    def finish(self) -> list[Event]:
        if self.failed:
            return []
        out = []
        for kind, event in self._held:
            if kind in _TERMINAL:
                response = passed_through(event["response"], self.body, self.response_id, self._routing)
                event = {**event, "response": response}
                self.response = response
            out.append((kind, event))
        return out

