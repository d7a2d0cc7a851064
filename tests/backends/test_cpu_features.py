"""The extra-buffer decision (AMX never, measured choice elsewhere) on real feature strings, and the
high-level Llama loading the real SmolLM2 through the chosen path on this machine."""

from __future__ import annotations

from pathlib import Path

import pytest

from localroute.backends import cpu_features
from localroute.backends.cpu_features import (
    NON_AMX_DEFAULT,
    choose_extra_buffers,
    cpu_flags,
    extra_buffers_choice,
    parse_system_info,
)
from tests.conftest import safe_extra_buffer_modes

# llama_print_system_info() on an AMX Xeon (the machine of issue 13) and on this AMD EPYC
XEON_AMX = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | AVX512 = 1 | "
            "AVX512_VBMI = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | AMX_INT8 = 1 | LLAMAFILE = 1 | OPENMP = 1 | "
            "REPACK = 1 | ")
EPYC = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | LLAMAFILE = 1 | "
        "OPENMP = 1 | REPACK = 1 | ")
CUDA_AND_CPU = "CUDA : ARCHS = 890 | USE_GRAPHS = 1 | PEER_MAX_BATCH_SIZE = 128 | CPU : AVX2 = 1 | AMX_INT8 = 1 | "


def test_system_info_is_parsed_per_feature() -> None:
    xeon = parse_system_info(XEON_AMX)
    assert xeon["AMX_INT8"] == "1" and xeon["SSE3"] == "1" and xeon["REPACK"] == "1" and "CPU" not in xeon
    assert parse_system_info(EPYC).get("AMX_INT8") is None
    both = parse_system_info(CUDA_AND_CPU)
    assert both["ARCHS"] == "890" and both["AMX_INT8"] == "1" and both["AVX2"] == "1"


@pytest.mark.parametrize("text", ["", "garbage", "CPU : | | = |", "AMX_INT8", "\x00\xff", "CPU : AVX2 == "])
def test_garbage_feature_strings_never_turn_extra_buffers_on(text: str) -> None:
    features = parse_system_info(text)
    assert not any(k.startswith("AMX") and v not in ("", "0") for k, v in features.items())
    choice = choose_extra_buffers("auto", features)
    if not features:
        assert choice.use_extra_bufts is False and "no CPU features" in choice.reason
    else:
        assert choice.use_extra_bufts is NON_AMX_DEFAULT


@pytest.mark.parametrize("info", [XEON_AMX, CUDA_AND_CPU])
def test_auto_is_off_wherever_llama_cpp_reports_amx(info: str) -> None:
    choice = choose_extra_buffers("auto", parse_system_info(info))
    assert choice.use_extra_bufts is False
    assert "AMX_INT8" in choice.reason and "20824" in choice.reason


def test_auto_is_off_where_only_the_cpu_flags_show_amx() -> None:
    """A llama.cpp build that does not list AMX on a CPU that has it: still off (never bet on a crash)."""
    flags = cpu_flags("processor\t: 0\nflags\t\t: fpu sse sse2 avx2 avx512f amx_bf16 amx_tile amx_int8\n")
    assert {"amx_tile", "amx_int8", "avx2"} <= flags
    choice = choose_extra_buffers("auto", parse_system_info(EPYC), flags)
    assert choice.use_extra_bufts is False and "amx_int8" in choice.reason


def test_auto_without_amx_follows_the_measurement() -> None:
    epyc_flags = cpu_flags("flags : fpu sse2 avx avx2 fma bmi2 sha_ni vaes\n")
    choice = choose_extra_buffers("auto", parse_system_info(EPYC), epyc_flags)
    assert choice.use_extra_bufts is NON_AMX_DEFAULT and "no AMX" in choice.reason


def test_on_and_off_are_obeyed_and_anything_else_is_refused() -> None:
    amx = parse_system_info(XEON_AMX)
    assert choose_extra_buffers("on", amx).use_extra_bufts is True  # the user asked; doctor shows why
    assert choose_extra_buffers("off", parse_system_info(EPYC)).use_extra_bufts is False
    with pytest.raises(ValueError, match="auto, on or off"):
        choose_extra_buffers("yes", amx)


def test_this_machine_auto_choice_is_consistent_with_what_it_reports() -> None:
    info = cpu_features.system_info()
    assert "CPU" in info  # llama_cpp is installed for the tests: its report is never empty
    report = cpu_features.report("auto")
    has_amx = "AMX_INT8 = 1" in info or bool(report["amx_cpu_flags"])
    assert report["use_extra_bufts"] is (False if has_amx else NON_AMX_DEFAULT)
    assert report["reason"] == extra_buffers_choice("auto").reason


def test_settings_reject_an_unknown_mode() -> None:
    from localroute.errors import ConfigError
    from localroute.settings import load_settings

    assert load_settings().llama_extra_buffers == "auto"
    with pytest.raises(ConfigError, match="llama_extra_buffers"):
        load_settings(llama_extra_buffers="maybe")


@pytest.mark.slow
@pytest.mark.parametrize("mode", safe_extra_buffer_modes())
def test_high_level_llama_loads_with_the_choice_and_answers(mode: str, smollm2_path: Path) -> None:
    """llama_class is what the embedding encoder, the bench's llama-cpp-python baseline and the
    reference in test_llama_cpp use: the choice reaches llama.cpp before the load."""
    use = extra_buffers_choice(mode).use_extra_bufts
    llm = cpu_features.llama_class(use)(str(smollm2_path), n_ctx=256, n_threads=2, verbose=False)
    assert llm.model_params.use_extra_bufts is use
    out = llm.create_completion("The capital of France is", max_tokens=4, temperature=0.0)
    assert out["choices"][0]["text"].strip()
