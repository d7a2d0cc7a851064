"""vLLM tier: the in-process async engine of a GPU host (continuous batching, paged KV cache).

The engine is vLLM's V1 `AsyncLLM` (the older `AsyncLLMEngine` where that is all there is), built
from `AsyncEngineArgs` with `max_model_len`, `gpu_memory_utilization` and `max_num_seqs` from the
settings, and vLLM's own parallelism past one GPU per tier (`tensor_parallel_size`,
`pipeline_parallel_size`, `data_parallel_size`, `enable_expert_parallel`,
`distributed_executor_backend`: `parallel_args`), checked against the GPUs the host has before the
engine starts (`check_gpus`). Weights come from a local path only: a GGUF file (vLLM reads its
config and tokenizer) or a directory of HF-format weights; nothing is downloaded.

Logprobs: vLLM can return them raw (the model's distribution before temperature, penalties and
top-p; its default) or processed. Which one matters for the cascade, since thresholds are
calibrated on these numbers, so the mode is set explicitly from `settings.vllm_logprobs_mode`,
recorded in every Generation's `extra["logprobs_mode"]` and shown by health(). The llama.cpp and
transformers tiers are raw.

Cancellation: when a client disconnects, the server cancels generate()/stream(); the `finally`
below then calls `engine.abort(request_id)` so the sequence leaves the running batch at once (vLLM
aborts on cancellation itself too; the explicit call also covers a consumer that stops iterating).

`vllm` is imported only inside `from_settings`; without it, selecting this backend raises
MissingExtraError naming `pip install 'localroute[gpu]'`.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from localroute.backends.capabilities import Capabilities, default_capabilities
from localroute.calibration_file import model_fingerprint
from localroute.errors import (
    BackendUnavailableError,
    ConfigError,
    ContextLengthExceededError,
    InvalidRequestError,
    LocalrouteError,
    MissingExtraError,
)
from localroute.types import (
    FinishReason,
    Generation,
    GenerationRequest,
    StreamDelta,
    TokenLogprob,
    TopLogprob,
)

if TYPE_CHECKING:
    from localroute.settings import Settings, TierSettings

log = logging.getLogger(__name__)

MAX_TOP_LOGPROBS = 20  # the OpenAI API's cap on top_logprobs
Piece = tuple[str, TokenLogprob | None]
_FINISH: dict[str | None, FinishReason] = {"stop": "stop", "length": "length", "abort": "cancelled"}


def import_vllm() -> Any:
    """The vllm package, or MissingExtraError naming the extra that brings it."""
    try:
        import vllm
    except ImportError as exc:
        raise MissingExtraError("vllm", "gpu") from exc
    return vllm


def _async_engine_class(vllm: Any) -> Any:
    try:
        from vllm.v1.engine.async_llm import AsyncLLM

        return AsyncLLM
    except ImportError:  # older releases: the V0 engine under its public name
        return vllm.AsyncLLMEngine


class OutputAccumulator:
    """Turns vLLM's per-step outputs (RequestOutputKind.DELTA) into our tokens and one Generation.

    Kept free of vllm imports so its logic is unit-tested where vllm is not installed.
    """

    def __init__(self, top_logprobs: int, eos_ids: frozenset[int], model: str, logprobs_mode: str) -> None:
        self.top_logprobs = top_logprobs
        self.eos_ids = eos_ids
        self.model = model
        self.logprobs_mode = logprobs_mode
        self.text = ""
        self.tokens: list[TokenLogprob] = []
        self.token_texts: list[str] = []
        self.prompt_tokens = 0
        self.finish_reason: FinishReason | None = None
        self.stop_reason: int | str | None = None
        self.latency_s = 0.0
        self.ttft_s: float | None = None

    def add(self, output: Any) -> list[Piece]:
        """Record one RequestOutput; return (text delta, token) pairs to stream."""
        if output.prompt_token_ids is not None:
            self.prompt_tokens = len(output.prompt_token_ids)
        comp = output.outputs[0]
        pieces: list[Piece] = []
        logprobs = comp.logprobs or [None] * len(comp.token_ids)
        for token_id, entry in zip(comp.token_ids, logprobs, strict=False):
            tok = self._token(int(token_id), entry)
            self.tokens.append(tok)
            self.token_texts.append(tok.token)
            pieces.append(("", tok))
        self.text += comp.text
        if comp.text:
            if pieces:
                last_text, last_tok = pieces[-1]
                pieces[-1] = (last_text + comp.text, last_tok)
            else:
                pieces.append((comp.text, None))
        if output.finished:
            self.finish_reason = _FINISH.get(comp.finish_reason, "stop")
            self.stop_reason = comp.stop_reason
        return pieces

    def _token(self, token_id: int, entry: dict[int, Any] | None) -> TokenLogprob:
        if entry is None or token_id not in entry:
            raise BackendUnavailableError("vLLM returned no logprob for a generated token")
        chosen = entry[token_id]
        text = chosen.decoded_token or ""
        tops: tuple[TopLogprob, ...] = ()
        if self.top_logprobs > 0:
            ranked = sorted(entry.values(), key=lambda lp: lp.rank if lp.rank is not None else 1 << 30)
            tops = tuple(
                TopLogprob(token=lp.decoded_token or "", logprob=float(lp.logprob),
                           bytes=tuple((lp.decoded_token or "").encode("utf-8")))
                for lp in ranked[: self.top_logprobs]
            )
        return TokenLogprob(token_id=token_id, token=text, logprob=float(chosen.logprob),
                            bytes=tuple(text.encode("utf-8")), top_logprobs=tops)

    def generation(self) -> Generation:
        """The finished answer: EOS and the tokens past a stop string are not part of it."""
        tokens = list(self.tokens)
        if self.finish_reason == "stop" and self.stop_reason is None:
            while tokens and tokens[-1].token_id in self.eos_ids:
                tokens.pop()
        elif isinstance(self.stop_reason, str):  # stop string: keep the tokens inside the returned text
            keep, length = 0, 0
            for text in self.token_texts:
                length += len(text)
                if length > len(self.text):
                    break
                keep += 1
            tokens = tokens[:keep]
        return Generation(
            text=self.text,
            tokens=tokens,
            finish_reason=self.finish_reason or "stop",
            prompt_tokens=self.prompt_tokens,
            completion_tokens=len(self.tokens),
            latency_s=self.latency_s,
            ttft_s=self.ttft_s,
            model=self.model,
            extra={"logprobs_mode": self.logprobs_mode},
        )


class VllmBackend:
    """A local GPU tier served by one in-process vLLM async engine."""

    is_local = True
    kind = "vllm"
    uses_gpu = True

    def __init__(
        self,
        name: str,
        engine: Any,
        *,
        vllm: Any,
        model_name: str,
        logprobs_mode: str,
        max_model_len: int,
        gpu_memory_utilization: float,
        parallel: dict[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.engine = engine
        self._vllm = vllm
        self.model_name = model_name
        self.logprobs_mode = logprobs_mode
        self.max_model_len = max_model_len
        self.gpu_memory_utilization = gpu_memory_utilization
        self.parallel = dict(parallel or {})  # vLLM parallelism args past one GPU (parallel_args)
        self._tokenizer: Any = None
        self._eos_ids: frozenset[int] = frozenset()
        self.in_flight = 0

    async def tokenizer(self) -> Any:
        if self._tokenizer is None:
            tok = self.engine.get_tokenizer()
            self._tokenizer = await tok if inspect.isawaitable(tok) else tok
            eos = getattr(self._tokenizer, "eos_token_id", None)
            self._eos_ids = frozenset([int(eos)] if eos is not None else [])
        return self._tokenizer

    async def prompt_tokens(self, request: GenerationRequest) -> list[int]:
        """The token ids the model sees: the model's chat template for messages, as vLLM's server."""
        tok = await self.tokenizer()
        if request.messages is None:
            ids: list[int] = tok.encode(request.prompt or "")
            return ids
        messages = [dict(m) for m in request.messages]
        try:
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # noqa: BLE001 - jinja raise_exception(): the template rejects these messages
            raise InvalidRequestError(f"messages rejected by the model's chat template: {exc}", param="messages") from None
        ids = tok.encode(text, add_special_tokens=False)
        return ids

    def _sampling(self, request: GenerationRequest, room: int) -> Any:
        p = request.params
        return self._vllm.SamplingParams(
            max_tokens=max(1, min(p.max_tokens, room)),
            temperature=max(p.temperature, 0.0),
            top_p=p.top_p,
            seed=p.seed,
            stop=list(p.stop) or None,
            ignore_eos=p.ignore_eos,
            logprobs=min(p.top_logprobs, MAX_TOP_LOGPROBS),  # 0: the chosen token's logprob only
            output_kind=self._vllm.sampling_params.RequestOutputKind.DELTA,
        )

    async def _run(self, request: GenerationRequest) -> AsyncIterator[tuple[list[Piece], OutputAccumulator]]:
        started = time.perf_counter()  # engine time starts here: template and tokenising are its work
        ids = await self.prompt_tokens(request)
        if not ids:
            raise InvalidRequestError("empty prompt", param="prompt")
        room = self.max_model_len - len(ids)
        if room < 1:
            raise ContextLengthExceededError(
                f"prompt is {len(ids)} tokens; this model's context is {self.max_model_len} tokens", param="messages"
            )
        acc = OutputAccumulator(min(request.params.top_logprobs, MAX_TOP_LOGPROBS), self._eos_ids,
                                self.model_name, self.logprobs_mode)
        request_id = request.request_id or uuid.uuid4().hex
        first: float | None = None
        finished = False
        self.in_flight += 1
        try:
            async for out in self.engine.generate({"prompt_token_ids": ids}, self._sampling(request, room), request_id):
                if first is None:
                    first = time.perf_counter()
                pieces = acc.add(out)
                finished = bool(out.finished)
                yield pieces, acc
            if not finished:
                raise BackendUnavailableError("vLLM ended the request without finishing it")
        except LocalrouteError:
            raise
        except ValueError as exc:  # vLLM's request validation errors are ValueErrors
            raise InvalidRequestError(f"vLLM rejected the request: {exc}") from None
        except Exception as exc:
            if type(exc).__name__ in ("EngineDeadError", "AsyncEngineDeadError", "EngineGenerateError"):
                raise BackendUnavailableError(f"vLLM engine failed: {type(exc).__name__}") from exc
            raise
        finally:
            self.in_flight -= 1
            if not finished:
                await self.engine.abort(request_id)
            acc.latency_s = time.perf_counter() - started
            acc.ttft_s = (first - started) if first is not None else None

    async def generate(self, request: GenerationRequest) -> Generation:
        acc: OutputAccumulator | None = None
        async for _pieces, acc in self._run(request):
            pass
        assert acc is not None
        return acc.generation()

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamDelta]:
        acc: OutputAccumulator | None = None
        async for pieces, acc in self._run(request):
            for text, tok in pieces:
                yield StreamDelta(text=text, token=tok)
        assert acc is not None
        yield StreamDelta(text="", final=acc.generation())

    @property
    def model(self) -> str:
        return self.model_name

    @property
    def capabilities(self) -> Capabilities:
        return dataclasses.replace(default_capabilities(self.kind, True), context_tokens=self.max_model_len)

    def fingerprint(self) -> dict[str, Any]:
        """vLLM loads a checkpoint (a folder): its name and chat template stand in for a file hash."""
        template = getattr(self._tokenizer, "chat_template", None) if self._tokenizer is not None else None
        return model_fingerprint(None, template if isinstance(template, str) else None, self.model_name)

    def health(self) -> dict[str, Any]:
        errored = bool(getattr(self.engine, "errored", False))
        return {
            "ok": not errored,
            "kind": "vllm",
            "model": self.model_name,
            "logprobs_mode": self.logprobs_mode,
            "max_model_len": self.max_model_len,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            **self.parallel,
            "active": self.in_flight,
            "error": "engine dead" if errored else None,
        }

    async def aclose(self) -> None:
        shutdown = getattr(self.engine, "shutdown", None)
        if shutdown is not None:
            result = shutdown()
            if inspect.isawaitable(result):
                await result


def engine_args(vllm: Any, model: Path, tier: TierSettings, settings: Settings) -> Any:
    """AsyncEngineArgs from the settings; refuses a vLLM too old to state its logprobs mode."""
    fields = {f.name for f in dataclasses.fields(vllm.AsyncEngineArgs)}
    if "logprobs_mode" not in fields:
        raise ConfigError(
            f"vllm {getattr(vllm, '__version__', '?')} cannot set logprobs_mode; install vllm>=0.10.2 "
            "(pip install -U 'localroute[gpu]')", param="vllm_logprobs_mode",
        )
    kwargs: dict[str, Any] = {
        "model": str(model),
        "gpu_memory_utilization": tier.gpu_memory_utilization,
        "max_model_len": tier.max_model_len or tier.n_ctx or settings.n_ctx,
        "max_num_seqs": settings.n_parallel,
        "max_logprobs": MAX_TOP_LOGPROBS,
        "logprobs_mode": settings.vllm_logprobs_mode,
        "disable_log_stats": True,
    }
    if "enable_log_requests" in fields:
        kwargs["enable_log_requests"] = False  # never log prompts
    elif "disable_log_requests" in fields:
        kwargs["disable_log_requests"] = True
    parallel = parallel_args(tier)
    unknown = sorted(k for k in parallel if k not in fields)
    if unknown:  # asked for and silently dropped would load the model on one GPU, or not at all
        raise ConfigError(
            f"tiers.{tier.name}: vllm {getattr(vllm, '__version__', '?')} has no engine argument {', '.join(unknown)}; "
            "upgrade vllm (pip install -U 'localroute[gpu]')", param=unknown[0],
        )
    kwargs.update(parallel)
    return vllm.AsyncEngineArgs(**{k: v for k, v in kwargs.items() if k in fields})


def parallel_args(tier: TierSettings) -> dict[str, Any]:
    """vLLM's own parallelism engine args for the tier; only those set away from one GPU, so a
    single-GPU tier passes nothing new to any vLLM version."""
    out: dict[str, Any] = {}
    for name in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
        if getattr(tier, name) != 1:
            out[name] = getattr(tier, name)
    if tier.enable_expert_parallel:
        out["enable_expert_parallel"] = True
    if tier.distributed_executor_backend is not None:
        out["distributed_executor_backend"] = tier.distributed_executor_backend
    return out


def gpus_needed(tier: TierSettings) -> int:
    return tier.tensor_parallel_size * tier.pipeline_parallel_size * tier.data_parallel_size


def check_gpus(tier: TierSettings, visible: int | None) -> None:
    """Fail before vLLM starts (which on a host without the GPUs it needs hangs or dies deep in
    its workers) with what the tier needs and what this host has. `visible`: CUDA devices torch
    sees (None: unknown, not checked). Pipeline stages on other nodes (ray) are not counted here."""
    if visible is None:
        return
    need = gpus_needed(tier)
    where = os.environ.get("CUDA_VISIBLE_DEVICES")
    seen = f"CUDA_VISIBLE_DEVICES={where!r}" if where is not None else "CUDA_VISIBLE_DEVICES unset"
    if visible == 0:
        raise BackendUnavailableError(
            f"tier {tier.name}: vLLM needs a CUDA GPU and this host has none visible ({seen}); run it on a GPU "
            "host, or give the tier kind = 'llama_cpp' (CPU)", code="no_gpu",
        )
    if tier.distributed_executor_backend == "ray" and tier.pipeline_parallel_size > 1:
        return  # the stages may live on other nodes of the ray cluster
    if need > visible:
        raise ConfigError(
            f"tiers.{tier.name}: needs {need} GPUs (tensor_parallel_size={tier.tensor_parallel_size} x "
            f"pipeline_parallel_size={tier.pipeline_parallel_size} x data_parallel_size={tier.data_parallel_size}) "
            f"and this host has {visible} visible ({seen}); lower them or set distributed_executor_backend = 'ray' "
            "for stages on other nodes", param="tensor_parallel_size",
        )


def visible_gpus() -> int | None:
    """CUDA devices torch (vLLM's own dependency, already imported with it) can use; None if unknown."""
    try:
        import torch

        return int(torch.cuda.device_count())
    except Exception:  # noqa: BLE001 - no torch, a broken CUDA install: leave the check to vLLM
        return None


def from_settings(tier: TierSettings, settings: Settings) -> VllmBackend:
    vllm = import_vllm()  # fail on the missing extra before touching the model files
    from localroute.backends.transformers import model_source

    model = model_source(tier.model, settings.models_dir)
    args = engine_args(vllm, model, tier, settings)
    check_gpus(tier, visible_gpus())
    try:
        engine = _async_engine_class(vllm).from_engine_args(args)
    except (RuntimeError, ValueError, OSError) as exc:  # no GPU, not enough memory, unsupported model
        raise BackendUnavailableError(f"vLLM could not start {model}: {exc}") from exc
    max_len = int(getattr(getattr(engine, "model_config", None), "max_model_len", 0) or args.max_model_len)
    return VllmBackend(
        tier.name, engine, vllm=vllm, model_name=model.name, logprobs_mode=settings.vllm_logprobs_mode,
        max_model_len=max_len, gpu_memory_utilization=tier.gpu_memory_utilization, parallel=parallel_args(tier),
    )
