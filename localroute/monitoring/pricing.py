"""Frontier token prices: a small shipped table (`prices.toml`, dated, with sources), a user file
that overrides it, and a tier's own configured prices that override both. Never fetched at run time.

A remote engine we run ourselves (a vLLM or llama-server fleet behind an OpenAI-compatible URL)
has no list price: `SelfHostedPrice` charges an answer its share of the fleet's GPU-hours.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from localroute.errors import ConfigError

if TYPE_CHECKING:
    from localroute.settings import TierSettings

__all__ = ["Price", "PriceTable", "SelfHostedPrice", "load_price_table"]

_MTOK = 1_000_000


@dataclass(frozen=True, slots=True)
class Price:
    """Per-million-token prices of one model and where they came from."""

    model: str
    input_usd_per_mtok: float
    output_usd_per_mtok: float
    cached_input_usd_per_mtok: float | None = None
    source: str = ""
    as_of: str = ""

    def cost_usd(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> float:
        """Cached prompt tokens are billed at the cached price where the provider has one."""
        cached = max(0, min(cached_tokens, prompt_tokens)) if self.cached_input_usd_per_mtok is not None else 0
        fresh = prompt_tokens - cached
        return (
            fresh * self.input_usd_per_mtok
            + cached * (self.cached_input_usd_per_mtok or 0.0)
            + completion_tokens * self.output_usd_per_mtok
        ) / _MTOK

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "input_usd_per_mtok": self.input_usd_per_mtok,
            "output_usd_per_mtok": self.output_usd_per_mtok,
            "cached_input_usd_per_mtok": self.cached_input_usd_per_mtok,
            "source": self.source,
            "as_of": self.as_of,
        }


@dataclass(frozen=True, slots=True)
class SelfHostedPrice:
    """A self-hosted remote tier priced by GPU time: `gpu_hour_usd` per GPU, `gpus` per replica.

    An answer's GPU-seconds are, when the replica's measured aggregate throughput is known
    (`tokens_per_s`, output tokens per second over all its concurrent requests), its completion
    tokens over that rate (plus its prompt tokens over `prompt_tokens_per_s` when given): its
    share of a continuously batched replica. Without a measured rate: the attempt's wall time x
    `gpu_share` (the share of the replica one request holds; 1, the default, is an upper bound).
    Both times `gpus`."""

    gpu_hour_usd: float
    gpus: int = 1
    tokens_per_s: float | None = None
    prompt_tokens_per_s: float | None = None
    gpu_share: float = 1.0

    @classmethod
    def from_tier(cls, tier: TierSettings) -> SelfHostedPrice | None:
        if tier.gpu_hour_usd is None:
            return None
        return cls(tier.gpu_hour_usd, tier.gpus, tier.tokens_per_s, tier.prompt_tokens_per_s, tier.gpu_share)

    def gpu_s(self, prompt_tokens: int, completion_tokens: int, latency_s: float) -> tuple[float, str]:
        """(GPU-seconds charged, the method: "measured_throughput" | "wall_time_share")."""
        if self.tokens_per_s:
            replica_s = completion_tokens / self.tokens_per_s
            if self.prompt_tokens_per_s:
                replica_s += prompt_tokens / self.prompt_tokens_per_s
            return replica_s * self.gpus, "measured_throughput"
        return max(latency_s, 0.0) * self.gpu_share * self.gpus, "wall_time_share"

    def cost_usd(self, prompt_tokens: int, completion_tokens: int, latency_s: float) -> float:
        return self.gpu_s(prompt_tokens, completion_tokens, latency_s)[0] / 3600.0 * self.gpu_hour_usd

    def as_dict(self) -> dict[str, Any]:
        return {"gpu_hour_usd": self.gpu_hour_usd, "gpus": self.gpus, "tokens_per_s": self.tokens_per_s,
                "prompt_tokens_per_s": self.prompt_tokens_per_s, "gpu_share": self.gpu_share}


def _parse(data: dict[str, Any], origin: str) -> dict[str, Price]:
    models = data.get("models", {})
    if not isinstance(models, dict):
        raise ConfigError(f"{origin}: [models] must be a table", param="price_file")
    default_as_of = str((data.get("meta") or {}).get("as_of", ""))
    out: dict[str, Price] = {}
    for name, entry in models.items():
        if not isinstance(entry, dict):
            raise ConfigError(f"{origin}: models.{name} must be a table", param="price_file")
        try:
            cached = entry.get("cached_input_usd_per_mtok")
            out[name.lower()] = Price(
                model=name,
                input_usd_per_mtok=float(entry["input_usd_per_mtok"]),
                output_usd_per_mtok=float(entry["output_usd_per_mtok"]),
                cached_input_usd_per_mtok=None if cached is None else float(cached),
                source=str(entry.get("source", origin)),
                as_of=str(entry.get("as_of", default_as_of)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{origin}: models.{name}: bad or missing price ({exc})", param="price_file") from None
    return out


class PriceTable:
    """Model id -> Price, with provider prefixes and dated snapshot suffixes tolerated."""

    def __init__(self, prices: dict[str, Price]) -> None:
        self.prices = dict(prices)

    def lookup(self, model: str) -> Price | None:
        """Exact id first, then the longest known id the model id extends (`gpt-4o-mini-2024-07-18`)."""
        key = model.lower().rsplit("/", 1)[-1]
        if key in self.prices:
            return self.prices[key]
        best = max((k for k in self.prices if key.startswith(k + "-")), key=len, default=None)
        return self.prices[best] if best is not None else None

    def with_override(self, model: str, input_usd_per_mtok: float | None, output_usd_per_mtok: float | None,
                      cached_input_usd_per_mtok: float | None = None) -> Price | None:
        """A tier's configured prices win; a half-configured tier fills the gap from the table."""
        base = self.lookup(model)
        if input_usd_per_mtok is None and output_usd_per_mtok is None and cached_input_usd_per_mtok is None:
            return base
        inp = input_usd_per_mtok if input_usd_per_mtok is not None else (base.input_usd_per_mtok if base else None)
        out = output_usd_per_mtok if output_usd_per_mtok is not None else (base.output_usd_per_mtok if base else None)
        if inp is None or out is None:
            return None
        if cached_input_usd_per_mtok is None and base is not None:
            cached_input_usd_per_mtok = base.cached_input_usd_per_mtok
        return Price(model, inp, out, cached_input_usd_per_mtok, source="settings")


def load_price_table(user_file: Path | None = None) -> PriceTable:
    """The shipped table, then the user's file on top (its entries replace same-named ones)."""
    shipped = resources.files("localroute.monitoring").joinpath("prices.toml").read_text(encoding="utf-8")
    prices = _parse(tomllib.loads(shipped), "localroute/monitoring/prices.toml")
    if user_file is not None:
        try:
            data = tomllib.loads(Path(user_file).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"price_file {user_file}: {exc.strerror or exc}", param="price_file") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"price_file {user_file}: {exc}", param="price_file") from None
        prices.update(_parse(data, str(user_file)))
    return PriceTable(prices)
