"""What each answer cost, attempt by attempt, and what it would have cost on the frontier alone.

Method (every figure carries the inputs it used, in `cost_inputs`):

- Frontier attempt: the provider's returned `usage` x the tier's price per token (cached prompt
  tokens at the cached price where the provider has one). Streams too: the frontier client asks
  for `stream_options.include_usage`.
- Local CPU attempt: the process's CPU-seconds over the attempt's time window, divided by the mean
  number of sequences the local engines were decoding together in that window (its share of a
  continuous batch), x `usd_per_core_hour`; plus CPU package energy (RAPL) x `usd_per_kwh` where
  the machine lets us read it.
- Local GPU attempt: the GPUs' NVML energy delta over the window (or power x time) x `usd_per_kwh`,
  plus the window's GPU-seconds x `usd_per_gpu_hour`, both divided by the mean number of
  sequences batched together on GPU engines.
- Self-hosted remote attempt (a tier with `gpu_hour_usd`: a vLLM / llama-server fleet we run): its
  share of the fleet's GPU-hours (pricing.SelfHostedPrice): tokens over the replica's measured
  throughput, or wall time x `gpu_share`, x `gpus` x `gpu_hour_usd`. Never the counterfactual's top
  tier (that is the last list-priced remote tier).
- A rejected local attempt is billed like an accepted one: the escalation does not refund it.
- Counterfactual: the answer's own prompt and completion token counts priced at the top tier
  (the last remote tier, else `frontier_model` from the price table). Tokenizers differ, so unless
  the top tier itself answered this is an estimate, and it says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from localroute.monitoring.pricing import Price, PriceTable, SelfHostedPrice, load_price_table
from localroute.monitoring.telemetry import Sample, Telemetry, Usage

if TYPE_CHECKING:
    from localroute.routing.base import Decision, Tier, TierAttempt
    from localroute.settings import Settings
    from localroute.types import Generation

__all__ = [
    "AttemptCost",
    "CostAccountant",
    "RequestCost",
    "cost_fields",
    "cost_headers",
    "cpu_cost_usd",
    "energy_cost_usd",
    "gpu_time_cost_usd",
]

J_PER_KWH = 3.6e6


def cpu_cost_usd(cpu_s: float, usd_per_core_hour: float) -> float:
    return cpu_s / 3600.0 * usd_per_core_hour


def gpu_time_cost_usd(gpu_s: float, usd_per_gpu_hour: float) -> float:
    return gpu_s / 3600.0 * usd_per_gpu_hour


def energy_cost_usd(energy_j: float, usd_per_kwh: float) -> float:
    return energy_j / J_PER_KWH * usd_per_kwh


def cached_tokens(usage: dict[str, Any]) -> int:
    """Cached prompt tokens in an OpenAI-style usage object (0 when the provider reports none)."""
    details = usage.get("prompt_tokens_details") or {}
    try:
        return int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0
    except (TypeError, ValueError):
        return 0


@dataclass(slots=True)
class AttemptCost:
    """One tier's share of the bill. `method`: frontier_usage | self_hosted_gpu | local_cpu | local_gpu
    | unpriced."""

    tier: str
    method: str
    cost_usd: float
    energy_j: float | None = None
    inputs: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"tier": self.tier, "method": self.method, "cost_usd": self.cost_usd, "energy_j": self.energy_j,
                "inputs": self.inputs}


@dataclass(slots=True)
class RequestCost:
    """The request's total, per-attempt detail, and the frontier-only counterfactual."""

    attempts: list[AttemptCost]
    counterfactual_cost_usd: float | None
    counterfactual_inputs: dict[str, Any]

    @property
    def cost_usd(self) -> float:
        return sum(a.cost_usd for a in self.attempts)

    @property
    def energy_j(self) -> float | None:
        known = [a.energy_j for a in self.attempts if a.energy_j is not None]
        return sum(known) if known else None

    def by_tier(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for a in self.attempts:
            out[a.tier] = out.get(a.tier, 0.0) + a.cost_usd
        return out

    def as_dict(self) -> dict[str, Any]:
        """The fields merged into a response's `localroute` object."""
        return {
            "cost_usd": self.cost_usd,
            "counterfactual_cost_usd": self.counterfactual_cost_usd,
            "counterfactual_is_estimate": bool(self.counterfactual_inputs.get("estimate", True)),
            "counterfactual_inputs": self.counterfactual_inputs,
            "energy_j": self.energy_j,
            "cost_inputs": [a.as_dict() for a in self.attempts],
        }


def _is_gpu(backend: Any) -> bool:
    """A backend may say so with `uses_gpu`; else vLLM, or a `device` of cuda in its health()."""
    flag = backend.uses_gpu
    if flag is not None:
        return bool(flag)
    try:
        health = backend.health()
    except Exception:
        return False
    return health.get("kind") == "vllm" or str(health.get("device") or "").startswith("cuda")


class CostAccountant:
    """Prices finished requests for one Service: tier prices resolved once, telemetry shared."""

    def __init__(self, settings: Settings, tiers: Sequence[Tier], telemetry: Telemetry | None = None,
                 prices: PriceTable | None = None) -> None:
        self.settings = settings
        self.tiers = {t.name: t for t in tiers}
        self.prices = prices if prices is not None else load_price_table(settings.price_file)
        self.telemetry = telemetry
        ladder = {ts.name: ts for ts in settings.ladder()}
        self.tier_price: dict[str, Price | None] = {}
        self.tier_kind: dict[str, str] = {}
        self.self_hosted: dict[str, SelfHostedPrice] = {}
        for t in tiers:
            if t.backend.is_local:
                self.tier_kind[t.name] = "local_gpu" if _is_gpu(t.backend) else "local_cpu"
                continue
            ts = ladder.get(t.name)
            hosted = SelfHostedPrice.from_tier(ts) if ts is not None else None
            if hosted is not None:
                self.tier_kind[t.name] = "self_hosted_gpu"
                self.self_hosted[t.name] = hosted
                continue
            self.tier_kind[t.name] = "frontier_usage"
            model = ts.model if ts is not None else (t.backend.model or t.name)
            self.tier_price[t.name] = self.prices.with_override(  # tiers built in code carry their own prices
                model,
                ts.input_usd_per_mtok if ts else getattr(t.backend, "input_usd_per_mtok", None),
                ts.output_usd_per_mtok if ts else getattr(t.backend, "output_usd_per_mtok", None),
                getattr(ts, "cached_input_usd_per_mtok", None) if ts else None,
            )
        self.top_tier, self.top_price = self._top(tiers)

    def _top(self, tiers: Sequence[Tier]) -> tuple[str, Price | None]:
        remote = [t.name for t in tiers if self.tier_kind.get(t.name) == "frontier_usage"]
        if remote and self.tier_price.get(remote[-1]) is not None:
            return remote[-1], self.tier_price[remote[-1]]
        model = self.settings.frontier_model
        return model, self.prices.with_override(
            model, self.settings.frontier_input_usd_per_mtok, self.settings.frontier_output_usd_per_mtok
        )

    def load(self) -> tuple[int, int]:
        """Sequences the local engines decode right now, on CPU and on GPU (for the sampler)."""
        cpu = gpu = 0
        for name, tier in self.tiers.items():
            kind = self.tier_kind.get(name)
            if kind not in ("local_cpu", "local_gpu"):
                continue
            try:
                active = int(tier.backend.health().get("active", 0) or 0)
            except Exception:
                active = 0
            if kind == "local_gpu":
                gpu += active
            else:
                cpu += active
        return cpu, gpu

    def price(self, decision: Decision, generation: Generation | None, started: float, ended: float) -> RequestCost:
        """Cost of every attempt, in order; `started`/`ended` are the request's perf_counter bounds."""
        end = self.telemetry.reading() if self.telemetry is not None else None  # the windows' end
        attempts: list[AttemptCost] = []
        t = started
        answer_index = max((i for i, a in enumerate(decision.attempts) if a.tier == decision.answered_by),
                           default=-1)
        for i, a in enumerate(decision.attempts):
            t_end = max(t, min(t + a.latency_s, ended))  # attempts run one after another
            usage = generation.extra.get("usage") if generation is not None and i == answer_index else None
            attempts.append(self._attempt(a, t, t_end, usage if isinstance(usage, dict) else None, end))
            t = t_end
        if end is not None and self.telemetry is not None:
            self.telemetry.keep(end)  # after this request's windows: the next one's start
        return RequestCost(attempts, *self._counterfactual(decision, attempts, answer_index))

    def _attempt(self, a: TierAttempt, t0: float, t1: float, usage: dict[str, Any] | None,
                 end: Sample | None = None) -> AttemptCost:
        kind = self.tier_kind.get(a.tier, "unpriced")
        if kind == "frontier_usage":
            return self._frontier(a, usage)
        if kind == "self_hosted_gpu":
            return self._self_hosted(a, usage)
        if kind in ("local_cpu", "local_gpu"):
            if self.telemetry is None:
                return AttemptCost(a.tier, "unpriced", 0.0, inputs={"reason": "no telemetry"})
            usage_w = self.telemetry.window(t0, t1, end)
            return self._local_gpu(a, usage_w) if kind == "local_gpu" else self._local_cpu(a, usage_w)
        return AttemptCost(a.tier, "unpriced", 0.0, inputs={"reason": "unknown tier"})

    def _frontier(self, a: TierAttempt, usage: dict[str, Any] | None) -> AttemptCost:
        price = self.tier_price.get(a.tier)
        prompt = int(usage.get("prompt_tokens", a.prompt_tokens)) if usage else a.prompt_tokens
        completion = int(usage.get("completion_tokens", a.completion_tokens)) if usage else a.completion_tokens
        cached = cached_tokens(usage) if usage else 0
        inputs: dict[str, Any] = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "cached_prompt_tokens": cached,
            "usage_source": "provider_usage" if usage else ("attempt_counts" if a.error is None else "none"),
        }
        if price is None:
            inputs["reason"] = "no price configured for this tier (set input/output_usd_per_mtok or price_file)"
            return AttemptCost(a.tier, "unpriced", 0.0, inputs=inputs)
        inputs["price"] = price.as_dict()
        return AttemptCost(a.tier, "frontier_usage", price.cost_usd(prompt, completion, cached), inputs=inputs)

    def _self_hosted(self, a: TierAttempt, usage: dict[str, Any] | None) -> AttemptCost:
        price = self.self_hosted[a.tier]
        prompt = int(usage.get("prompt_tokens", a.prompt_tokens)) if usage else a.prompt_tokens
        completion = int(usage.get("completion_tokens", a.completion_tokens)) if usage else a.completion_tokens
        gpu_s, method = price.gpu_s(prompt, completion, a.latency_s)
        return AttemptCost(a.tier, "self_hosted_gpu", gpu_s / 3600.0 * price.gpu_hour_usd, inputs={
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "usage_source": "provider_usage" if usage else "attempt_counts",
            "latency_s": round(a.latency_s, 6),
            "gpu_s": round(gpu_s, 6),
            "gpu_s_method": method,
            **price.as_dict(),
        })

    def _local_cpu(self, a: TierAttempt, u: Usage) -> AttemptCost:
        s = self.settings
        share = 1.0 / u.mean_active_cpu
        cpu_s = u.cpu_s * share
        cost = cpu_cost_usd(cpu_s, s.usd_per_core_hour)
        energy = u.cpu_energy_j * share if u.cpu_energy_j is not None else None
        if energy is not None:
            cost += energy_cost_usd(energy, s.usd_per_kwh)
        return AttemptCost(a.tier, "local_cpu", cost, energy, inputs={
            "window_s": round(u.wall_s, 6),
            "process_cpu_s": round(u.cpu_s, 6),
            "mean_batched_sequences": round(u.mean_active_cpu, 3),
            "cpu_s": round(cpu_s, 6),
            "usd_per_core_hour": s.usd_per_core_hour,
            "energy_j": energy,
            "energy_source": "rapl" if energy is not None else "unavailable",
            "usd_per_kwh": s.usd_per_kwh,
            "samples": u.inputs.get("samples"),
        })

    def _local_gpu(self, a: TierAttempt, u: Usage) -> AttemptCost:
        s = self.settings
        share = 1.0 / u.mean_active_gpu
        gpu_s = u.wall_s * share
        energy = u.gpu_energy_j * share if u.gpu_energy_j is not None else None
        cost = gpu_time_cost_usd(gpu_s, s.usd_per_gpu_hour)
        if energy is not None:
            cost += energy_cost_usd(energy, s.usd_per_kwh)
        return AttemptCost(a.tier, "local_gpu", cost, energy, inputs={
            "window_s": round(u.wall_s, 6),
            "mean_batched_sequences": round(u.mean_active_gpu, 3),
            "gpu_s": round(gpu_s, 6),
            "usd_per_gpu_hour": s.usd_per_gpu_hour,
            "energy_j": energy,
            "energy_source": "nvml" if energy is not None else "unavailable",
            "usd_per_kwh": s.usd_per_kwh,
            "samples": u.inputs.get("samples"),
        })

    def _counterfactual(self, decision: Decision, attempts: list[AttemptCost],
                        answer_index: int) -> tuple[float | None, dict[str, Any]]:
        if answer_index < 0:
            return None, {"estimate": True, "reason": "no answer"}
        answer = decision.attempts[answer_index]
        if answer.tier == self.top_tier and attempts[answer_index].method == "frontier_usage":
            return attempts[answer_index].cost_usd, {"estimate": False, "model": self.top_tier,
                                                    "method": "the top tier answered: its own billed usage"}
        if self.top_price is None:
            return None, {"estimate": True, "reason": f"no price known for the top tier {self.top_tier!r}"}
        inputs = {
            "estimate": True,
            "model": self.top_price.model,
            "method": "answer's prompt+completion token counts x top-tier price (tokenizers differ)",
            "prompt_tokens": answer.prompt_tokens,
            "completion_tokens": answer.completion_tokens,
            "price": self.top_price.as_dict(),
        }
        return self.top_price.cost_usd(answer.prompt_tokens, answer.completion_tokens), inputs


def cost_fields(cost: RequestCost | None) -> dict[str, Any] | None:
    """Fields for the response's `localroute` object (None when pricing failed)."""
    return cost.as_dict() if cost is not None else None


def cost_headers(cost: RequestCost | None) -> dict[str, str]:
    """`x-localroute-cost-usd` (and the counterfactual) for non-streamed responses."""
    if cost is None:
        return {}
    headers = {"x-localroute-cost-usd": f"{cost.cost_usd:.10f}"}
    if cost.counterfactual_cost_usd is not None:
        headers["x-localroute-counterfactual-cost-usd"] = f"{cost.counterfactual_cost_usd:.10f}"
    return headers
