"""transformers/torch tier: CUDA when present, CPU otherwise; GGUF or HF-format weights.

Why it exists beside llama.cpp and vLLM: it is the GPU path that runs anywhere torch does (so the
GPU code is exercised on CPU-only machines), and it is an independent implementation of the same
model, so the llama.cpp tier's greedy tokens and logprobs can be cross-checked against it.

GGUF files are loaded through transformers' GGUF support, which *dequantises* every tensor to
float (Q4_1 -> float32 on CPU); llama.cpp computes with the quantised blocks. The two therefore
agree on greedy tokens for most steps and on logprobs to within quantisation noise, not bit for bit
(tests/backends/test_transformers.py states the measured tolerance).

Batching: one engine thread owns the model. A request that arrives while the engine is idle waits
`batch_wait_s` (a few ms) for company, then up to `max_batch` requests run as one left-padded
batch with a shared KV cache, one forward pass per step for every row. Requests that arrive while
a batch is running wait for the next batch (static batching, not vLLM's continuous batching:
simple and correct, and the throughput path on GPUs is the vLLM tier).

Logprobs are *raw* (log-softmax of the logits at temperature 1, before temperature and top_p), the
same as the llama.cpp tier and vLLM's `raw_logprobs` mode; `logprobs_mode` is recorded in every
Generation's `extra` and in health(). Sampling draws from a per-request numpy RNG, so a seeded
request's tokens do not depend on the other rows of its batch.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from localroute.backends.decoding import DecodeState, adjuster_for, request_failure, sample_token
from localroute.backends.threaded import EngineBridge
from localroute.errors import (
    BackendUnavailableError,
    InvalidRequestError,
    MissingExtraError,
    RateLimitError,
)
from localroute.types import (
    GenerationRequest,
    TopLogprob,
)

if TYPE_CHECKING:
    from localroute.settings import Settings, TierSettings

log = logging.getLogger(__name__)

LOGPROBS_MODE = "raw_logprobs"


def import_torch() -> tuple[Any, Any]:
    """torch and transformers, or MissingExtraError naming the extra that brings them."""
    try:
        import torch
        import transformers
    except ImportError as exc:
        raise MissingExtraError("torch/transformers", "hf") from exc
    return torch, transformers


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: byte-level BPE token strings back to raw bytes."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, codes, strict=True)}


class TokenBytes:
    """Exact bytes of each token id, so multi-byte characters split over tokens decode right."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self._cache: dict[int, bytes] = {}
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self._byte_level = type(decoder).__name__ == "ByteLevel"
        self._bytes_of = _byte_decoder() if self._byte_level else {}

    def __call__(self, token_id: int) -> bytes:
        cached = self._cache.get(token_id)
        if cached is not None:
            return cached
        piece = self._tok.convert_ids_to_tokens(token_id)
        if piece is None:
            out = b""
        elif self._byte_level and all(ch in self._bytes_of for ch in piece):
            out = bytes(self._bytes_of[ch] for ch in piece)
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            out = bytes([int(piece[3:5], 16)])  # sentencepiece byte-fallback token
        else:
            out = piece.replace("\u2581", " ").encode("utf-8")
        self._cache[token_id] = out
        return out


@dataclass(eq=False)
class _Req(DecodeState):
    """A request inside the torch engine."""

    done: bool = False


class TorchEngine:
    """Owns one transformers model and the thread that runs batches for every request."""

    def __init__(
        self,
        model: str | Path,
        *,
        device: str = "auto",
        dtype: str = "auto",
        max_batch: int = 8,
        batch_wait_s: float = 0.005,
        n_threads: int | None = None,
        max_len: int = 2048,
        max_queue: int = 64,
    ) -> None:
        torch, transformers = import_torch()
        self._torch = torch
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendUnavailableError("transformers backend: device 'cuda' asked for but torch sees no CUDA GPU")
        if self.device == "cpu" and n_threads:
            torch.set_num_threads(n_threads)
        self.dtype = self._pick_dtype(dtype)
        path = Path(model).expanduser()
        self.model_name = path.name
        kwargs: dict[str, Any] = {"local_files_only": True}
        if path.suffix == ".gguf":
            src, kwargs["gguf_file"] = str(path.parent), path.name
        else:
            src = str(path)
        self.model_name = path.name
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(src, **kwargs)
            self.model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=self.dtype, **kwargs)
        except (OSError, ValueError, ImportError) as exc:
            raise BackendUnavailableError(f"transformers could not load {path}: {exc}") from exc
        self.model.to(self.device)
        self.model.eval()
        # transformers 5.2x renamed `past_key_values` to `cache` (argument and output field)
        forward_params = inspect.signature(self.model.forward).parameters
        self._cache_kw = "cache" if "cache" in forward_params else "past_key_values"
        self._keep_last = {"logits_to_keep": 1} if "logits_to_keep" in forward_params else {}
        cfg = self.model.config
        limit = int(getattr(cfg, "max_position_embeddings", 0) or 0)
        self.max_len = min(max_len, limit) if limit > 0 else max_len
        self.n_vocab = int(self.model.get_output_embeddings().weight.shape[0])
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            eos_ids.add(int(self.tokenizer.eos_token_id))
        self.eos_ids = frozenset(int(t) for t in eos_ids)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else next(iter(self.eos_ids), 0))
        self.token_bytes = TokenBytes(self.tokenizer)
        self.max_batch = max(1, max_batch)
        self.batch_wait_s = batch_wait_s
        self.max_queue = max_queue
        self._waiting: deque[_Req] = deque()
        self._running_batch: list[_Req] = []
        self._cond = threading.Condition()
        self._model_lock = threading.Lock()  # one forward pass at a time: batches and score()
        self._running = True
        self.error: str | None = None
        self.stats: dict[str, int] = {
            "requests_total": 0,
            "tokens_generated_total": 0,
            "prompt_tokens_total": 0,
            "batches_total": 0,
            "cancelled_total": 0,
            "rejected_total": 0,
        }
        self._thread = threading.Thread(target=self._loop, name=f"torch-engine-{self.model_name}", daemon=True)
        self._thread.start()

    def _pick_dtype(self, dtype: str) -> Any:
        torch = self._torch
        if dtype != "auto":
            value = getattr(torch, dtype, None)
            if not isinstance(value, torch.dtype):
                raise InvalidRequestError(f"torch_dtype: unknown dtype {dtype!r}", param="torch_dtype")
            return value
        if self.device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32

    # ---- tokenizer (read-only: safe from the asyncio thread) ----

    def chat_tokens(self, messages: list[dict[str, Any]]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            text = "".join(f"{m['role']}: {m.get('content') or ''}\n" for m in messages) + "assistant:"
            return self.prompt_tokens(text)
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # noqa: BLE001 - jinja raise_exception(): the template rejects these messages
            raise InvalidRequestError(f"messages rejected by the model's chat template: {exc}", param="messages") from None
        ids: list[int] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids

    def prompt_tokens(self, text: str) -> list[int]:
        ids: list[int] = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        return ids

    def score(self, prompt: list[int], continuation: list[int]) -> tuple[list[float], list[int]]:
        """Teacher-forced raw logprob of each continuation token, and the model's argmax at each step.

        Lets another engine's output be checked token by token without the two greedy paths
        drifting apart after the first disagreement (the llama.cpp cross-check uses it).
        """
        torch = self._torch
        ids = torch.tensor([prompt + continuation], dtype=torch.long, device=self.device)
        with self._model_lock, torch.inference_mode():
            logits = self.model(input_ids=ids, use_cache=False).logits[0, len(prompt) - 1 : -1].float()
            lp = torch.log_softmax(logits, dim=-1)
            target = torch.tensor(continuation, dtype=torch.long, device=self.device)
            chosen = lp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
            return [float(x) for x in chosen.cpu()], [int(x) for x in lp.argmax(-1).cpu()]

    # ---- submission (asyncio thread) ----

    def submit(self, req: _Req) -> None:
        if not self._running or self.error is not None:
            raise BackendUnavailableError(f"local engine unavailable: {self.error or 'stopped'}")
        with self._cond:
            if len(self._waiting) >= self.max_queue + self.max_batch:
                self.stats["rejected_total"] += 1
                raise RateLimitError("local tier queue is full; retry shortly", retry_after_s=1.0)
            self._waiting.append(req)
            self.stats["requests_total"] += 1
            self._cond.notify()

    def cancel(self, req: _Req) -> None:
        """Mark a request abandoned; a running batch drops its row at the next step."""
        req.cancelled = True
        with self._cond:
            if req in self._waiting:
                self._waiting.remove(req)
                self.stats["cancelled_total"] += 1

    def load(self) -> dict[str, int]:
        return {"active": len(self._running_batch), "waiting": len(self._waiting), "slots": self.max_batch}

    # ---- engine thread ----

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while self._running and not self._waiting:
                        self._cond.wait()
                    if not self._running:
                        return
                # gather company for the first request, then take what is there
                deadline = time.monotonic() + self.batch_wait_s
                with self._cond:
                    while self._running and len(self._waiting) < self.max_batch:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        self._cond.wait(left)
                    batch = [self._waiting.popleft() for _ in range(min(self.max_batch, len(self._waiting)))]
                    self._running_batch = batch
                if batch:
                    for req in batch:
                        req.sink(("admitted", None))
                    with self._model_lock:
                        self._run_batch(batch)
                with self._cond:
                    self._running_batch = []
        except Exception as exc:
            # the model itself failed (a forward pass): every request gets a 503, never a hang. A
            # request's own failure never gets here: _step ends that request alone.
            log.exception("torch engine crashed")
            self._fail(f"{type(exc).__name__}: {exc}")

    def _fail(self, reason: str) -> None:
        with self._cond:
            self.error = reason
            self._running = False
            doomed = list(self._running_batch) + list(self._waiting)
            self._waiting.clear()
        for req in doomed:
            if not req.done:
                req.sink(("error", BackendUnavailableError(f"local engine failed: {reason}")))

    def _run_batch(self, batch: list[_Req]) -> None:
        """Prefill a left-padded batch, then one forward pass per step until every row is done."""
        torch = self._torch
        self.stats["batches_total"] += 1
        width = max(len(r.prompt) for r in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):
            ids[i, width - len(r.prompt) :] = torch.tensor(r.prompt, dtype=torch.long)
            mask[i, width - len(r.prompt) :] = 1
            self.stats["prompt_tokens_total"] += len(r.prompt)
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        live = [not r.cancelled for r in batch]
        with torch.inference_mode():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **self._keep_last)
            past = getattr(out, self._cache_kw)
            logits = out.logits[:, -1, :]
            next_pos = pos[:, -1:] + 1
            while True:
                chosen = self._step(batch, live, logits)
                if not any(live):
                    return
                nxt = torch.tensor(chosen, dtype=torch.long, device=self.device).unsqueeze(-1)
                mask = torch.cat([mask, torch.ones_like(nxt)], dim=-1)
                out = self.model(
                    input_ids=nxt, attention_mask=mask, position_ids=next_pos, use_cache=True,
                    **{self._cache_kw: past}, **self._keep_last,
                )
                past = getattr(out, self._cache_kw)
                logits = out.logits[:, -1, :]
                next_pos = next_pos + 1

    def _step(self, batch: list[_Req], live: list[bool], logits: Any) -> list[int]:
        """Pick one token per live row from the last logits; return the tokens fed next."""
        torch = self._torch
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        greedy = logprobs.argmax(dim=-1).tolist()
        k = min(max((r.params.top_logprobs for r, a in zip(batch, live, strict=True) if a), default=0), self.n_vocab)
        top_vals = top_idx = None
        if k > 0:
            tv, ti = logprobs.topk(k, dim=-1)
            top_vals, top_idx = tv.cpu().numpy(), ti.cpu().numpy()
        chosen = list(greedy)
        for i, req in enumerate(batch):
            if not live[i]:
                chosen[i] = self.pad_id
                continue
            if req.cancelled:
                live[i] = False
                self.stats["cancelled_total"] += 1
                chosen[i] = self.pad_id
                continue
            try:
                if not self._row(req, i, chosen, logprobs, top_vals, top_idx):
                    live[i] = False
            except Exception as exc:  # this request's own failure: it ends alone, the batch goes on
                log.exception("request %s failed in the torch engine; the engine goes on", req.request_id)
                live[i], chosen[i], req.done = False, self.pad_id, True
                req.sink(("error", request_failure(exc)))
        return chosen

    def _row(self, req: _Req, i: int, chosen: list[int], logprobs: Any, top_vals: Any, top_idx: Any) -> bool:
        """Choose row i's token (into `chosen`) and record it; False when the request is finished."""
        if req.adjuster is not None:  # bias and penalties pick the token; the logprob stays the model's
            row = req.adjuster.apply(logprobs[i].cpu().numpy())
            chosen[i] = sample_token(row, req.params, req.rng) if req.params.temperature > 0 else int(row.argmax())
        elif req.params.temperature > 0:
            chosen[i] = sample_token(logprobs[i].cpu().numpy(), req.params, req.rng)
        token = chosen[i]
        lp = float(logprobs[i, token])
        tops: tuple[TopLogprob, ...] = ()
        if req.params.top_logprobs > 0 and top_vals is not None and top_idx is not None:
            n = req.params.top_logprobs
            tops = tuple(
                TopLogprob(
                    token=self.token_bytes(int(t)).decode("utf-8", errors="replace"),
                    logprob=float(v),
                    bytes=tuple(self.token_bytes(int(t))),
                )
                for t, v in zip(top_idx[i, :n], top_vals[i, :n], strict=True)
            )
        eos = token in self.eos_ids and not req.params.ignore_eos
        if not eos:
            self.stats["tokens_generated_total"] += 1
        raw = b"" if eos else self.token_bytes(token)
        if req.token(token, raw, lp, tops, time.perf_counter(), eos) is not None:
            req.done = True
            return False
        return True

    def close(self) -> None:
        with self._cond:
            self._running = False
            self._cond.notify_all()
        self._thread.join(timeout=30)


class TransformersBackend(EngineBridge):
    """A local tier served by `TorchEngine`; same contract as the llama.cpp tier."""

    engine: TorchEngine

    kind = "transformers"

    @property
    def uses_gpu(self) -> bool | None:
        return str(self.engine.device).startswith("cuda")

    def __init__(self, name: str, engine: TorchEngine, queue_timeout_s: float = 30.0) -> None:
        self.name = name
        self.engine = engine
        self.queue_timeout_s = queue_timeout_s

    def prompt_tokens(self, request: GenerationRequest) -> list[int]:
        """The token ids the model sees for this request."""
        if request.messages is None:
            return self.engine.prompt_tokens(request.prompt or "")
        return self.engine.chat_tokens([dict(m) for m in request.messages])

    @property
    def context_tokens(self) -> int:
        return self.engine.max_len

    def _state(self, request: GenerationRequest, **common: Any) -> _Req:
        return _Req(**common, model=self.engine.model_name, adjuster=adjuster_for(request.params, self.engine.n_vocab),
                    extra={"logprobs_mode": LOGPROBS_MODE, "device": self.engine.device})

    def health(self) -> dict[str, Any]:
        ok = self.engine.error is None and self.engine._running
        return {
            "ok": ok,
            "kind": "transformers",
            "model": self.engine.model_name,
            "device": self.engine.device,
            "dtype": str(self.engine.dtype).removeprefix("torch."),
            "logprobs_mode": LOGPROBS_MODE,
            "error": self.engine.error,
            **self.engine.load(),
        }

    async def aclose(self) -> None:
        await asyncio.to_thread(self.engine.close)


def model_source(model: str, models_dir: Path) -> Path:
    """A directory of HF-format weights, a .gguf path, or a registry name resolved to its GGUF."""
    from localroute.registry import resolve_model_path

    direct = Path(model).expanduser()
    if direct.is_dir():
        if not (direct / "config.json").is_file():
            raise BackendUnavailableError(f"{direct} has no config.json: not a transformers model directory")
        return direct
    return resolve_model_path(model, models_dir)


def from_settings(tier: TierSettings, settings: Settings) -> TransformersBackend:
    import_torch()  # fail on the missing extra before touching the model files
    engine = TorchEngine(
        model_source(tier.model, settings.models_dir),
        device=settings.torch_device,
        dtype=settings.torch_dtype,
        max_batch=settings.n_parallel,
        n_threads=settings.n_threads,
        max_len=tier.max_model_len or tier.n_ctx or settings.n_ctx,
        max_queue=settings.max_queue,
    )
    return TransformersBackend(tier.name, engine, queue_timeout_s=settings.queue_timeout_s)
