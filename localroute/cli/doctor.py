"""`localroute doctor`: the hardware and engines this machine has, and what localroute would use."""

from __future__ import annotations

import argparse
from typing import Any

from localroute.cli.common import add_config_flag, print_json, settings_from


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("doctor", help="check CPU, GPU (NVML) and installed engines")
    add_config_flag(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from localroute.monitoring.telemetry import environment

    settings = settings_from(args)
    env = environment(extra_buffers=settings.llama_extra_buffers)
    if settings.calibration_path is not None:
        from localroute.calibration_file import calibration_check

        env["calibration"] = calibration_check(settings.calibration_path, settings.confidence_aggregator,
                                               settings.confidence_quantile_alpha)
    if args.json:
        print_json(env)
        return 0
    print(render(env))
    return 0


def render(env: dict[str, Any]) -> str:
    cpu, gpu, use = env["cpu"], env["gpu"], env["would_use"]
    lines = [
        f"CPU          {cpu['model']} ({cpu['usable_cores']} usable of {cpu['logical_cores']} cores, {cpu['machine']})",
        f"CPU energy   {env['cpu_energy']}",
        f"GPU/NVML     {gpu['nvml']}" + (f" - {gpu['reason']}" if gpu["reason"] else "")
        + (f" (driver {gpu['driver_version']})" if gpu.get("driver_version") else ""),
    ]
    for d in gpu["devices"]:
        mem = d.get("memory_total_bytes")
        lines.append(f"  gpu {d['index']}  {d['name']}" + (f", {mem / 2**30:.1f} GiB" if mem else ""))
    for name, e in env["engines"].items():
        state = f"yes ({e['version']})" if e["importable"] and e["version"] else ("yes" if e["importable"] else "no")
        lines.append(f"{name:<13}{state}")
    lines.append(f"would use    {use['engine'] or 'nothing'}" + (f" on {use['device']}" if use["device"] else "")
                 + f": {use['why']}")
    lc = env.get("llama_cpp_cpu")
    if lc is not None:
        lines.append(f"llama.cpp    {lc['system_info'] or 'reported no CPU features'}")
        state = {True: "on", False: "off", None: "unknown"}[lc["use_extra_bufts"]]
        lines.append(f"extra bufs   {state} (llama_extra_buffers={lc['mode']}): {lc['reason']}")
    cal = env.get("calibration")
    if cal is not None:
        lines.append(f"calibration  {cal['path']}: " + (f"applies (aggregator {cal['aggregator']})" if cal["applies"]
                                                       else f"IGNORED: {cal['problem']}"))
    return "\n".join(lines)
