"""In-process llama.cpp tier with continuous batching and per-token logprobs at decode speed.

Why not llama-cpp-python's own logprob path: with `logits_all=True` it keeps an n_ctx x n_vocab
score matrix and runs at about a sixth of decode speed, one request at a time. Here one engine
thread drives the low-level API (`llama_batch` + `llama_decode`): every step decodes one token for
each active sequence (each request has its own KV-cache sequence), new requests join between steps
with their prompt fed in chunks, and only the last row of each sequence produces logits. The
chosen token's logprob (and top-k when asked) is a log-softmax of that row in numpy.

Logprobs are *raw*: the model's distribution at temperature 1, before temperature and top_p, as
vLLM's `raw_logprobs` mode. Sampling uses temperature/top_p on the same row with a per-request
numpy RNG, so a request's tokens depend only on its own seed, never on its batch neighbours.

All llama.cpp calls happen on the engine thread; the asyncio side only submits requests and reads
events, so one model is never used from two threads at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from localroute.backends.decoding import DecodeState, EarlyExit, adjuster_for, request_failure, sample_token
from localroute.backends.grammar import constraint_for
from localroute.backends.label_scoring import LabelScorer
from localroute.backends.llama_choices import generate_choices, stream_choices
from localroute.backends.llama_vocab import LlamaVocab
from localroute.backends.threaded import EngineBridge, Outbox, Sink
from localroute.backends.tool_calls import local_parallel_calls, tool_call_answer, with_tools_preamble
from localroute.errors import (
    BackendUnavailableError,
    ContextLengthExceededError,
    InvalidRequestError,
    LocalrouteError,
    MissingExtraError,
    RateLimitError,
)
from localroute.types import (
    Generation,
    GenerationRequest,
    StreamDelta,
    TopLogprob,
)

if TYPE_CHECKING:
    from localroute.settings import Settings, TierSettings

log = logging.getLogger(__name__)


def _import_llama_cpp() -> Any:
    try:
        import llama_cpp
        import llama_cpp._logger as llama_logger
    except ImportError as exc:  # pragma: no cover - exercised by the missing-extra test
        raise MissingExtraError("llama-cpp-python", "cpu") from exc
    if not os.environ.get("LOCALROUTE_LLAMA_VERBOSE"):
        llama_logger.logger.setLevel(logging.CRITICAL)
    return llama_cpp


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the shared prefix of two token arrays (vectorised: admission compares the
    prompt with every free slot's cache under the engine lock)."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


_NO_TOKENS = np.zeros(0, dtype=np.int32)


def _runs(slots: Iterable[int]) -> int:
    """Runs of ids that follow each other (+1) in batch order: [0,1,3] -> 2, [1,0] -> 2."""
    runs, last = 0, -2
    for slot in slots:
        runs += slot != last + 1
        last = slot
    return runs


@dataclass(eq=False)
class _Seq(DecodeState):
    """A request plus its place in the engine: KV slot, prompt still to feed, position."""

    slot: int = -1
    pending: list[int] = field(default_factory=list)
    n_past: int = 0
    last_token: int = -1
    cancel_step: int = 0  # decode_steps_total when cancel() was called
    reserved: int = 0
    grammar: Any = None  # backends.grammar.GrammarConstraint when response_format asks for JSON
    labels: tuple[str, ...] = ()  # a choice task's allowed answers: scored when the answer is done
    # n > 1 (backends.llama_choices): the leader (choice 0 of a wave) is submitted with its
    # siblings; they are admitted together and each sibling waits (`copy_of` set) until the
    # leader's prompt is in the KV cache, then gets a copy of it (llama_memory_seq_cp) and its first
    # token from the same logits row
    siblings: list[_Seq] = field(default_factory=list)
    copy_of: _Seq | None = None


class LlamaEngine(LlamaVocab):
    """Owns one llama.cpp model + context and the thread that decodes for every request."""

    def __init__(
        self,
        model_path: Path,
        n_ctx_seq: int = 2048,
        n_parallel: int = 4,
        n_batch: int = 512,
        n_threads: int = 2,
        prefill_chunk: int = 128,
        max_queue: int = 64,
        kv_unified: bool = False,
        prefix_cache: bool = True,
        extra_buffers: str = "auto",
    ) -> None:
        """Each of the `n_parallel` sequences gets `n_ctx_seq` KV cells; a request is admitted only
        with a free slot and when its prompt + max_tokens fits, so decode never runs out of cells.
        `extra_buffers` is settings.llama_extra_buffers (auto/on/off; backends.cpu_features)."""
        self.model_path = model_path
        self.n_parallel = n_parallel
        self.n_batch = max(n_batch, n_parallel, 4)  # room for a 2-token chunk stretched to 3 (_prefill)
        self.prefill_chunk = max(2, min(prefill_chunk, self.n_batch))  # never a one-token chunk (_prefill)
        self.max_queue = max_queue
        self._ll = _import_llama_cpp()
        ll = self._ll
        ll.llama_backend_init()
        mparams = ll.llama_model_default_params()
        mparams.n_gpu_layers = 0
        from localroute.backends.cpu_features import extra_buffers_choice

        self.extra_buffers = extra_buffers_choice(extra_buffers)
        mparams.use_extra_bufts = self.extra_buffers.use_extra_bufts
        log.info("%s: extra buffer types %s (%s)", model_path.name,
                 "on" if self.extra_buffers.use_extra_bufts else "off", self.extra_buffers.reason)
        self._model = ll.llama_model_load_from_file(str(model_path).encode(), mparams)
        if not self._model:
            raise BackendUnavailableError(f"llama.cpp could not load {model_path}")
        self._vocab = ll.llama_model_get_vocab(self._model)
        self.n_vocab = int(ll.llama_vocab_n_tokens(self._vocab))
        self.n_ctx_train = int(ll.llama_model_n_ctx_train(self._model))
        self.n_ctx_seq = min(n_ctx_seq, self.n_ctx_train) if self.n_ctx_train > 0 else n_ctx_seq
        cparams = ll.llama_context_default_params()
        cparams.n_ctx = self.n_ctx_seq * n_parallel
        cparams.n_batch = self.n_batch
        cparams.n_ubatch = self.n_batch
        cparams.n_seq_max = n_parallel
        self.n_threads = n_threads
        cparams.n_threads = n_threads
        cparams.n_threads_batch = n_threads
        # Default: one KV stream per sequence, so a sequence's logprobs are bit-identical at any batch
        # size. `kv_unified` shares one buffer; logprobs then move with the batch neighbours (same
        # tokens, up to 0.12 nats apart per token measured), see settings.kv_unified.
        cparams.kv_unified = kv_unified
        cparams.no_perf = True
        cparams.flash_attn_type = 0
        self._ctx = ll.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            ll.llama_model_free(self._model)
            raise BackendUnavailableError(f"llama.cpp could not create a context for {model_path}")
        self.n_ctx_total = int(ll.llama_n_ctx(self._ctx))
        self.kv_cells_per_seq = int(ll.llama_n_ctx_seq(self._ctx))  # llama.cpp may round n_ctx up
        self.n_ctx_seq = min(self.n_ctx_seq, self.kv_cells_per_seq)
        self.ctx_budget = self.n_ctx_total  # cells that admitted sequences may reserve in total
        self._mem = ll.llama_get_memory(self._ctx)
        self._batch = ll.llama_batch_init(self.n_batch, 0, 1)
        self._b_token = np.ctypeslib.as_array(self._batch.token, shape=(self.n_batch,))
        self._b_pos = np.ctypeslib.as_array(self._batch.pos, shape=(self.n_batch,))
        self._b_nseq = np.ctypeslib.as_array(self._batch.n_seq_id, shape=(self.n_batch,))
        self._b_logits = np.ctypeslib.as_array(self._batch.logits, shape=(self.n_batch,))
        self._b_nseq[:] = 1
        self._read_vocab()
        self._work = np.empty(self.n_vocab, dtype=np.float32)
        self._top_scratch = np.empty(self.n_vocab, dtype=np.float32)
        # A newcomer takes the free slot whose cached prompt shares the longest prefix with its own,
        # else the lowest free slot, so running sequences stay packed at the low ids (see
        # _decode_rows for why that matters).
        self._free_slots = list(range(n_parallel))
        # Prefix cache: a finished request's prompt stays in its slot's KV stream; the next request
        # in that slot skips the shared prefix (the chat template's system prompt, earlier turns of a
        # conversation). Bit-identical to prefilling from scratch (tests/backends/test_llama_cpp_batching.py).
        # Off with a unified KV buffer, where leftovers would take cells other slots need.
        self.kv_unified = kv_unified
        self.prefix_cache = prefix_cache and not kv_unified
        self._slot_cache: list[np.ndarray] = [_NO_TOKENS] * n_parallel
        self._budget_used = 0
        self._waiting: deque[_Seq] = deque()
        self._active: list[_Seq] = []
        self._cond = threading.Condition()
        self.outbox = Outbox()  # a step's token events reach the event loop in one wake-up
        self._running = True
        self.error: str | None = None
        # Counters only grow; read them from any thread (ints, updated by the engine thread or under
        # the lock). `load()` gives the gauges.
        self.stats: dict[str, int] = {
            "requests_total": 0,  # accepted by submit()
            "completed_total": 0,  # finished with stop/length
            "cancelled_total": 0,  # abandoned by the client, waiting or running
            "rejected_total": 0,  # 429: queue full
            "failed_total": 0,  # ended by an engine error (KV cache full, decode error)
            "tokens_generated_total": 0,
            "prompt_tokens_total": 0,  # prompt tokens of admitted requests
            "prompt_tokens_cached_total": 0,  # of those, taken from a slot's prefix cache (not prefilled)
            "prompts_prefilled_total": 0,  # prompts fed to the model: one per request, one per wave of n > 1 choices
            # prompt tokens of the choices 1.. of an n > 1 request: copied from choice 0's KV, never prefilled
            "prompt_tokens_shared_total": 0,
            "kv_copies_total": 0,  # llama_memory_seq_cp calls for those choices
            "decode_steps_total": 0,  # successful llama_decode calls
            "batched_rows_total": 0,  # decode rows over all steps: / decode_steps_total = mean batch
            # ubatches llama.cpp runs for the decode rows (runs of consecutive slot ids); ideally one
            # per decode step, more when finished sequences leave gaps between running ones
            "ubatches_total": 0,
            "decode_row_steps_total": 0,  # decode steps that generated tokens (prefill-only steps excluded)
            "decode_rows_ns_total": 0,  # time in llama_decode for generating rows
            "prefill_ns_total": 0,  # time in llama_decode for prompt chunks
            "step_ns_total": 0,  # time in whole engine steps (decode, prefill, sampling, hand-off)
            "kv_full_total": 0,  # llama_decode returned 1 (no KV slot) and the step was shrunk
            "decode_errors_total": 0,  # llama_decode returned another non-zero code
            # gauge: most decode steps a cancelled running request stayed in the batch (<= 1 by design)
            "cancel_lag_steps_max": 0,
        }
        self._labels = LabelScorer(self)  # its scoring context is built on the first choice task
        self._thread = threading.Thread(target=self._loop, name=f"llama-engine-{model_path.name}", daemon=True)
        self._thread.start()

    # ---- submission (called from the asyncio thread) ----

    def submit(self, seq: _Seq) -> None:
        if not self._running or self.error is not None:
            raise BackendUnavailableError(f"local engine unavailable: {self.error or 'stopped'}")
        need = len(seq.prompt) + seq.max_new
        if need > self.n_ctx_seq:
            raise ContextLengthExceededError(
                f"prompt ({len(seq.prompt)} tokens) plus max_tokens exceeds this model's context "
                f"of {self.n_ctx_seq} tokens",
                param="messages",
            )
        with self._cond:
            # Free slots are filled by the engine thread between steps, so a burst arriving during
            # one step all lands in `_waiting`: count the slots that will absorb part of it.
            if len(self._waiting) >= self.max_queue + len(self._free_slots):
                self.stats["rejected_total"] += 1 + len(seq.siblings)
                raise RateLimitError("local tier queue is full; retry shortly", retry_after_s=1.0)
            self._waiting.append(seq)
            # an n > 1 wave counts as its sequences, as completed/cancelled_total count them
            self.stats["requests_total"] += 1 + len(seq.siblings)
            self._cond.notify()

    def cancel(self, seq: _Seq) -> None:
        """Mark a request abandoned: a waiting one leaves the queue now, a running one is dropped
        (its slot and KV cells freed) before the next decode step."""
        seq.cancel_step = self.stats["decode_steps_total"]
        seq.cancelled = True
        with self._cond:
            if seq in self._waiting:
                self._waiting.remove(seq)
                self.stats["cancelled_total"] += 1 + len(seq.siblings)  # they never ran either
            self._cond.notify()

    def load(self) -> dict[str, int]:
        """Gauges: running and waiting requests, slots, and KV cells reserved."""
        return {
            "active": len(self._active),
            "waiting": len(self._waiting),
            "slots": self.n_parallel,
            "free_slots": len(self._free_slots),
            "kv_reserved": self._budget_used,
            "kv_total": self.n_ctx_total,
        }

    # ---- the engine thread ----

    def _admit(self) -> None:
        """Move waiting requests into free slots, first come first served, while their reservation
        (prompt + max_tokens) fits the context budget. Called with the lock held. A request with
        siblings (n > 1) waits until it has a slot for each of them too (first come first served:
        later requests wait behind it), and reserves one budget per choice."""
        while self._waiting and self._free_slots:
            seq = self._waiting[0]
            need = len(seq.prompt) + seq.max_new
            width = 1 + len(seq.siblings)
            if width > len(self._free_slots):
                return  # wait for enough slots
            if self._budget_used + need * width > self.ctx_budget and self._active:
                return  # wait for a sequence to finish and return its budget
            self._waiting.popleft()
            seq.slot, reuse = self._pick_slot(seq.prompt)
            self._free_slots.remove(seq.slot)
            self._ll.llama_memory_seq_rm(self._mem, seq.slot, reuse, -1)
            self._slot_cache[seq.slot] = _NO_TOKENS  # the slot's KV now belongs to this request
            seq.reserved = need
            self._budget_used += need
            seq.n_past = reuse
            seq.pending = list(seq.prompt[reuse:])
            self._active.append(seq)
            self.stats["prompt_tokens_total"] += len(seq.prompt)
            self.stats["prompt_tokens_cached_total"] += reuse
            self.stats["prompts_prefilled_total"] += 1
            seq.sink(("admitted", None))
            for sib in seq.siblings:  # their KV comes from the leader's once its prompt is in (_share_prompt)
                sib.slot = min(self._free_slots)
                self._free_slots.remove(sib.slot)
                self._ll.llama_memory_seq_rm(self._mem, sib.slot, -1, -1)
                self._slot_cache[sib.slot] = _NO_TOKENS
                sib.reserved = need
                self._budget_used += need
                sib.copy_of = seq
                self._active.append(sib)
                self.stats["prompt_tokens_shared_total"] += len(seq.prompt)
                sib.sink(("admitted", None))

    def _pick_slot(self, prompt: list[int]) -> tuple[int, int]:
        """(slot, prompt tokens already in its KV stream). At least two prompt tokens are always fed
        (see _prefill for why never one alone); the last one's logits start the answer."""
        if not self.prefix_cache:
            return min(self._free_slots), 0
        best, best_len = min(self._free_slots), 0
        tokens = np.asarray(prompt, dtype=np.int32)
        for slot in sorted(self._free_slots):
            n = _common_prefix(self._slot_cache[slot], tokens)
            if n > best_len:
                best, best_len = slot, n
        return best, max(0, min(best_len, len(prompt) - 2))

    def _release(self, seq: _Seq, keep: bool = True) -> None:
        """Free a sequence's slot and budget; its prompt's KV stays as the slot's prefix cache (with
        `keep` and the cache on), the rest of its cells are freed. Called with the lock held."""
        n_cached = min(seq.n_past, len(seq.prompt)) if keep and self.prefix_cache else 0
        self._ll.llama_memory_seq_rm(self._mem, seq.slot, n_cached, -1)
        self._slot_cache[seq.slot] = np.asarray(seq.prompt[:n_cached], dtype=np.int32)
        self._active.remove(seq)
        self._free_slots.append(seq.slot)
        self._budget_used -= seq.reserved
        seq.slot = -1
        for sib in seq.siblings:  # its prompt never made it in: the choices waiting for it are cancelled
            if sib.copy_of is seq:
                sib.copy_of = None
                sib.cancelled = True

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    for seq in [s for s in self._active if s.cancelled]:
                        self._release(seq)
                        self.stats["cancelled_total"] += 1
                        lag = self.stats["decode_steps_total"] - seq.cancel_step
                        self.stats["cancel_lag_steps_max"] = max(self.stats["cancel_lag_steps_max"], lag)
                    self._admit()
                    while self._running and not self._active and not self._waiting:
                        self._cond.wait()
                    if not self._running:
                        break
                    if not self._active:
                        continue
                    active = list(self._active)
                t0 = time.perf_counter_ns()
                self._step(active)
                self.stats["step_ns_total"] += time.perf_counter_ns() - t0
        except Exception as exc:
            # engine-level (llama_decode, the KV cache): every request gets a 503, never a hang. A
            # request's own failure never gets here: _advance ends that request alone.
            log.exception("llama engine crashed")
            self._fail(f"{type(exc).__name__}: {exc}")
            return
        self._fail("engine stopped")  # close(): whoever still waits gets an answer

    def _fail(self, reason: str) -> None:
        with self._cond:
            if self.error is None:
                self.error = reason
            self._running = False
            doomed = list(self._active) + list(self._waiting)
            self._active.clear()
            self._waiting.clear()
        for seq in doomed:
            seq.sink(("error", BackendUnavailableError(f"local engine failed: {reason}", retry_after_s=1.0)))

    def _drop(self, seq: _Seq, reason: str, error: LocalrouteError | None = None, keep: bool = False) -> None:
        """End one running request with `error` (default: a retryable 503) and free its slot; the
        others go on. `keep`: its KV stream is sound (the failure was not in llama_decode), so the
        prompt stays as the slot's prefix cache."""
        self.stats["failed_total"] += 1
        seq.last_token = -2
        seq.sink(("error", error or BackendUnavailableError(f"local tier: {reason}; retry", retry_after_s=1.0)))
        with self._cond:
            if seq.slot >= 0:
                self._release(seq, keep=keep)  # a failed decode may leave the stream inconsistent

    def _decode(self, n: int) -> int:
        self._batch.n_tokens = n
        rc = int(self._ll.llama_decode(self._ctx, self._batch))
        if rc == 0:
            self.stats["decode_steps_total"] += 1
        elif rc == 1:
            self.stats["kv_full_total"] += 1
        else:
            self.stats["decode_errors_total"] += 1
            log.error("llama_decode returned %d for a batch of %d tokens", rc, n)
        return rc

    def _decode_rows(self, decoding: list[_Seq]) -> None:
        """One token for every generating sequence, in one llama_decode.

        With one KV stream per sequence llama.cpp splits a batch with `split_equal(sequential=True)`:
        a ubatch only takes sequence ids that follow each other (0,1,2,3) in batch order, and every
        break in that run starts another ubatch, i.e. another pass over all the weights. Rows go in
        slot order and slots are handed out lowest first, so the usual step is one ubatch; in
        reversed order (as a LIFO free list produced) 4 rows took 4 passes and batching gained
        nothing (scripts/bench_engine.py). `ubatches_total` counts the runs.
        """
        decoding.sort(key=lambda s: s.slot)
        # (a unified buffer is split with split_simple: one ubatch whatever the order)
        self.stats["ubatches_total"] += 1 if self.kv_unified else _runs(s.slot for s in decoding)
        while decoding:
            for i, seq in enumerate(decoding):
                self._b_token[i] = seq.last_token
                self._b_pos[i] = seq.n_past
                self._b_logits[i] = 1
                self._batch.seq_id[i][0] = seq.slot
            t0 = time.perf_counter_ns()
            rc = self._decode(len(decoding))
            self.stats["decode_rows_ns_total"] += time.perf_counter_ns() - t0
            if rc == 0:
                break
            if rc == 1:  # a sequence's KV stream is full (admission control should prevent it)
                victim = max(decoding, key=lambda s: s.n_past)
                decoding.remove(victim)
                self._drop(victim, "out of KV cache")
                continue
            for seq in decoding:  # other failures may leave part of the batch in the cache
                self._drop(seq, f"decode error {rc}")
            return
        self.stats["batched_rows_total"] += len(decoding)
        self.stats["decode_row_steps_total"] += 1
        now = time.perf_counter()
        for i, seq in enumerate(decoding):
            seq.n_past += 1
            if not seq.cancelled:
                row = np.ctypeslib.as_array(self._ll.llama_get_logits_ith(self._ctx, i), shape=(self.n_vocab,))
                self._advance(seq, row, now)

    def _prefill(self, seq: _Seq, limit: int) -> int:
        """Feed the next chunk of a prompt, alone in its own llama_decode.

        Chunks never share a call with other sequences: with one KV stream per sequence llama.cpp
        splits mixed batches into equal-length pieces per sequence, which gains nothing. Where a
        chunk starts does not change the numbers (a prefix-cache hit starts mid-prompt and gives the
        same logits bit for bit), but a prompt token fed in a chunk of its own does: llama.cpp's
        one-token path gave the next token a logprob 0.119 nats away from the same token fed with
        others (SmolLM2). So no chunk is left with one token, unless the whole prompt is one token.
        """
        take = min(len(seq.pending), limit)
        if len(seq.pending) - take == 1:
            take = take - 1 if take > 2 else take + 1
        self._b_token[:take] = seq.pending[:take]
        self._b_pos[:take] = np.arange(seq.n_past, seq.n_past + take)
        self._b_logits[:take] = 0
        last = take == len(seq.pending)
        self._b_logits[take - 1] = 1 if last else 0
        seq_id = self._batch.seq_id
        for i in range(take):
            seq_id[i][0] = seq.slot
        t0 = time.perf_counter_ns()
        rc = self._decode(take)
        self.stats["prefill_ns_total"] += time.perf_counter_ns() - t0
        if rc != 0:
            self._drop(seq, "out of KV cache" if rc == 1 else f"decode error {rc}")
            return take
        del seq.pending[:take]
        seq.n_past += take
        if last and not seq.cancelled:
            row = np.ctypeslib.as_array(self._ll.llama_get_logits_ith(self._ctx, take - 1), shape=(self.n_vocab,))
            now = time.perf_counter()
            self._advance(seq, row, now)
            if seq.siblings:
                self._share_prompt(seq, row, now)
        return take

    def _share_prompt(self, leader: _Seq, row: np.ndarray, now: float) -> None:
        """The leader's prompt is in its KV stream: copy it to each waiting sibling's sequence and
        give each its first token from the same logits row, sampled by its own sampler.

        With one KV stream per sequence llama.cpp copies the whole stream buffer (cross-stream
        seq_cp takes only the full range; the copy runs at the start of the next llama_decode,
        before that step's rows); with a unified buffer the cells just gain the sibling's id."""
        for sib in leader.siblings:
            if sib.copy_of is not leader:
                continue
            sib.copy_of = None
            if sib.cancelled or sib.slot < 0:
                continue
            self._ll.llama_memory_seq_cp(self._mem, leader.slot, sib.slot, -1, -1)
            self.stats["kv_copies_total"] += 1
            sib.n_past = len(sib.prompt)
            self._advance(sib, row, now)

    def _step(self, active: list[_Seq]) -> None:
        """One decode round: a token for every generating sequence, then some prompt chunks.

        Chunked prefill: while some sequences are generating, newcomers' prompts enter at most
        `prefill_chunk` tokens per round, so a long prompt delays the running streams by one short
        chunk at a time instead of one long one. With nobody generating there is nobody to stall:
        prompts take up to `n_batch` tokens, first come first served, until one of them has its first
        token; from then on it is a running stream too, and the others wait for the next round.
        """
        decoding = [s for s in active if not s.pending and not s.cancelled and s.copy_of is None]
        prefilling = [s for s in active if s.pending and not s.cancelled]
        if decoding:
            with self.outbox.batch():
                self._decode_rows(decoding)
        budget = self.prefill_chunk if decoding else self.n_batch
        for seq in prefilling:
            if budget < 2:  # a one-token chunk changes the numbers (see _prefill)
                break
            with self.outbox.batch():  # the budget is one chunk while anybody generates, else n_batch
                budget -= self._prefill(seq, budget)
            if not seq.pending:  # it generates now: the rest of this round would stall it
                budget = 0
        for seq in active:  # answers finished this round whose labels are to be scored (still in their slot)
            if seq.held is not None:
                self._finish_labels(seq)
        with self._cond:
            for seq in [s for s in active if s.slot >= 0 and s.last_token == -2]:
                self._release(seq)

    def _pick(self, row: np.ndarray, seq: _Seq) -> tuple[int, float, float]:
        """Choose the next token; return (token, its raw logprob, log-sum-exp of the row). The
        choice is made on the row after logit_bias and penalties, the logprob read from the row
        before them (decoding.LogitsAdjuster). The request's RNG is only touched (and so only
        built) when it samples."""
        params = seq.params
        work = self._work
        top = float(row.max())
        np.subtract(row, top, out=work)
        np.exp(work, out=work)
        lse = top + float(np.log(work.sum(dtype=np.float64)))
        choose, choose_top = (row, top) if seq.adjuster is None else (seq.adjuster.apply(row), None)
        if params.temperature <= 0:
            token = int(choose.argmax())
        else:
            token = sample_token(choose, params, seq.rng, choose_top)
        return token, float(row[token]) - lse, lse

    def _top(self, row: np.ndarray, k: int, lse: float) -> tuple[TopLogprob, ...]:
        if k <= 32:  # k argmax passes over a scratch copy: ~15x faster than argpartition at k=5
            scratch = self._top_scratch
            np.copyto(scratch, row)
            picked = []
            for _ in range(k):
                i = int(scratch.argmax())
                picked.append(i)
                scratch[i] = -np.inf
            idx = np.array(picked)
        else:
            idx = np.argpartition(row, -k)[-k:]
            idx = idx[np.argsort(-row[idx], kind="stable")]
        return tuple(
            TopLogprob(
                token=self.piece(int(t)).decode("utf-8", errors="replace"),
                logprob=float(row[t]) - lse,
                bytes=tuple(self.piece(int(t))),
            )
            for t in idx
        )

    def _advance(self, seq: _Seq, row: np.ndarray, now: float) -> None:
        """Pick one request's next token from its logits row and hand it to its DecodeState.
        Whatever raises in here (its sampler, grammar, stop strings, top-k) is that request's
        failure alone: it ends with a GenerationError, its slot is freed, and the engine goes on
        (STYLE 14)."""
        try:
            params = seq.params
            if seq.grammar is not None:
                row = seq.grammar.mask(row)
            token, logprob, lse = self._pick(row, seq)
            eos = bool(self._eog[token]) and not params.ignore_eos
            raw = b""
            top: tuple[TopLogprob, ...] = ()
            if not eos:
                raw = self.piece(token)
                if params.top_logprobs > 0:
                    top = self._top(row, params.top_logprobs, lse)
                seq.last_token = token
                if seq.grammar is not None:
                    if seq.grammar.allowed == 1:
                        seq.forced.append(len(seq.tokens))
                    seq.grammar.accept(token)
                self.stats["tokens_generated_total"] += 1
            if seq.token(token, raw, logprob, top, now, eos) is not None:
                seq.last_token = -2  # released by _step after this round
                self.stats["completed_total"] += 1
        except Exception as exc:
            log.exception("request %s failed in the llama engine; the engine goes on", seq.request_id)
            self._drop(seq, "request failed", error=request_failure(exc), keep=True)

    def _finish_labels(self, seq: _Seq) -> None:
        """Score the labels of a finished answer, then send it. A failure here costs the answer its
        label score, never the answer."""
        gen, seq.held = seq.held, None
        assert gen is not None
        if not seq.cancelled and "early_exit" not in gen.extra:  # stopped early: it escalates, no score needed
            try:
                gen.extra["label"] = self.score_labels(seq, gen)
            except Exception:
                log.exception("request %s: label scoring failed", seq.request_id)
                gen.extra["label"] = {"chosen": None, "logprob": None, "error": "label scoring failed"}
        seq.sink(("done", gen))

    def score_labels(self, seq: _Seq, gen: Generation) -> dict[str, Any]:
        """The answer's label confidence (backends/label_scoring.py), in `seq`'s slot before release."""
        return self._labels.score(seq, gen)

    def close(self) -> None:
        """Stop the engine thread (requests still queued or running get a 503) and free llama.cpp."""
        with self._cond:
            self._running = False
            self._cond.notify_all()
        self._thread.join(timeout=10)
        if not self._thread.is_alive() and self._ctx is not None:
            self._labels.close()
            self._ll.llama_batch_free(self._batch)
            self._ll.llama_free(self._ctx)
            self._ll.llama_model_free(self._model)
            self._ctx = None


class LlamaCppBackend(EngineBridge):
    """A local tier: chat template from the GGUF, requests decoded by the shared engine."""

    engine: LlamaEngine

    kind = "llama_cpp"

    @property
    def uses_gpu(self) -> bool | None:
        return False  # this engine runs on the CPU (n_gpu_layers = 0)

    def __init__(self, name: str, engine: LlamaEngine, queue_timeout_s: float = 30.0) -> None:
        self.name = name
        self.engine = engine
        self.queue_timeout_s = queue_timeout_s
        self._formatter = self._make_formatter()
        self._template_reads_tools = "tools" in (engine.chat_template() or "")

    def _make_formatter(self) -> Any:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = self.engine.chat_template()
        if not template:
            return None
        return Jinja2ChatFormatter(
            template=template,
            eos_token=self.engine.special_text(self.engine.eos),
            bos_token=self.engine.special_text(self.engine.bos),
        )

    def prompt_tokens(self, request: GenerationRequest) -> list[int]:
        """The token ids the model sees for this request."""
        if request.messages is None:
            return self.engine.tokenize(request.prompt or "", add_special=True, parse_special=False)
        messages = [dict(m) for m in request.messages]
        if request.tools and not self._template_reads_tools:
            messages = with_tools_preamble(messages, request.tools, local_parallel_calls(request))
        if self._formatter is None:
            text = "".join(f"{m['role']}: {m.get('content') or ''}\n" for m in messages) + "assistant:"
            return self.engine.tokenize(text, add_special=True, parse_special=False)
        try:
            tools = [{"type": "function", "function": f} for f in request.tools] if self._template_reads_tools else None
            result = self._formatter(messages=messages, tools=tools)
        except Exception as exc:  # jinja raise_exception(): the template rejects these messages
            raise InvalidRequestError(f"messages rejected by the model's chat template: {exc}", param="messages") from None
        return self.engine.tokenize(result.prompt, add_special=not result.added_special, parse_special=True)

    @property
    def context_tokens(self) -> int:
        return self.engine.n_ctx_seq

    def _state(self, request: GenerationRequest, choice: int = 0, **common: Any) -> _Seq:
        from localroute.backends.labels import labels_of

        fmt = request.params.response_format
        labels = () if request.tools or not request.score_labels else labels_of(request.labels, fmt)
        bound = request.escalate_below
        early = (EarlyExit(bound, common["max_new"], request.params.stop)
                 if bound is not None and EarlyExit.supports(bound) else None)
        parallel = local_parallel_calls(request)
        grammar = constraint_for(self.engine, fmt, request.tools, parallel) if fmt or request.tools else None
        return _Seq(**common, model=self.engine.model_path.name, choice=choice,
                    repeat_guard=parallel,
                    adjuster=adjuster_for(request.params, self.engine.n_vocab),
                    grammar=grammar, labels=labels, hold_done=bool(labels), early_exit=early)

    def takes_direct(self, request: GenerationRequest) -> bool:
        return request.params.n == 1 and not request.tools  # else generate() adds to the engine's answer

    async def generate(self, request: GenerationRequest) -> Generation:
        if request.params.n > 1:
            gen = await generate_choices(self.engine, request.params.n, self._choice_jobs(request, want_tokens=False),
                                         self.queue_timeout_s)
        else:
            gen = await super().generate(request)
        return tool_call_answer(gen) if request.tools else gen

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamDelta]:
        """A tool call is streamed whole, as one delta (the server writes OpenAI's tool-call chunk).
        n > 1: backends.llama_choices.stream_choices."""
        if request.tools:
            yield StreamDelta(text="", final=await self.generate(request))
            return
        if request.params.n > 1:
            async for delta in stream_choices(self.engine, request.params.n,
                                              self._choice_jobs(request, want_tokens=True), self.queue_timeout_s):
                yield delta
            return
        async for delta in super().stream(request):
            yield delta

    def _choice_jobs(self, request: GenerationRequest, want_tokens: bool) -> Callable[[list[Sink]], list[_Seq]]:
        """The n jobs of an n > 1 request, choice i's events to sinks[i] (backends.llama_choices runs
        them): the prompt templated and tokenised once, each choice its own sampler state."""
        def make(sinks: list[Sink]) -> list[_Seq]:
            first = cast(_Seq, self._job(request, sinks[0], want_tokens))
            common = {f: getattr(first, f) for f in ("prompt", "params", "max_new", "want_tokens", "submitted_at")}
            return [first] + [self._state(request, choice=i, request_id=f"{first.request_id}/{i}", sink=sinks[i],
                                          **common) for i in range(1, len(sinks))]
        return make

    def health(self) -> dict[str, Any]:
        ok = self.engine.error is None and self.engine._running
        return {"ok": ok, "kind": "llama_cpp", "model": self.engine.model_path.name, "error": self.engine.error,
                **self.engine.load(), "counters": dict(self.engine.stats)}

    async def aclose(self) -> None:
        await asyncio.to_thread(self.engine.close)


def from_settings(tier: TierSettings, settings: Settings) -> LlamaCppBackend:
    from localroute.registry import resolve_model_path

    path = resolve_model_path(tier.model, settings.models_dir)
    engine = LlamaEngine(
        path,
        n_ctx_seq=tier.n_ctx or settings.n_ctx,
        n_parallel=settings.n_parallel,
        n_batch=settings.n_batch,
        n_threads=settings.n_threads,
        max_queue=settings.max_queue,
        prefill_chunk=settings.prefill_chunk,
        kv_unified=settings.kv_unified,
        prefix_cache=settings.prefix_cache,
        extra_buffers=settings.llama_extra_buffers,
    )
    return LlamaCppBackend(tier.name, engine, queue_timeout_s=settings.queue_timeout_s)
