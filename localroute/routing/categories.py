"""A request's task category (issue 19): which per-category threshold it gets, and how it is
labelled in the answer, the routing log, /metrics and reports.

Where it comes from, first that applies:
1. the client: `metadata.localroute_category` in the body, or the `category_header` header;
2. a model alias: `localroute/cascade:classify` is the cascade with category `classify`;
3. a configured rule: the first `categories.<name>.system_prompt_pattern` matching the system prompt;
4. the pre-inference router's nearest labelled neighbours: with an embedding router trained on rows
   that carry a category (`localroute train --kind embedding`), the majority category of the
   request's `category_neighbours_k` nearest labelled rows at or above
   `category_neighbours_min_similarity` (`NeighbourCategories`, routing/embedding.py);
5. `default_category`.

The decision's evidence names the source (`category_source`: client, alias, rule, neighbours or
default), and for neighbours the vote (`category_neighbours`).

A client-named category must be a short plain name (letters, digits, `_ . : -`, at most 64), else
400: it becomes a metrics label and a log value. Metrics labels are capped separately
(`CategoryLabels`), so clients cannot grow the label set.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from localroute.backends.labels import METADATA_KEY as LABELS_KEY
from localroute.errors import InvalidRequestError
from localroute.settings import Settings

if TYPE_CHECKING:
    from localroute.embeddings import Encoder
    from localroute.types import GenerationRequest

log = logging.getLogger(__name__)

__all__ = ["OTHER", "CategoryLabels", "NeighbourCategories", "ResolvedCategory", "is_name", "resolve_category",
           "split_model_alias"]

NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")  # whole names only (fullmatch): `$` would let "name\n" through
OTHER = "other"  # the metrics label of categories over the cap
METADATA_KEY = "localroute_category"
OWN_KEYS = frozenset({METADATA_KEY, LABELS_KEY})  # what strip_category takes out before a provider sees it

Source = Literal["client", "alias", "rule", "neighbours", "default"]


@dataclass(frozen=True, slots=True)
class ResolvedCategory:
    name: str
    source: Source
    evidence: dict[str, Any] = field(default_factory=dict)  # neighbours: the vote


class _Labelled(Protocol):
    """What the neighbour categoriser needs of an embedding model (routing/embedding.py
    `EmbeddingModel`); a protocol, so that this module imports neither embedding nor prerouter,
    which import it."""

    encoder_name: str

    def nearest_category(self, v: Any, k: int, min_similarity: float) -> Any: ...


class _Memo(Protocol):
    """routing/prerouter.py `VectorMemo`."""

    def encode(self, name: str, encoder: Encoder, text: str, request_id: str) -> Any: ...


class NeighbourCategories:
    """Places a request nothing else placed by its nearest labelled neighbours in the embedding
    router's index (module docstring, step 4). The embedding runs in a worker thread."""

    def __init__(self, model: _Labelled, encoder: Encoder, k: int, min_similarity: float,
                 memo: _Memo | None = None) -> None:
        self.model, self.encoder = model, encoder
        self.k, self.min_similarity = k, min_similarity
        self.memo = memo  # shared with the embedding policies: the vector is reused when they route it

    def _embed(self, text: str, request_id: str) -> Any:
        if self.memo is not None:
            return self.memo.encode(self.model.encoder_name, self.encoder, text, request_id)
        return self.encoder.encode([text])[0]

    def place(self, vector: Any, fallback: ResolvedCategory) -> ResolvedCategory:
        """`fallback` (the default) unless enough similar labelled neighbours vote (no I/O, no model)."""
        vote = self.model.nearest_category(vector, self.k, self.min_similarity)
        if vote is None:
            return fallback
        return ResolvedCategory(vote.category, "neighbours", {"category_neighbours": vote.evidence()})

    async def resolve(self, request: GenerationRequest, fallback: ResolvedCategory) -> ResolvedCategory:
        from localroute.embeddings import request_text

        text = request_text(request.messages, request.prompt)
        if not text.strip():
            return fallback
        try:
            vector = await asyncio.to_thread(self._embed, text, request.request_id)  # CPU work off the loop
        except (RuntimeError, ValueError, OSError) as exc:  # an encoder failure costs the category, not the request
            log.warning("category neighbours unavailable for this request (%s); %s", type(exc).__name__,
                        fallback.name)
            return fallback
        return self.place(vector, fallback)


def is_name(value: object) -> bool:
    """A category name a client may send, and a labelled row may carry (module docstring)."""
    return isinstance(value, str) and NAME.fullmatch(value) is not None


def _checked(value: Any, param: str) -> str:
    if not isinstance(value, str) or not NAME.fullmatch(value):
        raise InvalidRequestError(
            f"{param} must be a category name: 1-64 letters, digits or _ . : - characters", param=param,
            code="invalid_category")
    return value


def split_model_alias(model: str, routers: Iterable[str]) -> tuple[str, str | None]:
    """`policy:category` -> (policy, category) when `model` is no router itself but its part
    before the last ':' is; else (model, None)."""
    known = set(routers)
    if model in known or ":" not in model:
        return model, None
    policy, _, category = model.rpartition(":")
    if policy in known and category:
        return policy, _checked(category, "model")
    return model, None


def _system_text(messages: Iterable[Mapping[str, Any]] | None) -> str:
    return "\n".join(str(m.get("content") or "") for m in messages or () if m.get("role") in ("system", "developer"))


def resolve_category(settings: Settings, body: Mapping[str, Any], headers: Mapping[str, str],
                     alias: str | None = None) -> ResolvedCategory:
    """The request's category (module docstring). `body`: the parsed JSON; `alias`: the category
    named by the model alias, if any."""
    metadata = body.get("metadata")
    if isinstance(metadata, Mapping) and metadata.get(METADATA_KEY) is not None:
        return ResolvedCategory(_checked(metadata[METADATA_KEY], f"metadata.{METADATA_KEY}"), "client")
    header = headers.get(settings.category_header)
    if header:
        return ResolvedCategory(_checked(header.strip(), settings.category_header), "client")
    if alias is not None:
        return ResolvedCategory(alias, "alias")
    if settings.categories:
        messages = body.get("messages")
        system = _system_text(messages if isinstance(messages, list) else None)
        if isinstance(body.get("system"), str):  # the Messages API's top-level system prompt
            system = f"{body['system']}\n{system}"
        if system:
            for name, cat in settings.categories.items():
                if cat.system_prompt_pattern and re.search(cat.system_prompt_pattern, system):
                    return ResolvedCategory(name, "rule")
    return ResolvedCategory(settings.default_category, "default")


def strip_category(body: dict[str, Any]) -> dict[str, Any]:
    """The body without localroute's own metadata keys, the category and the choice task's labels (a
    provider may reject unknown metadata, and OpenAI caps a metadata value at 512 characters)."""
    metadata = body.get("metadata")
    if not isinstance(metadata, dict) or not OWN_KEYS & metadata.keys():
        return body
    rest = {k: v for k, v in metadata.items() if k not in OWN_KEYS}
    out = {k: v for k, v in body.items() if k != "metadata"}
    if rest:
        out["metadata"] = rest
    return out


class CategoryLabels:
    """Category -> metrics label, at most `cap` distinct labels (and OTHER): the configured
    categories and the default first, then the first others seen; the rest are OTHER."""

    def __init__(self, settings: Settings) -> None:
        self.cap = settings.category_max_labels
        self._known = [settings.default_category, *settings.categories][: self.cap]
        self._labels = set(self._known)
        self._lock = threading.Lock()

    def label(self, category: str) -> str:
        if category in self._labels or category == OTHER:
            return category
        with self._lock:
            if len(self._labels) < self.cap:
                self._labels.add(category)
                return category
        return OTHER
