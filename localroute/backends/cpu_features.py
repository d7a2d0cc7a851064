"""Whether llama.cpp may put weights in its *extra buffer types* (AMX, REPACK) on this CPU.

llama.cpp's loader places a weight in the first buffer type that accepts it; with
`llama_model_params.use_extra_bufts` (on by default) that list starts with the CPU backend's extra
types: on a build with AMX enabled an "AMX" buffer (weights repacked for Intel AMX tiles), then
"CPU_REPACK" (weights interleaved for AVX2/AVX-512/NEON GEMM kernels). The AMX path crashes
(SIGSEGV in `ggml_backend_amx_mul_mat`, llama.cpp issue 20824) on the Sapphire Rapids class Xeons
most cloud x86 servers are, so `auto` never uses extra buffers where llama.cpp reports AMX.

Without AMX, `auto` follows a measurement (README, "Extra buffer types"; `scripts/bench_engine.py
--extra-buffers on,off`, 2-core AMD EPYC with AVX2, the only machine there was to measure on):
REPACK repacks nothing of SmolLM2's Q4_1 weights and only gemma-3-270m's 27 Q4_K tensors (13 of
235 MiB); it made nothing faster (gemma decode 30.5 vs 33.5 tok/s off, prompt 275 vs 272) and it
moved gemma's logprobs by up to 0.19 nats. So NON_AMX_DEFAULT is off: one weight layout, and the
logprobs a calibration was fitted on, on every x86 machine.

`choose_extra_buffers` is the pure decision; `extra_buffers_choice` reads this machine's features
once and applies it; `llama_class` gives llama-cpp-python's `Llama` the same choice.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

ExtraBuffers = Literal["auto", "on", "off"]

# What `auto` picks on a CPU without AMX (measured, see the module docstring and README).
NON_AMX_DEFAULT = False

_FEATURE = re.compile(r"([A-Za-z0-9_]+)\s*=\s*([^|]*)")
AMX_FEATURES = ("AMX_INT8", "AMX_BF16", "AMX_TILE")
AMX_CPU_FLAGS = frozenset({"amx_int8", "amx_tile", "amx_bf16", "amx_fp16", "amx_complex"})


@dataclass(frozen=True, slots=True)
class BufferChoice:
    """What a model load uses, and the reason `localroute doctor` prints."""

    use_extra_bufts: bool
    reason: str


def parse_system_info(text: str) -> dict[str, str]:
    """`llama_print_system_info()` text ('CPU : SSE3 = 1 | AVX2 = 1 | AMX_INT8 = 1 | ...') as
    {feature: value}; anything that is not `NAME = value` is skipped."""
    out: dict[str, str] = {}
    for part in text.split("|"):
        m = _FEATURE.search(part)  # 'CPU : SSE3 = 1': the backend's name before ':' is not a feature
        if m:
            out[m.group(1).upper()] = m.group(2).strip()
    return out


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The `flags` of /proc/cpuinfo (first processor listed); empty when there is none."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return frozenset(value.split())
    return frozenset()


def _on(value: str | None) -> bool:
    return value is not None and value.strip() not in ("", "0")


def choose_extra_buffers(
    mode: str, features: Mapping[str, str], flags: Iterable[str] = ()
) -> BufferChoice:
    """The decision for one load: `on`/`off` as asked; `auto` off wherever AMX shows, in llama.cpp's
    features or in the CPU's flags (a crash is never worth a speed-up), else NON_AMX_DEFAULT."""
    if mode == "on":
        return BufferChoice(True, "llama_extra_buffers=on")
    if mode == "off":
        return BufferChoice(False, "llama_extra_buffers=off")
    if mode != "auto":
        raise ValueError(f"llama_extra_buffers must be auto, on or off, not {mode!r}")
    amx = [f for f in AMX_FEATURES if _on(features.get(f))] + sorted(AMX_CPU_FLAGS.intersection(flags))
    if amx:
        return BufferChoice(False, f"auto: AMX present ({', '.join(amx)}); llama.cpp's AMX buffer type "
                                   "crashes (llama.cpp issue 20824), so extra buffers are off")
    if not features:
        return BufferChoice(False, "auto: llama.cpp reported no CPU features; extra buffers off (the "
                                   "configuration known to be safe)")
    if NON_AMX_DEFAULT:
        return BufferChoice(True, "auto: no AMX; REPACK measured faster without AMX, extra buffers on")
    repack = "REPACK compiled in" if _on(features.get("REPACK")) else "no REPACK in this build"
    return BufferChoice(False, f"auto: no AMX ({repack}); REPACK was measured no faster for the bundled "
                               "models and moves logprobs, so extra buffers are off (README, Extra buffer types)")


def system_info() -> str:
    """llama.cpp's own report of the CPU features it was built for and found; '' without llama_cpp."""
    try:
        import llama_cpp
    except ImportError:
        return ""
    try:
        return bytes(llama_cpp.llama_print_system_info()).decode("utf-8", errors="replace").strip()
    except (AttributeError, OSError):
        return ""


def read_cpu_flags(path: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    try:
        return cpu_flags(path.read_text(errors="replace"))
    except OSError:
        return frozenset()


@functools.cache
def extra_buffers_choice(mode: str = "auto") -> BufferChoice:
    """`choose_extra_buffers` on this machine (features read once per process)."""
    return choose_extra_buffers(mode, parse_system_info(system_info()), read_cpu_flags())


def report(mode: str = "auto") -> dict[str, Any]:
    """What `localroute doctor` prints: llama.cpp's features, the AMX flags, the choice and why."""
    choice = extra_buffers_choice(mode)
    return {"system_info": system_info(), "amx_cpu_flags": sorted(AMX_CPU_FLAGS.intersection(read_cpu_flags())),
            "mode": mode, "use_extra_bufts": choice.use_extra_bufts, "reason": choice.reason}


def llama_class(use_extra_bufts: bool) -> Any:
    """llama_cpp.Llama, loading with `use_extra_bufts` as given.

    Llama() takes no argument for it: its __init__ assigns `self.model_params` from llama.cpp's
    defaults (extra buffers on) and loads the model a few lines later. This subclass applies the
    choice as that assignment happens, before the load."""
    import llama_cpp

    class _Llama(llama_cpp.Llama):
        @property
        def model_params(self) -> Any:
            return self.__dict__["_localroute_model_params"]

        @model_params.setter
        def model_params(self, params: Any) -> None:
            params.use_extra_bufts = use_extra_bufts
            self.__dict__["_localroute_model_params"] = params

    _Llama.__name__ = _Llama.__qualname__ = "Llama"
    return _Llama
