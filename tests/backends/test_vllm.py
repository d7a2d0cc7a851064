"""The vLLM tier. Its output conversion is checked everywhere (on stand-in output objects shaped
like vLLM's); the engine itself runs in tests/backends/test_base.py wherever vllm imports and
a GPU is present, and the tests below that need vllm skip with that reason elsewhere."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from localroute.backends.vllm import OutputAccumulator, from_settings
from localroute.errors import BackendUnavailableError, ConfigError, MissingExtraError
from localroute.settings import TierSettings
from tests.conftest import local_settings

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vllm is not installed (pip install 'localroute[gpu]'; GPU hosts)")


def lp(logprob: float, rank: int, text: str) -> SimpleNamespace:
    return SimpleNamespace(logprob=logprob, rank=rank, decoded_token=text)


def step(token_ids: list[int], entries: list[dict[int, Any]], text: str, finished: bool = False,
         finish_reason: str | None = None, stop_reason: Any = None, prompt: int = 5) -> SimpleNamespace:
    """One RequestOutput in DELTA mode: only this step's tokens and text."""
    comp = SimpleNamespace(token_ids=token_ids, logprobs=entries, text=text, finish_reason=finish_reason,
                           stop_reason=stop_reason)
    return SimpleNamespace(prompt_token_ids=list(range(prompt)), outputs=[comp], finished=finished)


def test_accumulator_builds_tokens_top_logprobs_and_generation() -> None:
    acc = OutputAccumulator(top_logprobs=2, eos_ids=frozenset({2}), model="m.gguf", logprobs_mode="raw_logprobs")
    pieces = acc.add(step([10], [{10: lp(-0.1, 1, "Hi"), 11: lp(-2.5, 2, "Hey"), 12: lp(-3.0, 3, "Yo")}], "Hi"))
    assert [(t, tok.token_id if tok else None) for t, tok in pieces] == [("Hi", 10)]
    tok = pieces[0][1]
    assert tok is not None and tok.logprob == -0.1 and tok.bytes == tuple(b"Hi")
    assert [(a.token, a.logprob) for a in tok.top_logprobs] == [("Hi", -0.1), ("Hey", -2.5)]
    # chosen token outside the top-k: vLLM adds it to the dict with its rank; top list stays top-k
    acc.add(step([13], [{13: lp(-4.0, 7, " there"), 14: lp(-0.5, 1, "!"), 15: lp(-1.5, 2, ".")}], " there"))
    acc.add(step([2], [{2: lp(-0.01, 1, "")}], "", finished=True, finish_reason="stop"))
    gen = acc.generation()
    assert gen.text == "Hi there" and gen.finish_reason == "stop"
    assert [t.token_id for t in gen.tokens] == [10, 13]  # EOS is not part of the answer
    assert [a.token for a in gen.tokens[1].top_logprobs] == ["!", "."]
    assert gen.prompt_tokens == 5 and gen.extra["logprobs_mode"] == "raw_logprobs"


def test_accumulator_stop_string_and_length() -> None:
    acc = OutputAccumulator(top_logprobs=0, eos_ids=frozenset({2}), model="m", logprobs_mode="processed_logprobs")
    acc.add(step([20, 21], [{20: lp(-0.2, 1, "Yes")}, {21: lp(-0.3, 1, ".")}], "Yes."))
    acc.add(step([22], [{22: lp(-0.4, 1, " END")}], "", finished=True, finish_reason="stop", stop_reason=" END"))
    gen = acc.generation()
    assert gen.text == "Yes." and [t.token for t in gen.tokens] == ["Yes", "."]
    assert gen.extra["logprobs_mode"] == "processed_logprobs"
    acc2 = OutputAccumulator(top_logprobs=0, eos_ids=frozenset(), model="m", logprobs_mode="raw_logprobs")
    acc2.add(step([5, 6], [{5: lp(-1.0, 1, "a")}, {6: lp(-1.0, 1, "b")}], "ab", finished=True,
                  finish_reason="length"))
    assert acc2.generation().finish_reason == "length" and acc2.generation().completion_tokens == 2


def test_aborted_request_maps_to_cancelled() -> None:
    acc = OutputAccumulator(top_logprobs=0, eos_ids=frozenset(), model="m", logprobs_mode="raw_logprobs")
    acc.add(step([], [], "", finished=True, finish_reason="abort"))
    assert acc.generation().finish_reason == "cancelled"


@pytest.mark.skipif(HAS_VLLM, reason="vllm is installed here; this checks the message without it")
def test_without_vllm_the_factory_names_the_extra() -> None:
    with pytest.raises(MissingExtraError, match=r"pip install 'localroute\[gpu\]'"):
        from_settings(TierSettings(name="gpu", kind="vllm", model="smollm2-135m"), local_settings())


@needs_vllm
def test_engine_args_carry_settings_and_logprobs_mode() -> None:
    import vllm

    from localroute.backends.vllm import engine_args
    from localroute.registry import resolve_model_path
    from tests.conftest import MODELS_DIR

    settings = local_settings(n_parallel=16, vllm_logprobs_mode="processed_logprobs")
    tier = TierSettings(name="gpu", kind="vllm", model="smollm2-135m", gpu_memory_utilization=0.5,
                        max_model_len=1024)
    args = engine_args(vllm, resolve_model_path("smollm2-135m", MODELS_DIR), tier, settings)
    assert args.gpu_memory_utilization == 0.5 and args.max_model_len == 1024 and args.max_num_seqs == 16
    assert args.logprobs_mode == "processed_logprobs" and args.max_logprobs == 20


# ---- past one GPU: vLLM's own parallelism, mapped from the tier's settings ----
# vLLM cannot be installed here; these check the mapping against a stand-in for AsyncEngineArgs
# with the fields (names and defaults) of vLLM 0.11's dataclass, and the real thing above runs
# where vllm is installed.


@dataclasses.dataclass
class StandInEngineArgs:
    model: str = ""
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    max_logprobs: int = 20
    logprobs_mode: str = "raw_logprobs"
    disable_log_stats: bool = False
    enable_log_requests: bool = False
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    enable_expert_parallel: bool = False
    distributed_executor_backend: str | None = None


# a vLLM without pipeline/data/expert parallel fields (as far back as logprobs_mode goes)
OldEngineArgs = dataclasses.make_dataclass("OldEngineArgs", [
    (f.name, f.type, dataclasses.field(default=f.default)) for f in dataclasses.fields(StandInEngineArgs)
    if f.name not in {"pipeline_parallel_size", "data_parallel_size", "enable_expert_parallel",
                      "distributed_executor_backend", "enable_log_requests"}])


def stand_in_vllm(args: type = StandInEngineArgs) -> SimpleNamespace:
    return SimpleNamespace(__version__="0.11.0", AsyncEngineArgs=args)


def test_parallel_settings_reach_the_engine_args() -> None:
    from localroute.backends.vllm import engine_args, gpus_needed

    tier = TierSettings(name="big", kind="vllm", model="llama-70b", tensor_parallel_size=4, pipeline_parallel_size=2,
                        enable_expert_parallel=True, distributed_executor_backend="ray", max_model_len=8192)
    args = engine_args(stand_in_vllm(), Path("/models/llama-70b"), tier, local_settings(n_parallel=64))
    assert (args.tensor_parallel_size, args.pipeline_parallel_size, args.data_parallel_size) == (4, 2, 1)
    assert args.enable_expert_parallel is True and args.distributed_executor_backend == "ray"
    assert args.max_model_len == 8192 and args.max_num_seqs == 64 and args.model == "/models/llama-70b"
    assert gpus_needed(tier) == 8


def test_a_one_gpu_tier_passes_no_parallel_args_to_any_vllm() -> None:
    from localroute.backends.vllm import engine_args, parallel_args

    tier = TierSettings(name="gpu", kind="vllm", model="m")
    assert parallel_args(tier) == {}
    args = engine_args(stand_in_vllm(OldEngineArgs), Path("/m"), tier, local_settings())
    assert args.tensor_parallel_size == 1


def test_a_parallel_setting_this_vllm_lacks_is_refused_not_dropped() -> None:
    from localroute.backends.vllm import engine_args

    tier = TierSettings(name="big", kind="vllm", model="m", pipeline_parallel_size=2)
    with pytest.raises(ConfigError, match=r"has no engine argument pipeline_parallel_size; upgrade vllm"):
        engine_args(stand_in_vllm(OldEngineArgs), Path("/m"), tier, local_settings())


def test_gpu_check_says_what_the_tier_needs_and_what_the_host_has(monkeypatch: pytest.MonkeyPatch) -> None:
    from localroute.backends.vllm import check_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    tier = TierSettings(name="big", kind="vllm", model="m", tensor_parallel_size=4, pipeline_parallel_size=2)
    with pytest.raises(ConfigError, match=r"tiers\.big: needs 8 GPUs \(tensor_parallel_size=4 x "
                                          r"pipeline_parallel_size=2 x data_parallel_size=1\) and this host has 2 "
                                          r"visible \(CUDA_VISIBLE_DEVICES='0,1'\)"):
        check_gpus(tier, 2)
    check_gpus(tier, 8)
    check_gpus(tier, None)  # unknown: vLLM decides
    check_gpus(tier.model_copy(update={"distributed_executor_backend": "ray"}), 4)  # stages on other nodes
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    with pytest.raises(BackendUnavailableError, match=r"vLLM needs a CUDA GPU and this host has none visible "
                                                      r"\(CUDA_VISIBLE_DEVICES unset\)") as err:
        check_gpus(TierSettings(name="gpu", kind="vllm", model="m"), 0)
    assert err.value.code == "no_gpu" and err.value.status_code == 503


def test_without_a_gpu_from_settings_fails_before_starting_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    """The factory's own path with a stand-in vllm module: the GPU check comes before the engine."""
    import localroute.backends.vllm as vllm_backend

    started: list[Any] = []
    fake = stand_in_vllm()
    fake.AsyncLLMEngine = SimpleNamespace(from_engine_args=started.append)
    monkeypatch.setattr(vllm_backend, "import_vllm", lambda: fake)
    monkeypatch.setattr(vllm_backend, "visible_gpus", lambda: 0)
    tier = TierSettings(name="gpu", kind="vllm", model="smollm2-135m", tensor_parallel_size=2)
    with pytest.raises(BackendUnavailableError, match="has none visible"):
        vllm_backend.from_settings(tier, local_settings())
    assert started == []


def test_visible_gpus_on_this_host() -> None:
    from localroute.backends.vllm import visible_gpus

    count = visible_gpus()
    assert count is None or count >= 0


def test_parallel_sizes_are_validated_in_settings() -> None:
    from localroute.settings import load_settings

    with pytest.raises(ConfigError, match=r"tiers\.0\.tensor_parallel_size"):
        load_settings(tiers=[{"name": "g", "kind": "vllm", "model": "m", "tensor_parallel_size": 0}])
