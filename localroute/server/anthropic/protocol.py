"""Request bodies of the Anthropic Messages API (anthropic-sdk-python `types/message_create_params.py`,
`message_count_tokens_params.py`). Unknown fields are refused (extra="forbid"): a field localroute
does not know could change the answer, so it is a 400 naming it, never ignored. Fields that are
known but have no chat counterpart are declared here and refused by translate.py with the reason.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

INT32_MAX = 2**31 - 1

__all__ = ["CountTokensRequest", "MessagesRequest"]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CacheControl(_Wire):
    type: Literal["ephemeral"]
    ttl: Literal["5m", "1h"] | None = None


class TextBlock(_Wire):
    type: Literal["text"]
    text: str
    cache_control: CacheControl | None = None
    citations: list[dict[str, Any]] | None = None


class Base64Source(_Wire):
    type: Literal["base64"]
    media_type: Literal["image/jpeg", "image/png", "image/gif", "image/webp"]
    data: str = Field(min_length=1)


class URLSource(_Wire):
    type: Literal["url"]
    url: str = Field(min_length=1)


class ImageBlock(_Wire):
    type: Literal["image"]
    source: Annotated[Base64Source | URLSource, Field(discriminator="type")]
    cache_control: CacheControl | None = None


class ToolUseBlock(_Wire):
    type: Literal["tool_use"]
    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    input: dict[str, Any]
    cache_control: CacheControl | None = None
    caller: dict[str, Any] | None = None
    toolset_name: str | None = None


ResultPart = Annotated[TextBlock | ImageBlock, Field(discriminator="type")]


class ToolResultBlock(_Wire):
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1)
    content: str | list[ResultPart] | None = None
    is_error: bool | None = Field(None, strict=True)
    cache_control: CacheControl | None = None
    toolset_name: str | None = None


class ThinkingBlock(_Wire):
    """An earlier answer's thinking, sent back with its turn (tool use with extended thinking)."""

    type: Literal["thinking"]
    thinking: str
    signature: str


class RedactedThinkingBlock(_Wire):
    type: Literal["redacted_thinking"]
    data: str


Block = Annotated[TextBlock | ImageBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock,
                  Field(discriminator="type")]


class Message(_Wire):
    role: Literal["user", "assistant", "system"]
    content: str | list[Block]


class Tool(_Wire):
    name: str = Field(min_length=1, max_length=128)
    input_schema: dict[str, Any]
    description: str | None = None
    strict: bool | None = Field(None, strict=True)
    type: Literal["custom"] | None = None
    cache_control: CacheControl | None = None
    defer_loading: Any = None
    eager_input_streaming: Any = None
    input_examples: Any = None
    allowed_callers: Any = None


class _Choice(_Wire):
    disable_parallel_tool_use: bool | None = Field(None, strict=True)


class ChoiceAuto(_Choice):
    type: Literal["auto"]


class ChoiceAny(_Choice):
    type: Literal["any"]


class ChoiceTool(_Choice):
    type: Literal["tool"]
    name: str = Field(min_length=1)


class ChoiceNone(_Wire):
    type: Literal["none"]


ToolChoice = Annotated[ChoiceAuto | ChoiceAny | ChoiceTool | ChoiceNone, Field(discriminator="type")]


class Metadata(_Wire):
    user_id: str | None = None


class JsonFormat(_Wire):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(_Wire):
    format: JsonFormat | None = None
    effort: Any = None


class CountTokensRequest(_Wire):
    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1, max_length=100_000)
    system: str | list[TextBlock] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: dict[str, Any] | None = None
    output_config: OutputConfig | None = None
    # known, no chat counterpart: refused by translate.py when set
    cache_control: Any = None
    speed: Any = None
    user_profile_id: Any = None
    workspace_id: Any = None


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1, le=INT32_MAX, strict=True)
    stop_sequences: list[Annotated[str, Field(min_length=1)]] | None = Field(None, max_length=4)
    temperature: float | None = Field(None, ge=0, le=1, strict=True)
    top_p: float | None = Field(None, gt=0, le=1, strict=True)
    top_k: int | None = Field(None, ge=1, le=INT32_MAX, strict=True,
                              description="Carried to the chat request as the `top_k` extension (vLLM, llama.cpp).")
    metadata: Metadata | None = None
    stream: bool | None = Field(None, strict=True)
    service_tier: Literal["auto", "standard_only"] | None = None
    container: Any = None
    diagnostics: Any = None
    inference_geo: Any = None
