"""Request bodies of the OpenAI Responses API (openai-python `types/responses/response_create_params.py`
and the input item types). Unknown fields are refused (extra="forbid"), so nothing that could change
the answer is ignored; fields that are known but have no chat counterpart are declared and refused by
translate_request.py with the reason. Item `id` and `status`, which a client sends back with earlier output,
are bookkeeping: accepted, and not forwarded (they do not change the answer).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

INT32_MAX = 2**31 - 1
Status = Literal["in_progress", "completed", "incomplete"]

__all__ = ["PROVIDER_ITEMS", "ResponsesRequest", "is_item_reference"]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputText(_Wire):
    type: Literal["input_text"]
    text: str
    prompt_cache_breakpoint: Any = None


class InputImage(_Wire):
    type: Literal["input_image"]
    detail: Literal["low", "high", "auto", "original"] | None = None
    image_url: str | None = None
    file_id: str | None = None
    prompt_cache_breakpoint: Any = None


class InputFile(_Wire):
    type: Literal["input_file"]
    file_data: str | None = None
    file_id: str | None = None
    file_url: str | None = None
    filename: str | None = None
    detail: Any = None
    prompt_cache_breakpoint: Any = None


class OutputText(_Wire):
    type: Literal["output_text"]
    text: str
    annotations: list[dict[str, Any]] | None = None
    logprobs: list[dict[str, Any]] | None = None


class Refusal(_Wire):
    type: Literal["refusal"]
    refusal: str


Part = Annotated[InputText | InputImage | InputFile | OutputText | Refusal, Field(discriminator="type")]


class MessageItem(_Wire):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[Part]
    id: str | None = None
    status: Status | None = None
    phase: Any = None


class FunctionCallItem(_Wire):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str
    id: str | None = None
    status: Status | None = None
    namespace: Any = None
    caller: Any = None


class FunctionCallOutputItem(_Wire):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: str | list[Annotated[InputText | InputImage | InputFile, Field(discriminator="type")]]
    id: str | None = None
    status: Status | None = None
    name: str | None = None
    namespace: Any = None
    caller: Any = None


# an earlier answer's items of the tools a provider runs (and their outputs), sent back with it
PROVIDER_ITEMS = frozenset({
    "file_search_call", "web_search_call", "computer_call", "computer_call_output", "tool_search_call",
    "tool_search_output", "image_generation_call", "code_interpreter_call", "local_shell_call",
    "local_shell_call_output", "shell_call", "shell_call_output", "apply_patch_call", "apply_patch_call_output",
    "mcp_list_tools", "mcp_approval_request", "mcp_approval_response", "mcp_call", "custom_tool_call",
    "custom_tool_call_output"})


def _item_kind(value: Any) -> str:
    """An item's type; a message may leave it out (EasyInputMessage), and so may an item
    reference (an `id` alone). Called on the body's dicts (validation) and on the parsed items
    (serialisation)."""
    if isinstance(value, dict):
        kind = value.get("type", "item_reference" if "id" in value and "role" not in value else "message")
    else:
        kind = "item_reference" if isinstance(value, ItemReference) else getattr(value, "type", "message")
    if not isinstance(kind, str):  # e.g. {"type": {...}}: no item kind; validation then says why
        return "message"
    return "provider" if kind in PROVIDER_ITEMS else kind


def is_item_reference(item: Any) -> bool:
    """Whether an input item (as read_body hands it over) refers to a stored item by its id."""
    return _item_kind(item) == "item_reference"


class ReasoningItem(_Wire):
    """An earlier answer's reasoning, sent back with it (a reasoning model's tool loop): only a
    tier speaking the Responses API reads it (translate_request.py: the need "responses_api")."""

    type: Literal["reasoning"]
    id: str = Field(min_length=1)
    summary: list[dict[str, Any]]
    content: list[dict[str, Any]] | None = None
    encrypted_content: str | None = None
    status: Status | None = None


class ItemReference(_Wire):
    """An earlier item by its id (openai-python `ItemReference`: `type` may be left out), resolved
    by the server against the response store (serving.py) before anything is translated."""

    type: Literal["item_reference"] | None = None
    id: str = Field(min_length=1)


class ProviderItem(BaseModel):
    """An earlier answer's hosted-tool item sent back (web_search_call, mcp_call, ...; the
    stateless loop `input += response.output`): its fields are the provider's to check; only a
    tier speaking the Responses API reads it (translate_request.py: the need "responses_api")."""

    model_config = ConfigDict(extra="allow")
    type: str


Item = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[ReasoningItem, Tag("reasoning")]
    | Annotated[ItemReference, Tag("item_reference")]
    | Annotated[ProviderItem, Tag("provider")],
    Discriminator(_item_kind),
]


class FunctionTool(_Wire):
    type: Literal["function"]
    name: str = Field(min_length=1, max_length=128)
    parameters: dict[str, Any] | None = None
    strict: bool | None = Field(None, strict=True)
    description: str | None = None
    defer_loading: Any = None
    allowed_callers: Any = None
    output_schema: Any = None


class HostedTool(BaseModel):
    """A tool the provider runs (web_search, file_search, code_interpreter, mcp, ...): its fields
    are the provider's to check; only a tier speaking the Responses API serves it."""

    model_config = ConfigDict(extra="allow")
    type: str = Field(min_length=1)


def _tool_kind(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return "function" if kind == "function" else "hosted"


Tool = Annotated[Annotated[FunctionTool, Tag("function")] | Annotated[HostedTool, Tag("hosted")],
                 Discriminator(_tool_kind)]


class ChoiceFunction(_Wire):
    type: Literal["function"]
    name: str = Field(min_length=1)


class ChoiceAllowed(_Wire):
    type: Literal["allowed_tools"]
    mode: Literal["auto", "required"]
    tools: list[dict[str, Any]]


class FormatText(_Wire):
    type: Literal["text"]


class FormatJsonObject(_Wire):
    type: Literal["json_object"]


class FormatJsonSchema(_Wire):
    type: Literal["json_schema"]
    name: str = Field(min_length=1)
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = Field(None, strict=True)


class TextConfig(_Wire):
    format: Annotated[FormatText | FormatJsonObject | FormatJsonSchema, Field(discriminator="type")] | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class Reasoning(_Wire):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    summary: Any = None
    generate_summary: Any = None
    context: Any = None
    mode: Any = None


class StreamOptions(_Wire):
    include_obfuscation: bool | None = Field(None, strict=True)


class ResponsesRequest(_Wire):
    model: str = Field(min_length=1)
    input: str | list[Item]
    instructions: str | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ChoiceFunction | ChoiceAllowed | None = None
    parallel_tool_calls: bool | None = Field(None, strict=True)
    max_output_tokens: int | None = Field(None, ge=1, le=INT32_MAX, strict=True)
    temperature: float | None = Field(None, ge=0, le=2, strict=True)
    top_p: float | None = Field(None, gt=0, le=1, strict=True)
    top_logprobs: int | None = Field(None, ge=0, le=20, strict=True)
    text: TextConfig | None = None
    reasoning: Reasoning | None = None
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(None, max_length=16)
    include: list[str] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    stream: bool | None = Field(None, strict=True)
    stream_options: StreamOptions | None = None
    store: bool | None = Field(None, strict=True)
    previous_response_id: str | None = Field(None, min_length=1)
    background: bool | None = Field(None, strict=True)
    service_tier: Literal["auto", "default", "flex", "scale", "priority", "fast"] | None = None
    safety_identifier: str | None = Field(None, max_length=64)
    prompt_cache_key: str | None = None
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    user: str | None = None
    # known, no chat counterpart: refused by translate_request.py when set
    conversation: Any = None
    prompt: Any = None
    prompt_cache_options: Any = None
    context_management: Any = None
    moderation: Any = None
    max_tool_calls: Any = None
    access_programs: Any = None
    background_options: Any = None
    image: Any = None
