"""Request bodies of the OpenAI API subset localroute serves. Unknown fields are accepted and ignored.

Every sampling field is checked here, at the edge, against its type and OpenAI's range, so nothing
an engine could choke on gets past a 400 naming the field: numbers and booleans are strict (no
`true` for an int, no `"1"` for a float; an int is a valid float), integers that an engine takes
are bounded (max_tokens by 2**31 - 1, seed by int64), and NaN or infinities never parse (server/http.py).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]

INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

Bias = Annotated[float, Field(ge=-100, le=100, strict=True)]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Role
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self) -> str:
        """Content as plain text: a string, or the text parts of a list of parts."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") not in ("text", "input_text") or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = Field(False, strict=True)


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=INT32_MAX, strict=True)
    temperature: float | None = Field(None, ge=0, le=2, strict=True)
    top_p: float | None = Field(None, gt=0, le=1, strict=True)
    n: int | None = Field(None, ge=1, le=INT32_MAX, strict=True)
    stop: str | list[str] | None = None
    seed: int | None = Field(
        None, ge=INT64_MIN, le=INT64_MAX, strict=True,
        description="Any int64, as OpenAI; local samplers use its 64 bits as an unsigned number (-1 -> 2**64 - 1).")
    presence_penalty: float | None = Field(
        None, ge=-2, le=2, strict=True, description="Checked against OpenAI's range; not applied.")
    frequency_penalty: float | None = Field(
        None, ge=-2, le=2, strict=True, description="Checked against OpenAI's range; not applied.")
    logit_bias: dict[str, Bias] | None = Field(None, description="Checked against OpenAI's range; not applied.")
    stream: bool | None = Field(False, strict=True)
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = Field(
        False, strict=True, description="Extension (as vLLM/llama.cpp): generate max_tokens, past EOS.")

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("stop: at most 4 sequences")
        if isinstance(v, list) and any(not s for s in v):
            raise ValueError("stop: sequences must be non-empty")
        return v

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) and self.stop else tuple(s for s in self.stop if s)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32_MAX, strict=True)
    logprobs: bool | None = Field(False, strict=True)
    top_logprobs: int | None = Field(None, ge=0, le=20, strict=True)
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Common):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=5, strict=True)
    echo: bool | None = Field(False, strict=True)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError("prompt: exactly one prompt per request is supported")
        return v

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]
