"""What a tier can serve, and what a request needs of it.

A request's needs are computed once at the HTTP edge from the client's body (server/protocol.py):
a set of the names below. The cascade skips a tier whose `Capabilities` lack one of them (the
reason goes into the decision's evidence) and answers 400 `unsupported_capability` only when no
tier of the ladder has them all. Local engines declare what they still cannot do; remote
OpenAI-compatible tiers can do everything the API can (the provider is the judge).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from localroute.settings import TierSettings

__all__ = ["API_NEEDS", "NEEDS", "REMOTE_KINDS", "Capabilities", "capabilities_for", "configure_hint",
           "default_capabilities"]

# engine kinds that are a remote API rather than an engine in this process
REMOTE_KINDS = frozenset({"openai", "anthropic"})

# need name -> (the Capabilities field that grants it, the request field a 400 names)
NEEDS: dict[str, tuple[str, str]] = {
    "tools": ("tools", "tools"),
    "images": ("images", "messages"),
    "audio": ("audio", "messages"),
    "files": ("files", "messages"),
    "n": ("multiple_choices", "n"),
    "logit_bias": ("logit_bias", "logit_bias"),
    "penalties": ("penalties", "presence_penalty"),
    "json_schema": ("json_schema", "response_format"),
    "logprobs": ("logprobs", "logprobs"),
    # Anthropic Messages features with no chat counterpart: only a tier speaking Messages serves
    # them, and only for a client that spoke Messages (its body is forwarded as sent)
    "thinking": ("thinking", "thinking"),
    "citations": ("citations", "messages"),
    "prefill": ("assistant_prefill", "messages"),
    # OpenAI Responses features with no chat counterpart (reasoning summaries, include values,
    # truncation, ...): only a tier set with `responses_api` serves them, from the body as sent
    "responses_api": ("responses_api", "model"),
}
# needs no `capabilities` override can give a tier (settings.CapabilitySettings has no field for
# them): only a tier speaking the client's API serves them, from the body as sent
API_NEEDS: dict[str, str] = {
    "thinking": "a kind=anthropic tier",
    "citations": "a kind=anthropic tier",
    "prefill": "a kind=anthropic tier",
    "responses_api": "a kind=openai tier with responses_api = true",
}


def configure_hint(lacking: Iterable[str]) -> str:
    """What to configure so that some tier serves the `lacking` needs (the 400's advice)."""
    lacking = set(lacking)
    advice = [f"{', '.join(sorted(n for n in lacking if API_NEEDS.get(n) == tier))}: only {tier} serves it"
              for tier in sorted({API_NEEDS[n] for n in lacking if n in API_NEEDS})]
    if lacking - API_NEEDS.keys():
        advice.insert(0, "configure a tier with these capabilities (tiers.<name>.capabilities) or a frontier tier")
    return "; ".join(advice)


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What one tier can serve. `context_tokens`: the longest prompt + answer it takes (None:
    the engine's own check decides; a prompt too long for a non-final tier escalates)."""

    tools: bool = False
    images: bool = False
    audio: bool = False
    files: bool = False
    multiple_choices: bool = False
    logit_bias: bool = False
    penalties: bool = False
    json_schema: bool = True
    logprobs: bool = True
    thinking: bool = False
    citations: bool = False
    assistant_prefill: bool = False
    responses_api: bool = False
    context_tokens: int | None = None

    @classmethod
    def everything(cls) -> Capabilities:
        """A remote OpenAI-compatible tier: the provider decides what it accepts (of what chat can
        say: not the Messages-only needs)."""
        return cls(tools=True, images=True, audio=True, files=True, multiple_choices=True, logit_bias=True,
                   penalties=True, json_schema=True)

    def missing(self, needs: frozenset[str]) -> str | None:
        """The first need (in NEEDS order) this tier cannot serve, or None."""
        if not needs:
            return None
        for need, (attr, _) in NEEDS.items():
            if need in needs and not getattr(self, attr):
                return need
        return None

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# Local engines as they are today: text in, text out, one answer, the sampler's own knobs; JSON
# schema through a grammar (llama.cpp) or the cascade's schema check. What an engine learns to do
# (tool calling, n > 1 on llama.cpp) is switched on here, or per tier in settings.
_LOCAL = Capabilities()
# the llama.cpp and transformers samplers apply logit_bias and the penalties (decoding.LogitsAdjuster)
_LOCAL_SAMPLER = replace(_LOCAL, logit_bias=True, penalties=True)
DEFAULTS: dict[str, Capabilities] = {
    # tool calls through a grammar from the tools' schemas (backends/tool_calls.py); n > 1 as
    # parallel sequences sharing the prompt's KV cache (LlamaCppBackend._choices)
    "llama_cpp": replace(_LOCAL_SAMPLER, tools=True, multiple_choices=True),
    "transformers": _LOCAL_SAMPLER,
    "vllm": _LOCAL,
    "openai": Capabilities.everything(),
    # Anthropic Messages (backends/anthropic_http.py): tools, images, PDFs and JSON schemas; no
    # token logprobs, one answer per call, no logit_bias, penalties or audio; extended thinking,
    # citations and assistant prefill of a request that came as Messages
    "anthropic": Capabilities(tools=True, images=True, files=True, json_schema=True, logprobs=False,
                              thinking=True, citations=True, assistant_prefill=True),
}


def default_capabilities(kind: str | None, is_local: bool) -> Capabilities:
    """The engine kind's defaults; an unknown kind: local ones, or everything if remote."""
    if kind in DEFAULTS:
        return DEFAULTS[kind]
    return _LOCAL if is_local else Capabilities.everything()


def capabilities_for(tier: TierSettings, context_tokens: int | None = None) -> Capabilities:
    """A configured tier's capabilities: its kind's defaults, then the tier's `capabilities`
    overrides. `context_tokens`: the local context length when the tier sets no override."""
    remote = tier.kind in REMOTE_KINDS
    base = default_capabilities(tier.kind, not remote)
    if context_tokens is not None and not remote:
        base = replace(base, context_tokens=context_tokens)
    if tier.responses_api:
        base = replace(base, responses_api=True)
    if tier.capabilities is None:
        return base
    return replace(base, **tier.capabilities.model_dump(exclude_none=True))
