"""Frontier backend: any OpenAI-compatible /v1/chat/completions over httpx (OpenAI, vLLM,
llama.cpp's server, another localroute). The API key is sent as a bearer token and never logged.

This module is the transport: the wire formats are openai_wire.py (Chat Completions: request
bodies, answers and chunks read) and responses_wire.py (the Responses API, for a tier set with
`responses_api`); a subclass speaking another API (anthropic_http.py) overrides the hooks at the
end of the class (`_path`, `_body`, `_decode_answer`, `_chunk_decoder`).

Passthrough: a Chat Completions request is forwarded as the client sent it (request.wire: every
field, unknown ones included), with only `model` replaced, `stream` set for this call, and
`stream_options.include_usage` added to streams (the cost and the spend budget need the usage; the
server drops that chunk for a client that did not ask). The answer is kept as sent (`Generation.raw`,
each chunk in `StreamDelta.raw`). A Completions request is translated to one user message. On a
`responses_api` tier, a Responses request (request.native) goes to POST /responses as the HTTP
edge hands it over, its answer decoded for the cascade and kept as sent (`Generation.extra["native"]`).

Failure handling (see localroute/backends/resilience.py for why): every call runs under separate connect,
first-token, idle and total deadlines; it is retried (jitter, Retry-After, capped total wait) only
while nothing has been handed to the caller, so a stream is never silently restarted; a circuit
breaker per upstream fails fast once the upstream is presumed down. The first-token deadline runs
from each attempt's start and covers the response headers, an error's body, the first streamed
token, and the whole of a non-streamed answer; a half-open probe is one attempt, never retried. Every error that leaves this
module is an UpstreamError (or InvalidRequestError for a 400) whose message is scrubbed of keys
and URL query strings. With a spend budget attached, the worst-case cost is reserved before the
call and reconciled with the provider's usage after it. A call that reached the provider (its
response headers came) but whose usage never did (the body or stream was cut) is charged, by
`cut_charge`, its reservation (`reserved`: the worst case; the serving budget) or an estimate
(`estimate`: the prompt's tokens counted locally plus the completion tokens received so far, at the
tier's prices, for each such attempt; the shadow budget). Either way the amount settled is added to
the caller's `budget.current_meter`, if it set one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import httpx

from localroute.backends.budget import current_key_id, current_meter
from localroute.backends.capabilities import Capabilities
from localroute.backends.openai_wire import (
    NATIVE_EVENTS,
    ChunkReader,
    as_client_asked,
    chat_body,
    finish_reason,
    message_text,
    read_answer,
    same,
)
from localroute.backends.resilience import CircuitBreaker, Deadlines, RetryPolicy, parse_retry_after
from localroute.backends.responses_wire import (
    ResponsesChunkDecoder,
    chat_from_response,
    response_as_client_asked,
    responses_body,
)
from localroute.calibration_file import model_fingerprint
from localroute.errors import ConfigError, InvalidRequestError, UpstreamError
from localroute.redaction import redact, strip_query_strings
from localroute.types import Generation, GenerationRequest, StreamDelta

if TYPE_CHECKING:
    from localroute.backends.budget import Budget
    from localroute.settings import Settings, TierSettings

log = logging.getLogger(__name__)

_RETRY_STATUSES = {408, 409, 425, 429}
B = TypeVar("B", bound="OpenAIHTTPBackend")


_CAPABILITIES = Capabilities.everything()


def scrub(text: str, secrets: list[str]) -> str:
    """Remove secrets, bearer tokens, key-like strings and URL query strings from upstream text
    before it reaches logs or clients."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    return redact(strip_query_strings(text))


class _Failure(Exception):
    """One failed attempt: the error to raise if no retry follows, and how to treat it."""

    def __init__(self, error: UpstreamError | InvalidRequestError, retryable: bool, breaker: bool,
                 retry_after_s: float | None = None) -> None:
        super().__init__(error.message)
        self.error = error
        self.retryable = retryable
        self.breaker = breaker
        self.retry_after_s = retry_after_s


class OpenAIHTTPBackend:
    """A remote tier. Confidence comes from the upstream's logprobs when it returns them."""

    is_local = False
    kind = "openai"
    # how an attempt billed without usage (cut after its response headers) is charged (module docstring)
    cut_charge: Literal["reserved", "estimate"] = "reserved"
    capabilities = _CAPABILITIES
    path = "/chat/completions"  # under base_url

    def __init__(
        self,
        name: str,
        base_url: str,
        model: str,
        api_key: str | None = None,
        connect_timeout_s: float | None = None,
        timeout_s: float | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        *,
        deadlines: Deadlines | None = None,
        retry: RetryPolicy | None = None,
        breaker: CircuitBreaker | None = None,
        input_usd_per_mtok: float | None = None,
        output_usd_per_mtok: float | None = None,
        confidence_logprobs: bool = False,
        self_hosted: bool = False,
        responses_api: bool = False,
    ) -> None:
        """`confidence_logprobs`: a non-final tier, judged on its logprobs: they are asked for on
        every buffered call (and taken out of the answer again for a client that did not ask).
        `self_hosted`: an engine we run (priced by GPU time, outside the frontier budget).
        `responses_api`: the upstream serves POST /responses: a client's Responses request is
        forwarded there as sent (responses_wire.py) instead of translated to chat."""
        self.name = name
        self.responses_api = responses_api
        if responses_api:  # it also serves what only the Responses API can say
            self.capabilities = replace(self.capabilities, responses_api=True)
        self.model = model
        self.base_url = base_url.rstrip("/")
        self.confidence_logprobs = confidence_logprobs
        self.self_hosted = self_hosted
        # attached by the app when tracing is on: W3C trace-context headers for a request's call
        self.trace_headers: Callable[[GenerationRequest], dict[str, str]] | None = None
        self._api_key = api_key
        d = deadlines or Deadlines()
        if connect_timeout_s is not None or timeout_s is not None:
            d = Deadlines(connect_timeout_s or d.connect_s, d.first_token_s, d.idle_s, timeout_s or d.total_s)
        self.deadlines = d
        self.retry = retry or RetryPolicy()
        self.breaker = breaker or CircuitBreaker(name)
        self.input_usd_per_mtok = input_usd_per_mtok
        self.output_usd_per_mtok = output_usd_per_mtok
        self.budget: Budget | None = None  # attached by the app when a spend cap is set (local or shared)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # httpx's own read timeout is only a backstop: keep-alives reset it, our deadlines do not.
        backstop = max(d.first_token_s, d.idle_s)
        self._client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers=headers,
            timeout=httpx.Timeout(backstop, connect=d.connect_s, pool=d.connect_s),
            transport=transport,
        )

    # ---- errors ----

    def _scrub(self, text: str) -> str:
        return scrub(text, [self._api_key or ""])

    def _fail(self, message: str, code: str, *, retryable: bool = True, breaker: bool = True,
              retry_after_s: float | None = None) -> _Failure:
        err = UpstreamError(f"frontier {self.name}: {self._scrub(message)}", code=code,
                            retry_after_s=retry_after_s)
        return _Failure(err, retryable, breaker, retry_after_s)

    def _status_failure(self, resp: httpx.Response, body: bytes) -> _Failure:
        status = resp.status_code
        retry_after = parse_retry_after(resp.headers.get("retry-after"))
        if status == 400:
            try:
                message = str(json.loads(body)["error"]["message"])
            except (ValueError, KeyError, TypeError, RecursionError):
                message = "bad request"
            err = InvalidRequestError(self._scrub(f"frontier rejected the request: {message}"))
            return _Failure(err, retryable=False, breaker=False)
        if status == 429:
            return self._fail("HTTP 429 rate limited", "upstream_rate_limited", breaker=False,
                              retry_after_s=retry_after)
        if status in _RETRY_STATUSES:
            return self._fail(f"HTTP {status}", "upstream_error", breaker=False, retry_after_s=retry_after)
        if status >= 500:
            return self._fail(f"HTTP {status}", "upstream_unavailable", retry_after_s=retry_after)
        # 401/403 (bad key) and other 4xx: retrying cannot help; a bad key makes the upstream unusable
        return self._fail(f"HTTP {status}", "upstream_error", retryable=False, breaker=status in (401, 403))

    def _transport_failure(self, exc: httpx.HTTPError) -> _Failure:
        if isinstance(exc, httpx.ConnectTimeout):
            return self._fail("connect deadline exceeded", "upstream_timeout")
        if isinstance(exc, httpx.TimeoutException):
            return self._fail(f"{type(exc).__name__}", "upstream_timeout")
        return self._fail(f"{type(exc).__name__}", "upstream_unavailable")

    # ---- budget ----

    def _worst_cost_usd(self, request: GenerationRequest) -> float:
        """An upper bound on the call's cost: every prompt byte a token (byte-level BPE never
        makes more), a few tokens of framing per message, and max_tokens of output."""
        messages = request.messages or ({"content": request.prompt or ""},)
        prompt_tokens = sum(len(str(m.get("content") or "").encode("utf-8", "replace")) + 16 for m in messages)
        return self._cost_usd(prompt_tokens, request.params.max_tokens)

    @staticmethod
    def _local_prompt_tokens(request: GenerationRequest) -> int:
        """The prompt's tokens counted here, without the provider's tokenizer: each message's text
        (openai_wire.message_text) at 4 UTF-8 bytes a token (a BPE tokenizer's usual rate on
        English), rounded up, plus 4 tokens of framing a message."""
        messages = request.messages or ({"role": "user", "content": request.prompt or ""},)
        return sum(_local_tokens(message_text(m)) + 4 for m in messages)

    def _cut_estimate_usd(self, request: GenerationRequest, received_tokens: int) -> float:
        """What an attempt billed without usage is estimated to cost (`cut_charge = "estimate"`)."""
        return self._cost_usd(self._local_prompt_tokens(request), received_tokens)

    def _cost_usd(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * (self.input_usd_per_mtok or 0.0)
                + completion_tokens * (self.output_usd_per_mtok or 0.0)) / 1e6

    async def _reserve(self, request: GenerationRequest) -> Any:
        if self.budget is None:
            return None
        return await self.budget.areserve(self._worst_cost_usd(request), key_id=current_key_id.get())

    def _charge_usd(self, request: GenerationRequest, reservation: Any, state: dict[str, Any]) -> float:
        """What the call is charged: the provider's usage when known; for what was billed without
        it, by `cut_charge`, the reservation (worst case) or the estimates of the attempts cut
        after their headers; nothing when it never reached the model."""
        usage = state["usage"]
        known = bool(usage) and "prompt_tokens" in usage
        actual = self._cost_usd(int(usage.get("prompt_tokens") or 0),
                                int(usage.get("completion_tokens") or 0)) if known else 0.0
        if self.cut_charge == "estimate":
            return actual + float(state["cut_usd"])
        if known:
            return actual
        if state["billed"]:
            return float(reservation.amount_usd) if reservation is not None else self._worst_cost_usd(request)
        return 0.0

    def _cut(self, request: GenerationRequest, state: dict[str, Any]) -> None:
        """An attempt ends: one billed whose usage never came adds its estimate (`cut_usd`)."""
        usage = state["usage"]
        if state["attempt_billed"] and not (usage and "prompt_tokens" in usage):
            state["cut_usd"] += self._cut_estimate_usd(request, state["received"])
        state["attempt_billed"] = False

    async def _settle(self, request: GenerationRequest, reservation: Any, state: dict[str, Any]) -> None:
        """Reconcile the reservation with what the call is charged (`_charge_usd`), and meter it."""
        self._cut(request, state)
        amount = self._charge_usd(request, reservation, state)
        meter = current_meter.get()
        if meter is not None:
            meter.add(amount)
        if reservation is not None:
            await reservation.asettle(amount)

    # ---- the retry loop shared by generate and stream ----

    async def _attempts(self, request: GenerationRequest, stream: bool) -> AsyncGenerator[StreamDelta, None]:
        """Yield deltas (the last carries the Generation). Retries only until the first delta."""
        loop = asyncio.get_running_loop()
        reservation = await self._reserve(request)
        deadline = loop.time() + self.deadlines.total_s
        retries, waited = 0, 0.0
        sent = False
        # billed: any attempt reached the provider; per attempt: attempt_billed, received (completion
        # tokens so far); cut_usd: the estimates of the attempts billed without usage
        state: dict[str, Any] = {"billed": False, "usage": None, "attempt_billed": False, "received": 0,
                                 "cut_usd": 0.0}
        verdict = False  # the breaker got a success/failure for the probe it let through
        try:
            while True:
                probe = self.breaker.before_call()
                verdict = False
                first = min(deadline, loop.time() + self.deadlines.first_token_s)
                state["received"] = 0
                try:
                    once = self._stream_once(request, deadline, first, state) if stream else self._generate_once(
                        request, first, state)
                    try:
                        async for delta in once:
                            if delta.final is not None:
                                self.breaker.record_success()
                                verdict = True
                            sent = True
                            yield delta
                    finally:
                        await once.aclose()  # a client that left closes the upstream connection now
                    return
                except _Failure as failure:
                    self._cut(request, state)
                    if failure.breaker:
                        self.breaker.record_failure()
                        verdict = True
                    else:
                        self.breaker.release_probe()
                        verdict = True
                    remaining = deadline - loop.time()
                    wait = None
                    if failure.retryable and not sent and not probe:  # a probe's failure is its verdict
                        wait = self.retry.next_wait(retries, waited, remaining, failure.retry_after_s)
                    log.warning("frontier %s %s %d failed: %s%s", self.name, "probe" if probe else "attempt",
                                retries + 1, failure.error.code, "" if wait is None else f"; retrying in {wait:.2f}s")
                    if wait is None:
                        raise failure.error from None
                    await asyncio.sleep(wait)
                    waited += wait
                    retries += 1
        finally:
            if not verdict:
                self.breaker.release_probe()
            await self._settle(request, reservation, state)

    async def _wait(self, aw: Any, until: float, what: str) -> Any:
        loop = asyncio.get_running_loop()
        remaining = until - loop.time()
        if remaining <= 0:
            raise self._fail(f"{what} deadline exceeded", "upstream_timeout")
        try:
            return await asyncio.wait_for(aw, remaining)
        except TimeoutError:
            raise self._fail(f"{what} deadline exceeded", "upstream_timeout") from None

    async def _open(self, request: GenerationRequest, stream: bool, first: float,
                    state: dict[str, Any]) -> httpx.Response:
        """Send the request; return a 200 response whose body is still unread. An error's body is
        its answer: it too must come by the first-token deadline (else it is read as empty)."""
        headers = [*self._headers(request), *(self.trace_headers(request).items()
                                              if self.trace_headers is not None else ())]
        req = self._client.build_request("POST", self._path(request), json=self._body(request, stream),
                                         headers=headers)
        try:
            resp: httpx.Response = await self._wait(self._client.send(req, stream=True), first, "first-token")
        except httpx.HTTPError as exc:
            raise self._transport_failure(exc) from None
        if resp.status_code >= 400:
            try:
                body = await self._wait(resp.aread(), first, "first-token")
            except (_Failure, httpx.HTTPError):
                body = b""
            finally:
                await resp.aclose()
            raise self._status_failure(resp, body)
        state["billed"] = state["attempt_billed"] = True
        return resp

    async def _generate_once(self, request: GenerationRequest, first: float,
                             state: dict[str, Any]) -> AsyncGenerator[StreamDelta, None]:
        """One non-streamed attempt: the whole answer is due by `first` (the first-token deadline,
        itself within the total one), and its body may not stall for longer than idle_s."""
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        resp = await self._open(request, False, first, state)
        try:
            raw = bytearray()
            progress = loop.time()
            chunks = resp.aiter_bytes().__aiter__()
            while True:
                until = min(first, progress + self.deadlines.idle_s)
                try:
                    chunk = await self._wait(chunks.__anext__(), until, "idle" if until < first else "first-token")
                except StopAsyncIteration:
                    break
                raw += chunk
                if chunk.strip():  # whitespace keep-alives are not progress
                    progress = loop.time()
        except httpx.HTTPError as exc:
            raise self._transport_failure(exc) from None
        finally:
            await resp.aclose()
        try:
            native = json.loads(bytes(raw))
            if not isinstance(native, dict):
                raise TypeError("answer is not an object")
            data = self._decode_answer(native, request)
            answer = read_answer(data)
        except (ValueError, KeyError, IndexError, TypeError, AttributeError, RecursionError):  # nested too deep
            raise self._fail("malformed response body", "upstream_bad_response") from None
        state["usage"] = answer.usage
        state["received"] = answer.completion_tokens or _local_tokens(answer.text)
        latency = time.perf_counter() - start
        if self.confidence_logprobs:
            data = as_client_asked(data, request)
            if native is not data and self._native(request):
                assert request.native is not None
                native = response_as_client_asked(native, request.native.body)
        yield StreamDelta(
            text="",
            final=Generation(
                text=answer.text,
                tokens=answer.tokens,
                finish_reason=answer.finish,
                prompt_tokens=answer.prompt_tokens,
                completion_tokens=answer.completion_tokens,
                latency_s=latency,
                ttft_s=latency,
                model=str(data.get("model", self.model)),
                extra={"usage": answer.usage, "upstream_id": data.get("id"),
                       **({"native": native} if native is not data else {})},
                raw=data,
            ),
        )

    async def _stream_once(self, request: GenerationRequest, deadline: float, first: float,
                           state: dict[str, Any]) -> AsyncGenerator[StreamDelta, None]:
        """One streamed attempt: the first token is due by `first` (counted from the attempt's start,
        headers included), then each event within idle_s, everything by `deadline`."""
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        ttft: float | None = None
        reader = ChunkReader(self.model)
        held: list[dict[str, Any]] = []  # chunks that say nothing yet (the role), not yet handed on
        decode = self._chunk_decoder(request)
        resp = await self._open(request, True, first, state)
        lines = resp.aiter_lines().__aiter__()
        progress: float | None = None  # last data event after the first token
        received_bytes = 0
        try:
            while True:
                if progress is None:
                    until, what = first, "first-token"
                else:
                    until, what = min(deadline, progress + self.deadlines.idle_s), "idle"
                if until == deadline:
                    what = "total"
                try:
                    line = await self._wait(lines.__anext__(), until, what)
                except StopAsyncIteration:
                    break
                if not line.startswith("data:"):
                    continue  # comments (keep-alives), event names and blank lines are not progress
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                try:
                    event = json.loads(payload)
                    if not isinstance(event, dict):
                        raise TypeError("chunk is not an object")
                    chunk = decode(event)
                    if chunk is None:
                        continue  # an event with nothing for the chat stream (a ping, a block's end)
                    if "error" in chunk:
                        raise self._fail("stream ended with an error event", "upstream_error")
                    text, token, substance = reader.feed(chunk)
                except (ValueError, KeyError, IndexError, TypeError, AttributeError, RecursionError):
                    raise self._fail("malformed stream chunk", "upstream_bad_response") from None
                if substance:
                    received_bytes += len(text.encode("utf-8", "replace"))
                    state["received"] = len(reader.tokens) or _tokens_of_bytes(received_bytes)  # logprobs: the provider's
                    progress = loop.time()
                    ttft = ttft if ttft is not None else time.perf_counter() - start
                    for early in held:  # the opening chunks, sent with the first that says something
                        yield StreamDelta(text="", raw=early)
                    held.clear()
                    yield StreamDelta(text=text, token=token, raw=chunk)
                elif chunk.get("choices") or (held and NATIVE_EVENTS in chunk):  # kept in order behind them
                    held.append(chunk)
                else:  # the usage chunk, or a provider event of its own (a native request's ping)
                    yield StreamDelta(text="", raw=chunk)
                if progress is not None:
                    progress = loop.time()
        except httpx.HTTPError as exc:
            raise self._transport_failure(exc) from None
        finally:
            await resp.aclose()
            if reader.usage:  # the usage chunk came, whatever came after it
                state["usage"] = reader.usage
        if reader.finish is None:
            raise self._fail("stream ended without a finish_reason", "upstream_bad_response")
        usage = reader.usage
        state["usage"] = usage
        yield StreamDelta(
            text="",
            final=Generation(
                text="".join(reader.parts),
                tokens=reader.tokens,
                finish_reason=finish_reason(reader.finish),
                prompt_tokens=int(usage.get("prompt_tokens", 0)),
                completion_tokens=int(usage.get("completion_tokens", len(reader.tokens))),
                latency_s=time.perf_counter() - start,
                ttft_s=ttft,
                model=str(reader.model),
                extra={"usage": usage},
            ),
        )

    # ---- the provider's wire format (a subclass speaking another API overrides these) ----

    def _native(self, request: GenerationRequest) -> bool:
        """Whether this call forwards the client's Responses body as sent (a `responses_api` tier)."""
        return self.responses_api and request.native is not None and request.native.api == "responses"

    def _headers(self, request: GenerationRequest) -> tuple[tuple[str, str], ...]:
        """The request's own headers for this call, over the client's defaults (a subclass's hook)."""
        return ()

    def _path(self, request: GenerationRequest) -> str:
        """The endpoint under base_url this request is sent to."""
        return "/responses" if self._native(request) else self.path

    def _body(self, request: GenerationRequest, stream: bool) -> dict[str, Any]:
        if self._native(request):
            assert request.native is not None
            asked = request.params.top_logprobs if self.confidence_logprobs and not stream else None
            return responses_body(request.native.body, self.model, stream, asked)
        return chat_body(request, self.model, stream, self.confidence_logprobs)

    def _decode_answer(self, data: dict[str, Any], request: GenerationRequest) -> dict[str, Any]:
        """The provider's answer as a chat.completion (the identity for chat)."""
        return chat_from_response(data) if self._native(request) else data

    def _chunk_decoder(self, request: GenerationRequest) -> Callable[[dict[str, Any]], dict[str, Any] | None]:
        """Per stream: one provider event in, a chat.completion.chunk (or None: skip it) out."""
        return ResponsesChunkDecoder() if self._native(request) else same

    # ---- the Backend protocol ----

    async def generate(self, request: GenerationRequest) -> Generation:
        gen: Generation | None = None
        attempts = self._attempts(request, stream=False)
        try:
            async for delta in attempts:
                if delta.final is not None:
                    gen = delta.final
        finally:
            await attempts.aclose()
        if gen is None:  # unreachable: _attempts either yields a final delta or raises
            raise UpstreamError(f"frontier {self.name}: no answer", code="upstream_bad_response")
        return gen

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamDelta]:
        attempts = self._attempts(request, stream=True)
        try:
            async for delta in attempts:
                yield delta
        finally:
            await attempts.aclose()

    uses_gpu = None  # a provider's tokens are priced at its prices, not by our hardware

    def fingerprint(self) -> dict[str, Any]:
        return model_fingerprint(None, None, self.model)

    def health(self) -> dict[str, Any]:
        state = self.breaker.state
        return {"ok": state != "open", "kind": self.kind, "model": self.model, "circuit": state}

    async def aclose(self) -> None:
        await self._client.aclose()


def _local_tokens(text: str) -> int:
    """Tokens of `text` counted here: 4 UTF-8 bytes a token, rounded up (_local_prompt_tokens)."""
    return _tokens_of_bytes(len(text.encode("utf-8", "replace")))


def _tokens_of_bytes(n: int) -> int:
    """The local count's rate: 4 UTF-8 bytes a token, rounded up."""
    return -(-n // 4)


def from_settings(tier: TierSettings, settings: Settings, cls: type[B] = OpenAIHTTPBackend) -> B:  # type: ignore[assignment]
    """A remote tier of `cls` (this backend or a subclass speaking another API) from its settings."""
    if not tier.base_url:
        raise ConfigError(f"tiers.{tier.name}.base_url: required for kind={tier.kind}", param="base_url")
    ladder = settings.ladder()
    final = not ladder or ladder[-1].name == tier.name
    api_key = tier.api_key.get_secret_value() if tier.api_key else None
    if api_key is None and tier.api_key_env:
        api_key = os.environ.get(tier.api_key_env)
        if not api_key:
            raise ConfigError(f"tiers.{tier.name}.api_key_env: environment variable {tier.api_key_env} is not set",
                              param="api_key_env")
    return cls(
        name=tier.name,
        base_url=tier.base_url,
        model=tier.model,
        api_key=api_key,
        deadlines=Deadlines(
            connect_s=settings.frontier_connect_timeout_s,
            first_token_s=settings.frontier_first_token_timeout_s,
            idle_s=settings.frontier_idle_timeout_s,
            total_s=settings.frontier_timeout_s,
        ),
        retry=RetryPolicy(
            max_retries=settings.frontier_max_retries,
            base_delay_s=settings.frontier_retry_base_s,
            max_total_wait_s=settings.frontier_retry_max_wait_s,
        ),
        breaker=CircuitBreaker(
            tier.name,
            failure_threshold=settings.breaker_failure_threshold,
            reset_s=settings.breaker_reset_s,
        ),
        input_usd_per_mtok=tier.input_usd_per_mtok,
        output_usd_per_mtok=tier.output_usd_per_mtok,
        # other APIs have no logprobs to ask for, nor a model set with `capabilities.logprobs = false`
        # (a reasoning model: OpenAI refuses logprobs there with a 400)
        confidence_logprobs=not final and tier.kind == "openai"
        and (tier.capabilities is None or tier.capabilities.logprobs is not False),
        self_hosted=tier.gpu_hour_usd is not None,
        responses_api=tier.responses_api,
    )
