"""Frontier backend: any OpenAI-compatible /v1/chat/completions over httpx (OpenAI, vLLM,
llama.cpp's server, another localroute). The API key is sent as a bearer token and never logged."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import httpx

from localroute.errors import ConfigError, InvalidRequestError, UpstreamError
from localroute.types import (
    FinishReason,
    Generation,
    GenerationRequest,
    StreamDelta,
    TokenLogprob,
    TopLogprob,
)

if TYPE_CHECKING:
    from localroute.settings import Settings, TierSettings


def _token_logprob(item: dict[str, Any]) -> TokenLogprob:
    top = tuple(
        TopLogprob(token=a.get("token", ""), logprob=float(a.get("logprob", 0.0)), bytes=_bytes(a))
        for a in item.get("top_logprobs") or ()
    )
    return TokenLogprob(
        token_id=-1,
        token=item.get("token", ""),
        logprob=float(item.get("logprob", 0.0)),
        bytes=_bytes(item),
        top_logprobs=top,
    )


def _bytes(item: dict[str, Any]) -> tuple[int, ...] | None:
    raw = item.get("bytes")
    return tuple(raw) if isinstance(raw, list) else None


def _finish(reason: str | None) -> FinishReason:
    return "length" if reason == "length" else "stop"


def scrub(text: str, secrets: list[str]) -> str:
    """Remove secrets and URL query strings from upstream text before it reaches logs or clients."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    return text


class OpenAIHTTPBackend:
    """A remote tier. Confidence comes from the upstream's logprobs when it returns them."""

    is_local = False

    def __init__(
        self,
        name: str,
        base_url: str,
        model: str,
        api_key: str | None = None,
        connect_timeout_s: float = 5.0,
        timeout_s: float = 120.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.name = name
        self.model = model
        self._api_key = api_key
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
            transport=transport,
        )

    def _body(self, request: GenerationRequest, stream: bool) -> dict[str, Any]:
        p = request.params
        messages = list(request.messages or [{"role": "user", "content": request.prompt or ""}])
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": p.max_tokens,
            "temperature": p.temperature,
            "top_p": p.top_p,
            "stream": stream,
        }
        if p.seed is not None:
            body["seed"] = p.seed
        if p.stop:
            body["stop"] = list(p.stop)
        if p.top_logprobs:
            body["logprobs"] = True
            body["top_logprobs"] = p.top_logprobs
        if p.response_format is not None:
            body["response_format"] = p.response_format
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body

    def _error(self, message: str) -> UpstreamError:
        return UpstreamError(f"frontier {self.name}: {scrub(message, [self._api_key or ''])}")

    async def generate(self, request: GenerationRequest) -> Generation:
        start = time.perf_counter()
        try:
            resp = await self._client.post("/chat/completions", json=self._body(request, stream=False))
        except httpx.HTTPError as exc:
            raise self._error(f"{type(exc).__name__}") from None
        if resp.status_code >= 400:
            self._raise_for_status(resp)
        try:
            data = resp.json()
            choice = data["choices"][0]
            text = choice["message"].get("content") or ""
        except (ValueError, KeyError, IndexError, TypeError):
            raise self._error("malformed response body") from None
        tokens = [_token_logprob(t) for t in ((choice.get("logprobs") or {}).get("content") or [])]
        usage = data.get("usage") or {}
        latency = time.perf_counter() - start
        return Generation(
            text=text,
            tokens=tokens,
            finish_reason=_finish(choice.get("finish_reason")),
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", len(tokens))),
            latency_s=latency,
            ttft_s=latency,
            model=str(data.get("model", self.model)),
            extra={"usage": usage, "upstream_id": data.get("id")},
        )

    def _raise_for_status(self, resp: httpx.Response) -> None:
        if resp.status_code == 400:
            try:
                message = resp.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = "bad request"
            raise InvalidRequestError(scrub(f"frontier rejected the request: {message}", [self._api_key or ""]))
        raise self._error(f"HTTP {resp.status_code}")

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamDelta]:
        start = time.perf_counter()
        ttft: float | None = None
        parts: list[str] = []
        tokens: list[TokenLogprob] = []
        usage: dict[str, Any] = {}
        finish: str | None = None
        model = self.model
        try:
            async with self._client.stream(
                "POST", "/chat/completions", json=self._body(request, stream=True)
            ) as resp:
                if resp.status_code >= 400:
                    await resp.aread()
                    self._raise_for_status(resp)
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        break
                    try:
                        chunk = json.loads(payload)
                    except ValueError:
                        raise self._error("malformed stream chunk") from None
                    if "error" in chunk:
                        raise self._error("stream ended with an error event")
                    usage = chunk.get("usage") or usage
                    model = chunk.get("model", model)
                    for choice in chunk.get("choices") or []:
                        delta = (choice.get("delta") or {}).get("content") or ""
                        finish = choice.get("finish_reason") or finish
                        new = [_token_logprob(t) for t in ((choice.get("logprobs") or {}).get("content") or [])]
                        tokens.extend(new)
                        if delta:
                            ttft = ttft if ttft is not None else time.perf_counter() - start
                            parts.append(delta)
                            yield StreamDelta(text=delta, token=new[-1] if new else None)
        except httpx.HTTPError as exc:
            raise self._error(type(exc).__name__) from None
        if finish is None:
            raise self._error("stream ended without a finish_reason")
        yield StreamDelta(
            text="",
            final=Generation(
                text="".join(parts),
                tokens=tokens,
                finish_reason=_finish(finish),
                prompt_tokens=int(usage.get("prompt_tokens", 0)),
                completion_tokens=int(usage.get("completion_tokens", len(tokens))),
                latency_s=time.perf_counter() - start,
                ttft_s=ttft,
                model=str(model),
                extra={"usage": usage},
            ),
        )

    def health(self) -> dict[str, Any]:
        return {"ok": True, "kind": "openai", "model": self.model}

    async def aclose(self) -> None:
        await self._client.aclose()


def from_settings(tier: TierSettings, settings: Settings) -> OpenAIHTTPBackend:
    if not tier.base_url:
        raise ConfigError(f"tiers.{tier.name}.base_url: required for kind=openai", param="base_url")
    return OpenAIHTTPBackend(
        name=tier.name,
        base_url=tier.base_url,
        model=tier.model,
        api_key=tier.api_key.get_secret_value() if tier.api_key else None,
        connect_timeout_s=settings.frontier_connect_timeout_s,
        timeout_s=settings.frontier_timeout_s,
    )
