"""Request bodies of the OpenAI API localroute serves. Unknown fields are accepted and carried: the
body as sent goes to a remote tier (server/protocol.py). The fields checked here are those
localroute itself reads (sampling, messages, tools): a client's mistake is a 400 naming the field.

Every sampling field is checked here, at the edge, against its type and OpenAI's range, so nothing
an engine could choke on gets past a 400 naming the field: numbers and booleans are strict (no
`true` for an int, no `"1"` for a float; an int is a valid float), integers that an engine takes
are bounded (max_tokens by 2**31 - 1, seed by int64), and NaN or infinities never parse (server/http.py).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]

INT32_MAX = 2**31 - 1
MAX_N = 128  # OpenAI's own bound on `n`
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

Bias = Annotated[float, Field(ge=-100, le=100, strict=True)]
StrictStr = Annotated[str, Field(strict=True)]

# content part type -> (the object it carries, that object's required string fields); the need it
# raises is server/protocol.py's
PART_FIELDS: dict[str, tuple[str | None, tuple[str, ...]]] = {
    "text": (None, ("text",)),
    "input_text": (None, ("text",)),
    "refusal": (None, ("refusal",)),
    "image_url": ("image_url", ("url",)),
    "input_audio": ("input_audio", ("data", "format")),
    "file": ("file", ()),
}


def _check_part(part: Any) -> None:
    """ValueError (what pydantic turns into a 400 naming the field) for a malformed part."""
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise ValueError("each content part must be an object with a string `type`")  # noqa: TRY004
    spec = PART_FIELDS.get(part["type"])
    if spec is None:
        raise ValueError(f"unsupported content part type {part['type']!r}; one of {sorted(PART_FIELDS)}")
    holder, required = spec
    obj = part if holder is None else part.get(holder)
    if not isinstance(obj, dict):
        raise ValueError(f"a {part['type']} part needs a `{holder}` object")  # noqa: TRY004
    for key in required:
        if not isinstance(obj.get(key), str):
            raise ValueError(f"a {part['type']} part needs a string `{key}`")  # noqa: TRY004


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: StrictStr
    arguments: StrictStr


class ToolCall(BaseModel):
    """A tool call in an assistant message of the history."""

    model_config = ConfigDict(extra="allow")

    id: StrictStr = Field(min_length=1)
    type: StrictStr = "function"
    function: FunctionCall | None = None

    @model_validator(mode="after")
    def _function(self) -> ToolCall:
        if self.type == "function" and self.function is None:
            raise ValueError("a function tool call needs `function` {name, arguments}")
        return self


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str = Field(pattern=r"^[a-zA-Z0-9_.\-]{1,64}$", strict=True)
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = Field(None, strict=True)


class Tool(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: StrictStr = Field(min_length=1)
    function: FunctionDefinition | None = None

    @model_validator(mode="after")
    def _function(self) -> Tool:
        if self.type == "function" and self.function is None:
            raise ValueError("a function tool needs `function` {name, parameters}")
        return self


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Role
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: StrictStr | None = None

    @field_validator("content")
    @classmethod
    def _parts(cls, v: str | list[dict[str, Any]] | None) -> str | list[dict[str, Any]] | None:
        if isinstance(v, list):
            for part in v:
                _check_part(part)
        return v

    @model_validator(mode="after")
    def _tool_message(self) -> ChatMessage:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the `tool_call_id` of the call it answers")
        return self

    def text(self) -> str:
        """Content as plain text: a string, or the text parts of a list of parts (the others,
        images and audio, are for tiers that can read them: request.needs)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.get("text", "") for p in self.content if p.get("type") in ("text", "input_text"))


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = Field(False, strict=True)


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=INT32_MAX, strict=True)
    temperature: float | None = Field(None, ge=0, le=2, strict=True)
    top_p: float | None = Field(None, gt=0, le=1, strict=True)
    n: int | None = Field(None, ge=1, le=MAX_N, strict=True, description="Choices to generate (OpenAI's limit, 128).")
    stop: str | list[str] | None = None
    seed: int | None = Field(
        None, ge=INT64_MIN, le=INT64_MAX, strict=True,
        description="Any int64, as OpenAI; local samplers use its 64 bits as an unsigned number (-1 -> 2**64 - 1).")
    presence_penalty: float | None = Field(
        None, ge=-2, le=2, strict=True, description="Non-zero: served by a tier that applies penalties.")
    frequency_penalty: float | None = Field(
        None, ge=-2, le=2, strict=True, description="Non-zero: served by a tier that applies penalties.")
    logit_bias: dict[str, Bias] | None = Field(None, description="Served by a tier that applies logit_bias.")
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


ToolChoice = Literal["none", "auto", "required"] | dict[str, Any]


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32_MAX, strict=True)
    logprobs: bool | None = Field(False, strict=True)
    top_logprobs: int | None = Field(None, ge=0, le=20, strict=True)
    response_format: dict[str, Any] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = Field(None, strict=True)

    @model_validator(mode="after")
    def _tools(self) -> ChatCompletionRequest:
        names = {t.function.name for t in self.tools or () if t.function is not None}
        choice = self.tool_choice
        if choice is not None and choice != "none" and not self.tools:
            raise ValueError("tool_choice: needs `tools`")
        if isinstance(choice, dict) and choice.get("type") == "function":
            name = (choice.get("function") or {}).get("name") if isinstance(choice.get("function"), dict) else None
            if not isinstance(name, str):
                raise ValueError("tool_choice: a function choice needs `function.name`")
            if name not in names:
                raise ValueError(f"tool_choice: no tool named {name!r} in `tools`")
        called: set[str] = set()
        for i, m in enumerate(self.messages):
            called.update(c.id for c in m.tool_calls or ())
            if m.role == "tool" and m.tool_call_id not in called:
                raise ValueError(f"messages.{i}.tool_call_id: {m.tool_call_id!r} answers no earlier tool call")
        return self


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
