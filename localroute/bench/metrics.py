"""Per-level metrics, named as vLLM's serving benchmark names them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from localroute.bench.loadgen import RequestResult


def _stats(name: str, values_s: Sequence[float]) -> dict[str, float | None]:
    if not values_s:
        return {f"mean_{name}_ms": None, f"median_{name}_ms": None, f"p99_{name}_ms": None}
    arr = np.asarray(values_s, dtype=np.float64) * 1000.0
    return {
        f"mean_{name}_ms": float(arr.mean()),
        f"median_{name}_ms": float(np.median(arr)),
        f"p99_{name}_ms": float(np.percentile(arr, 99)),
    }


def summarize(results: Sequence[RequestResult], duration_s: float) -> dict[str, Any]:
    """request_throughput (req/s) and output_throughput (tok/s) over the level's wall time; tpot is
    (e2el - ttft) / (output_tokens - 1) per request, itl every gap between text chunks."""
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    tpots = [(r.e2el_s - r.ttft_s) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    flagged = [r.escalated for r in ok if r.escalated is not None]
    metrics: dict[str, Any] = {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration_s,
        "total_output_tokens": out_tokens,
        "mean_output_tokens": out_tokens / len(ok) if ok else 0.0,
        "request_throughput": len(ok) / duration_s if duration_s > 0 else 0.0,
        "output_throughput": out_tokens / duration_s if duration_s > 0 else 0.0,
        "escalation_rate": (sum(flagged) / len(flagged)) if flagged else None,
    }
    metrics.update(_stats("ttft", [r.ttft_s for r in ok]))
    metrics.update(_stats("tpot", tpots))
    metrics.update(_stats("itl", [g for r in ok for g in r.itl_s]))
    metrics.update(_stats("e2el", [r.e2el_s for r in ok]))
    errors = sorted({r.error for r in results if r.error})
    if errors:
        metrics["errors"] = errors[:5]
    return metrics


def percentiles_ms(values_s: Sequence[float]) -> dict[str, float | int | None]:
    """p50/p99 in ms of a list of seconds (router overhead)."""
    if not values_s:
        return {"n": 0, "p50_ms": None, "p99_ms": None, "mean_ms": None}
    arr = np.asarray(values_s, dtype=np.float64) * 1000.0
    return {"n": len(values_s), "p50_ms": float(np.median(arr)), "p99_ms": float(np.percentile(arr, 99)),
            "mean_ms": float(arr.mean())}


GPU_KEYS = ("gpu_util_mean", "gpu_util_max", "gpu_memory_peak_mb", "gpu_power_mean_w", "gpu_energy_j",
            "gpu_energy_j_per_output_token")


def gpu_metrics(summary: dict[str, Any] | None, output_tokens: int) -> dict[str, float | None]:
    """A level's GPU figures from a GpuSampler summary (all None where no GPU was read): utilisation
    (0-1) beside the energy per output token, which is what the local tokens cost."""
    if not summary:
        return dict.fromkeys(GPU_KEYS)
    energy = summary.get("energy_j")
    mem = summary.get("memory_used_max_bytes")
    return {
        "gpu_util_mean": summary.get("gpu_util_mean"),
        "gpu_util_max": summary.get("gpu_util_max"),
        "gpu_memory_peak_mb": mem / 2**20 if mem is not None else None,
        "gpu_power_mean_w": summary.get("power_w_mean"),
        "gpu_energy_j": energy,
        "gpu_energy_j_per_output_token": energy / output_tokens if energy is not None and output_tokens else None,
    }
