"""Terminal table and plot of a bench result."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

COLUMNS = (
    ("c", "concurrency", "{:d}"),
    ("req/s", "request_throughput", "{:.2f}"),
    ("out tok/s", "output_throughput", "{:.1f}"),
    ("ttft p50/p99 ms", ("median_ttft_ms", "p99_ttft_ms"), "{:.0f}/{:.0f}"),
    ("tpot mean ms", "mean_tpot_ms", "{:.1f}"),
    ("itl p50/p99 ms", ("median_itl_ms", "p99_itl_ms"), "{:.1f}/{:.1f}"),
    ("e2el p50/p99 ms", ("median_e2el_ms", "p99_e2el_ms"), "{:.0f}/{:.0f}"),
    ("esc", "escalation_rate", "{:.2f}"),
    ("RSS MB", "peak_rss_mb", "{:.0f}"),
    ("ok/fail", ("completed", "failed"), "{:d}/{:d}"),
    ("runs tok/s", "runs", ""),
)
# shown when the run read a GPU: utilisation beside what a token cost in energy
GPU_COLUMNS = (
    ("GPU util mean/max", ("gpu_util_mean", "gpu_util_max"), "{:.0%}/{:.0%}"),
    ("GPU W", "gpu_power_mean_w", "{:.0f}"),
    ("J/token", "gpu_energy_j_per_output_token", "{:.3f}"),
)


def _cell(level: dict[str, Any], key: str | tuple[str, ...], fmt: str) -> str:
    if key == "runs":  # --repeats: every run's output tok/s, to show the spread behind the median
        runs = level.get("runs") or []
        return "/".join(f"{v:.0f}" for v in runs) if runs else "-"
    keys = key if isinstance(key, tuple) else (key,)
    values = [level.get(k) for k in keys]
    if any(v is None for v in values):
        return "-"
    return fmt.format(*values)


def print_report(result: dict[str, Any]) -> None:
    """Rich tables: one per target, then ratios, router overhead and the issue's targets."""
    from rich.console import Console
    from rich.table import Table

    # a terminal's own width (cells fold rather than lose digits); files and pipes get whole rows
    console = Console(width=None if sys.stdout.isatty() else 200)
    columns = COLUMNS + (GPU_COLUMNS if (result.get("gpu") or {}).get("available") else ())
    for name, target in result["targets"].items():
        table = Table(title=name, title_justify="left")
        for header, _, _ in columns:
            table.add_column(header, justify="right", overflow="fold")
        for level in target["levels"]:
            table.add_row(*(_cell(level, key, fmt) for _, key, fmt in columns))
        console.print(table)
        if "router_overhead" in target:
            o = target["router_overhead"]
            if o["n"]:
                console.print(f"router overhead (server e2e - engine time, Server-Timing, non-streaming, "
                              f"n={o['n']}): p50 {o['p50_ms']:.2f} ms, p99 {o['p99_ms']:.2f} ms")
            c = target.get("client_overhead") or {}
            if c.get("n"):
                console.print(f"  seen by the client (adds its HTTP stack and loopback): "
                              f"p50 {c['p50_ms']:.2f} ms, p99 {c['p99_ms']:.2f} ms")
    for name, rows in result["ratios"].items():
        text = ", ".join(
            f"c={r['concurrency']}: " + " ".join(
                f"{k}={v:.2f}x" for k, v in r.items() if k != "concurrency" and v is not None)
            for r in rows)
        console.print(f"localroute / {name.replace('localroute_vs_', '')}: {text}")
    for t in result["targets_check"]:
        if t["value"] is not None:
            mark = "[green]met[/green]" if t["met"] else "[red]missed[/red]"
            console.print(f"target {t['target']} {t['goal']}: {t['value']:.2f} {mark}")
    gpu = result.get("gpu") or {}
    if gpu and not gpu.get("available"):
        console.print(f"[dim]GPU figures: none ({gpu.get('reason')})[/dim]")
    eb = result.get("extra_buffers")
    if eb:
        flag = f"; llama-server ran with {eb['llama_server_flag']}" if eb.get("llama_server_flag") else ""
        console.print(f"[dim]llama.cpp extra buffer types {'on' if eb['use_extra_bufts'] else 'off'} for every "
                      f"llama.cpp engine ({eb['reason']}){flag}[/dim]")
    m = result["machine"]
    console.print(f"[dim]{m['cpus']} CPUs, {m['processor']}, load average at start "
                  f"{m['loadavg_start'][0] if m['loadavg_start'] else 'n/a'}[/dim]")


def plot(result: dict[str, Any], path: Path) -> None:
    """Output throughput and p99 e2e latency against concurrency, one line per target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, target in result["targets"].items():
        cs = [lvl["concurrency"] for lvl in target["levels"]]
        ax1.plot(cs, [lvl["output_throughput"] for lvl in target["levels"]], marker="o", label=name)
        ax2.plot(cs, [lvl["p99_e2el_ms"] or 0.0 for lvl in target["levels"]], marker="o", label=name)
    ax1.set(xlabel="concurrency", ylabel="output tokens/s", title="Aggregate output throughput")
    ax2.set(xlabel="concurrency", ylabel="ms", title="p99 end-to-end latency")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
