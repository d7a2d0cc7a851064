"""A fault-injecting OpenAI-compatible upstream: a real HTTP/1.1 server on 127.0.0.1 whose
behaviour each test scripts (answer, delay, 5xx, 429 + Retry-After, HTML with a 200, a stream cut
mid-way, a stall that keeps sending keep-alives, a hang, an early close). It records every request
it receives (`requests`: method, path, headers, JSON body), and can answer with a scripted
chat.completion (`Fault.completion`) or scripted stream chunks (`Fault.chunks`), sent exactly.

It is a raw asyncio socket server rather than a web framework so that faults are real at the
wire: a cut stream is a closed socket without the terminating chunk, a stall really holds the
connection open, and a client that gives up is seen as an EOF (counted in `aborted`).
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, Literal, Self

FaultKind = Literal["ok", "status", "garbage", "cut", "stall", "hang", "close"]


@dataclass
class Fault:
    """What the upstream does with one request."""

    kind: FaultKind = "ok"
    delay_s: float = 0.0  # before anything is sent
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: str | None = None  # for kind="status"/"garbage"
    stall_body: bool = False  # kind="status": send the headers and half the body, then hold the connection
    text: str = "The frontier answers: Paris is the capital of France."
    token_delay_s: float = 0.0  # between streamed tokens
    cut_after: int = 2  # tokens streamed before kind="cut" closes the socket / kind="stall" stalls
    keepalive_every_s: float = 0.1  # kind="stall": comment lines sent this often
    prompt_tokens: int | None = None  # usage reported; None: a count from the request
    completion_tokens: int | None = None
    completion: dict[str, Any] | None = None  # the exact non-streamed answer (tool calls, refusals, n > 1)
    chunks: list[dict[str, Any]] | None = None  # the exact stream: each a data event, then [DONE]
    # the exact stream as named events (Anthropic Messages: `event: <type>` then its data, no [DONE])
    events: list[dict[str, Any]] | None = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def refused_url() -> str:
    """A base URL on 127.0.0.1 where nothing listens: connection refused."""
    return f"http://127.0.0.1:{_free_port()}/v1"


class FaultUpstream:
    """Start with `with FaultUpstream() as up:`; `up.script(Fault(...), ...)` queues behaviours,
    one per request in arrival order; `up.default` answers once the queue is empty."""

    def __init__(self, default: Fault | None = None) -> None:
        self.default = default or Fault()
        self.chooser: Callable[[], Fault] | None = None  # when set, picks each unscripted behaviour
        # when set, picks each unscripted behaviour from the request (method, path, headers, json)
        self.responder: Callable[[dict[str, Any]], Fault] | None = None
        self._queue: deque[Fault] = deque()
        self._lock = threading.Lock()
        self.requests: list[dict[str, Any]] = []
        self.aborted = 0  # clients that closed before the response was complete
        self.completed = 0
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    # ---- control (test thread) ----

    def script(self, *faults: Fault) -> None:
        with self._lock:
            self._queue.extend(faults)

    def _next(self, request: dict[str, Any] | None = None) -> Fault:
        with self._lock:
            if self._queue:
                return self._queue.popleft()
            if self.responder is not None and request is not None:
                return self.responder(request)
            return self.chooser() if self.chooser is not None else self.default

    def __enter__(self) -> Self:
        self._thread = threading.Thread(target=self._run, name="fault-upstream", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fault upstream did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        loop = self._loop
        if loop is not None:
            loop.call_soon_threadsafe(self._stop)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def wait_for(self, predicate: Any, timeout_s: float = 5.0) -> bool:
        """Poll until predicate(self) is true (e.g. an abort was seen)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate(self):
                return True
            time.sleep(0.02)
        return bool(predicate(self))

    # ---- the server (its own thread and loop) ----

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        self._server = loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", self.port))
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def _stop(self) -> None:
        assert self._loop is not None
        if self._server is not None:
            self._server.close()
        for task in asyncio.all_tasks(self._loop):
            task.cancel()
        self._loop.call_later(0.05, self._loop.stop)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await self._read_request(reader)
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            writer.close()
            return
        if request is None:
            writer.close()
            return
        with self._lock:
            self.requests.append(request)
        fault = self._next(request)
        eof = asyncio.ensure_future(reader.read(1))  # completes when the client goes away
        try:
            finished = await self._respond(fault, request, writer, eof)
            with self._lock:
                if finished:
                    self.completed += 1
                else:
                    self.aborted += 1
        except (ConnectionError, asyncio.CancelledError):
            with self._lock:
                self.aborted += 1
        finally:
            eof.cancel()
            with suppress(OSError, RuntimeError):
                writer.close()

    async def _read_request(self, reader: asyncio.StreamReader) -> dict[str, Any] | None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        length = int(headers.get("content-length", "0") or 0)
        raw = await reader.readexactly(length) if length else b""
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = {"_raw": raw.decode("utf-8", "replace")}
        return {"method": method, "path": path, "headers": headers, "json": body, "t": time.monotonic()}

    async def _pause(self, seconds: float, eof: asyncio.Future[bytes]) -> bool:
        """Sleep; False if the client closed the connection meanwhile."""
        if seconds <= 0:
            return not eof.done()
        done, _ = await asyncio.wait({eof}, timeout=seconds)
        return not done

    async def _respond(
        self, fault: Fault, request: dict[str, Any], writer: asyncio.StreamWriter, eof: asyncio.Future[bytes]
    ) -> bool:
        if not await self._pause(fault.delay_s, eof):
            return False
        if fault.kind == "close":
            return True
        if fault.kind == "hang":
            return await self._pause(60.0, eof)
        if fault.kind == "status":
            body = fault.body if fault.body is not None else json.dumps(
                {"error": {"message": f"upstream says {fault.status}", "type": "server_error", "code": None}}
            )
            if fault.stall_body:
                payload = body.encode()
                writer.write(self._head(fault.status, "application/json",
                                        {**fault.headers, "Content-Length": str(len(payload))}))
                writer.write(payload[: len(payload) // 2])
                await writer.drain()
                return await self._pause(60.0, eof)
            await self._plain(writer, fault.status, body, "application/json", fault.headers)
            return True
        if fault.kind == "garbage":
            body = fault.body if fault.body is not None else "<html><body><h1>502 Bad Gateway</h1></body></html>"
            await self._plain(writer, 200, body, "text/html", fault.headers)
            return True
        if request["json"].get("stream"):
            return await self._stream(fault, request, writer, eof)
        if fault.kind == "stall":
            # a non-streamed answer that never comes while whitespace keeps the socket busy
            writer.write(self._head(200, "application/json", {"Transfer-Encoding": "chunked"}))
            while await self._pause(fault.keepalive_every_s, eof):
                writer.write(self._chunk(b" "))
                await writer.drain()
            return False
        if fault.kind == "cut":
            payload = json.dumps(self._completion(fault, request)).encode()
            writer.write(self._head(200, "application/json", {"Content-Length": str(len(payload))}))
            writer.write(payload[: len(payload) // 2])
            await writer.drain()
            return True
        await self._plain(writer, 200, json.dumps(self._completion(fault, request)), "application/json", {})
        return True

    async def _stream(
        self, fault: Fault, request: dict[str, Any], writer: asyncio.StreamWriter, eof: asyncio.Future[bytes]
    ) -> bool:
        writer.write(self._head(200, "text/event-stream", {"Transfer-Encoding": "chunked"}))
        if fault.events is not None:
            for i, event in enumerate(fault.events):
                if fault.kind == "cut" and i >= fault.cut_after:
                    return True
                if i and not await self._pause(fault.token_delay_s, eof):
                    return False
                writer.write(self._chunk(f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()))
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            return True
        if fault.chunks is not None:
            for scripted in fault.chunks:
                writer.write(self._event(scripted))
            writer.write(self._chunk(b"data: [DONE]\n\n"))
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            return True
        model = request["json"].get("model", "frontier-model")
        base = {"id": "chatcmpl-fault", "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
        writer.write(self._event({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                       "finish_reason": None}]}))
        await writer.drain()
        words = self._words(fault.text)
        for i, word in enumerate(words):
            if fault.kind == "cut" and i >= fault.cut_after:
                return True  # the socket closes without the terminating chunk
            if fault.kind == "stall" and i >= fault.cut_after:
                while await self._pause(fault.keepalive_every_s, eof):
                    writer.write(self._chunk(b": keep-alive\n\n"))
                    await writer.drain()
                return False
            if not await self._pause(fault.token_delay_s, eof):
                return False
            choice = {"index": 0, "delta": {"content": word}, "finish_reason": None,
                      "logprobs": {"content": [self._logprob(word)]}}
            writer.write(self._event({**base, "choices": [choice]}))
            await writer.drain()
        writer.write(self._event({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
        writer.write(self._event({**base, "choices": [], "usage": self._usage(fault, request, len(words))}))
        writer.write(self._chunk(b"data: [DONE]\n\n"))
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True

    # ---- wire helpers ----

    @staticmethod
    def _head(status: int, content_type: str, headers: dict[str, str]) -> bytes:
        lines = [f"HTTP/1.1 {status} X", f"Content-Type: {content_type}", "Connection: close"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def _plain(self, writer: asyncio.StreamWriter, status: int, body: str, ctype: str,
                     headers: dict[str, str]) -> None:
        payload = body.encode()
        writer.write(self._head(status, ctype, {**headers, "Content-Length": str(len(payload))}) + payload)
        await writer.drain()

    @staticmethod
    def _chunk(data: bytes) -> bytes:
        return f"{len(data):x}\r\n".encode() + data + b"\r\n"

    def _event(self, data: dict[str, Any]) -> bytes:
        return self._chunk(f"data: {json.dumps(data)}\n\n".encode())

    @staticmethod
    def _words(text: str) -> list[str]:
        parts = text.split(" ")
        return [p if i == 0 else " " + p for i, p in enumerate(parts)]

    @staticmethod
    def _logprob(word: str) -> dict[str, Any]:
        return {"token": word, "logprob": -0.01, "bytes": list(word.encode()), "top_logprobs": []}

    @staticmethod
    def _usage(fault: Fault, request: dict[str, Any], n_words: int) -> dict[str, int]:
        prompt = fault.prompt_tokens
        if prompt is None:
            prompt = sum(len(str(m.get("content", "")).split()) + 4 for m in request["json"].get("messages") or [])
        completion = fault.completion_tokens if fault.completion_tokens is not None else n_words
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _completion(self, fault: Fault, request: dict[str, Any]) -> dict[str, Any]:
        if fault.completion is not None:
            return fault.completion
        words = self._words(fault.text)
        return {
            "id": "chatcmpl-fault",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request["json"].get("model", "frontier-model"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": fault.text},
                         "logprobs": {"content": [self._logprob(w) for w in words]}, "finish_reason": "stop"}],
            "usage": self._usage(fault, request, len(words)),
        }


@contextmanager
def fault_upstream(*faults: Fault, default: Fault | None = None) -> Iterator[FaultUpstream]:
    """`with fault_upstream(Fault("status", status=500)) as up:` — started, scripted, stopped."""
    with FaultUpstream(default) as up:
        up.script(*faults)
        yield up

