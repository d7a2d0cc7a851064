"""Label confidence for the llama.cpp engine: every allowed label scored as a continuation of the
context the model had when it wrote the chosen one (backends/labels.py finds the label and builds
the `LabelPlan`; this module feeds it).

Sequential (the default, the reference, and the fallback of the batched path): each
`LabelPlan.feeds()` step is one llama_decode in the slot's own stream, cut back to the context
afterwards; a prefix shared by several labels is fed once.

Batched (`LabelScorer.batched = True`): the slot's KV stream is copied, read-only, into a scoring
context of its own (`llama_state_seq_get_data` / `llama_state_seq_set_data`, same model weights)
with `MAX_SEQS` KV streams, and from there to every stream (`llama_memory_seq_cp`); each branch of
the label trie (root + a label but its last token) runs on its own stream, up to `MAX_SEQS`
branches in one llama_decode (a wave), padded to one length so llama.cpp's equal split makes each
wave one ubatch. The engine's own context is never written: the slot's KV stream, its prefix
cache and the requests decoding beside it are untouched. No cell is shared between branches, so a
shared prefix is fed once per branch: more tokens than the sequential path, in fewer calls.

Why not one unified KV buffer with trie nodes in several sequences (a shared prefix fed once): it
was tried, and logprobs moved by up to 0.17 nats on banking77's 77 labels, against the sequential
method. In a unified buffer a token's cells sit at other cell indices than in a stream of its own,
so the attention sums in another order, and the model's quantised activations amplify the last-bit
difference. With one stream per sequence (as the engine) the numbers are the sequential method's.
Why not spare sequence ids in the engine's own context: its `n_seq_max` is `n_parallel`, every id
a slot, and a cross-stream `llama_memory_seq_cp` overwrites another slot's prefix cache.

Measured (README, scripts/bench_labels.py), batching does not pay on a 2-core CPU: there a
token's compute, not the llama_decode call, is the cost, and banking77's trie takes 568 tokens in
9 calls against 310 in 69, 3.2 s against 2.3 s per request. Hence the default.

Everything here runs on the engine thread.
"""

from __future__ import annotations

import ctypes
import logging
import time
from bisect import bisect_right
from typing import TYPE_CHECKING, Any

import numpy as np

from localroute.backends.labels import LabelPlan, locate_label, normalise

if TYPE_CHECKING:
    from localroute.types import Generation

# LlamaEngine and its _Seq (backends/llama_cpp.py, which imports this module): typed loosely here
LlamaEngine = Any
_Seq = Any

__all__ = ["LabelScorer"]

log = logging.getLogger(__name__)

ROOM = 512  # most batch rows of one scoring llama_decode
MAX_SEQS = 8  # branches scored side by side, a KV stream each; more labels take more waves
OUTPUT_BYTES = 64 << 20  # logits rows one scoring llama_decode may return (n_vocab floats each)

# (prefix, next token) -> log P(next token | context + prefix); prefixes start with the plan's root
Conditionals = dict[tuple[tuple[int, ...], int], float]


class _Unavailable(Exception):
    """The batched path cannot run for this request; the reason goes into the label info."""


class LabelScorer:
    """Scores a finished answer's labels for one LlamaEngine. `batched` True: the batched path
    (the default is the sequential one, see below and README)."""

    def __init__(self, engine: LlamaEngine, max_seqs: int = MAX_SEQS, room: int = ROOM) -> None:
        self.engine = engine
        self.max_seqs = max_seqs
        self.room = room
        # Off by default: measured slower on a 2-core CPU (scripts/bench_labels.py, README), where a
        # token's compute, not the call, is the cost and a stream per branch loses the shared prefixes.
        self.batched = False
        self._ctx: Any = None
        self._mem: Any = None
        self._batch: Any = None
        self._rows = 0
        self._cells = 0
        self._broken: str | None = None  # why the scoring context could not be built (then never retried)

    # ---- the plan ----

    def score(self, seq: _Seq, gen: Generation) -> dict[str, Any]:
        """log P(chosen label) over the allowed labels, from raw logits at the label's position.

        The context is the prompt plus the answer tokens before the one where the label starts; its
        last two tokens are fed again (the last one's logits start every label), then each label's
        tokens, shared label prefixes once (LabelPlan). `raw`: each label's log P(label | context),
        unnormalised (rounded to 1e-6); `method`: batched or sequential, with `fallback` saying why
        a batched scoring ran sequentially."""
        engine = self.engine
        t0 = time.perf_counter_ns()
        info: dict[str, Any] = {"n_labels": len(seq.labels)}
        span = locate_label(gen.text, seq.labels, seq.params.response_format)
        if span is None:
            return info | {"chosen": None, "logprob": None, "cost_s": (time.perf_counter_ns() - t0) / 1e9}
        start_byte = len(gen.text[: span.start].encode("utf-8"))
        ends = seq.token_ends[: len(gen.tokens)]
        i = bisect_right(ends, start_byte)
        lead = bytes(seq.out[(ends[i - 1] if i else 0):start_byte])
        context = [*seq.prompt, *(t.token_id for t in gen.tokens[:i])]
        root = tuple(context[-2:])
        base = len(context) - len(root)
        paths = tuple((label, tuple(engine._llama_tokenize(lead + text.encode("utf-8"), False, False)))
                      for label, text in span.candidates)
        plan = LabelPlan(base=base, root=root, paths=paths)
        longest = max((len(p) for _, p in paths), default=0)
        if base + longest + 1 > engine.kv_cells_per_seq or not all(p for _, p in paths):
            return info | {"chosen": span.label, "logprob": None, "error": "no room to score the labels"}
        children = _children(plan)
        method: dict[str, Any] = {"method": "batched"}
        try:
            if not self.batched or len(plan.feeds()) < 2:  # one feed: one llama_decode either way, no copy
                raise _Unavailable("")
            cond, fed, calls = self._batched(plan, seq.slot, children)
        except _Unavailable as why:
            method = {"method": "sequential"} | ({"fallback": str(why)} if str(why) else {})
            scored = self._sequential(plan, seq, children)
            if isinstance(scored, str):
                return info | {"chosen": span.label, "logprob": None, "error": scored, **method}
            cond, fed, calls = scored
        raw: dict[str, float] = {}
        for label, path in paths:
            full = (*root, *path)
            raw[label] = sum(cond[(full[:d], full[d])] for d in range(len(root), len(full)))
        return info | {
            "raw": {k: round(v, 6) for k, v in raw.items()}, "chosen": span.label,
            "logprob": normalise(raw, span.label), "tokens_fed": fed, "decode_calls": calls, **method,
            "cost_s": round((time.perf_counter_ns() - t0) / 1e9, 6)}

    # ---- sequential: in the slot's own stream ----

    def _sequential(self, plan: LabelPlan, seq: _Seq,
                    children: dict[tuple[int, ...], set[int]]) -> tuple[Conditionals, int, int] | str:
        """Each feed its own llama_decode in the slot's stream; the stream is cut back to the
        context afterwards, and the slot keeps only what it kept before. A str: the error."""
        engine, ll = self.engine, self.engine._ll
        cond: Conditionals = {}
        fed = calls = 0
        base = plan.base
        try:
            for keep, need in plan.feeds():
                toks = need[keep:]
                ll.llama_memory_seq_rm(engine._mem, seq.slot, base + keep, -1)
                for start in range(0, len(toks), engine.n_batch):
                    chunk = toks[start:start + engine.n_batch]
                    n = len(chunk)
                    engine._b_token[:n] = chunk
                    engine._b_pos[:n] = np.arange(base + keep + start, base + keep + start + n)
                    engine._b_logits[:n] = 1
                    for j in range(n):
                        engine._batch.seq_id[j][0] = seq.slot
                    rc = engine._decode(n)
                    calls += 1
                    if rc != 0:
                        return f"decode error {rc}"
                    fed += n
                    for j in range(n):
                        prefix = need[: keep + start + j + 1]
                        if kids := children.get(prefix):
                            _read_row(cond, ll.llama_get_logits_ith(engine._ctx, j), engine.n_vocab, prefix, kids)
        finally:
            ll.llama_memory_seq_rm(engine._mem, seq.slot, base, -1)
            seq.n_past = min(seq.n_past, base)
        return cond, fed, calls

    # ---- batched: copies of the stream in the scoring context ----

    def _batched(self, plan: LabelPlan, slot: int,
                 children: dict[tuple[int, ...], set[int]]) -> tuple[Conditionals, int, int]:
        ll = self.engine._ll
        if self.engine.kv_unified:
            # one stream holds every slot: llama.cpp (0.3.36) cannot load a slot > 0's state into
            # a stream of its own (measured), and slot 0's would score apart from the others
            raise _Unavailable("a unified KV cache (kv_unified): the slot's KV is not copied")
        chains = sorted(_chains(plan), key=len)
        # room for the slot's whole stream, not only the context: its state is copied whole, answer
        # tokens after the label included, and a stream with fewer cells cannot load it
        held = int(ll.llama_memory_seq_pos_max(self.engine._mem, slot)) + 1
        self._open(max(plan.base + len(chains[-1]), held))
        if len(chains[-1]) > self._rows:
            raise _Unavailable("a label is longer than one scoring batch")
        waves = _waves(chains, self.max_seqs, self._rows)
        try:
            self._load(slot, plan.base, max(len(w) for w in waves))
            cond: Conditionals = {}
            fed = calls = 0
            for wave in waves:
                rows = self._fill(wave, plan.base, children)
                rc = int(ll.llama_decode(self._ctx, self._batch))
                calls += 1
                if rc != 0:
                    raise _Unavailable(f"scoring decode error {rc}")
                for j, prefix in rows:
                    _read_row(cond, ll.llama_get_logits_ith(self._ctx, j), self.engine.n_vocab, prefix, children[prefix])
                fed += int(self._batch.n_tokens)
                for s in range(len(wave)):  # back to the context for the next wave
                    ll.llama_memory_seq_rm(self._mem, s, plan.base, -1)
            return cond, fed, calls
        finally:
            ll.llama_memory_clear(self._mem, True)

    def _open(self, cells: int) -> None:
        """The scoring context: `max_seqs` KV streams of at least `cells` cells (rebuilt larger when
        a slot's stream outgrows it: up to `max_seqs` times a slot's KV memory), one stream per
        sequence as the engine's, so each branch's
        attention runs over its own stream exactly as in the slot."""
        engine, ll = self.engine, self.engine._ll
        if self._ctx is not None and self._cells >= cells:
            return
        if self._broken is not None:
            raise _Unavailable(self._broken)
        self.close()
        self._cells = -(-cells // 256) * 256
        self._rows = max(4, min(self.room, OUTPUT_BYTES // (4 * engine.n_vocab)))
        cparams = ll.llama_context_default_params()
        cparams.n_ctx = self._cells * self.max_seqs
        cparams.n_batch = self._rows
        cparams.n_ubatch = self._rows
        cparams.n_seq_max = self.max_seqs
        cparams.n_threads = engine.n_threads
        cparams.n_threads_batch = engine.n_threads
        cparams.kv_unified = False
        cparams.no_perf = True
        cparams.flash_attn_type = 0  # as the engine's: the stream's V layout must match
        ctx = ll.llama_init_from_model(engine._model, cparams)
        if not ctx:
            self._broken = "the scoring context could not be created"
            log.warning("%s: %s; labels are scored one feed at a time", engine.model_path.name, self._broken)
            raise _Unavailable(self._broken)
        self._ctx = ctx
        self._mem = ll.llama_get_memory(ctx)
        self._batch = ll.llama_batch_init(self._rows, 0, 1)

    def _load(self, slot: int, base: int, n_seqs: int) -> None:
        """The slot's stream up to `base` into sequences 0..n_seqs-1 of the scoring context."""
        engine, ll = self.engine, self.engine._ll
        size = int(ll.llama_state_seq_get_size(engine._ctx, slot))
        buf = (ctypes.c_uint8 * size)()
        written = int(ll.llama_state_seq_get_data(engine._ctx, buf, size, slot))
        state = ctypes.string_at(buf, written) if written > 0 else b""
        data = _restream(state, slot, engine.n_parallel, self.max_seqs)
        if data is None:
            raise _Unavailable("this model's KV state cannot be moved to the scoring context")
        src = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        if int(ll.llama_state_seq_set_data(self._ctx, src, len(data), 0)) != len(data):
            raise _Unavailable("the scoring context could not load the slot's KV")
        ll.llama_memory_seq_rm(self._mem, 0, base, -1)
        if int(ll.llama_memory_seq_pos_max(self._mem, 0)) != base - 1:
            raise _Unavailable("the slot's KV does not hold the context")
        for s in range(1, n_seqs):  # a whole-stream copy, made by the next llama_decode
            ll.llama_memory_seq_cp(self._mem, 0, s, -1, -1)

    def _fill(self, wave: list[tuple[int, ...]], base: int,
              children: dict[tuple[int, ...], set[int]]) -> list[tuple[int, tuple[int, ...]]]:
        """One wave's batch: chain s on sequence s from position `base`, every chain padded to the
        longest with its last token (rows nobody reads, after everything that is read), so
        llama.cpp's equal split makes the wave one ubatch. Returns (batch row, prefix) to read."""
        batch = self._batch
        width = len(wave[-1])
        rows: list[tuple[int, tuple[int, ...]]] = []
        j = 0
        for s, chain in enumerate(wave):
            for d in range(width):
                batch.token[j] = chain[min(d, len(chain) - 1)]
                batch.pos[j] = base + d
                batch.n_seq_id[j] = 1
                batch.seq_id[j][0] = s
                prefix = chain[: d + 1]
                wanted = d < len(chain) and prefix in children
                batch.logits[j] = wanted
                if wanted:
                    rows.append((j, prefix))
                j += 1
        batch.n_tokens = j
        return rows

    def close(self) -> None:
        if self._ctx is not None:
            self.engine._ll.llama_batch_free(self._batch)
            self.engine._ll.llama_free(self._ctx)
            self._ctx = None


def _restream(state: bytes, slot: int, n_src: int, n_dst: int) -> bytes | None:
    """A sequence's KV state from a cache of `n_src` streams, rewritten for one of `n_dst`
    streams; None where the layout is not the plain one.

    llama.cpp writes a sequence's state as a short header, the stream count, then per stream a
    cell count and that stream's cells: every stream but the sequence's own is an empty count (0),
    and reading it back puts the one non-empty stream into the target sequence's stream. It
    refuses a state whose stream count is not its own ("n_stream mismatch"), so the empty counts
    are rewritten. A cache of another kind (sliding-window pairs, recurrent state) writes more
    sections; those are not rewritten, and llama_state_seq_set_data checks what it reads."""
    if not 0 <= slot < n_src:
        return None
    tail = 4 * (n_src - 1 - slot)
    for at in (0, 4, 8, 12, 16):  # the header before the stream count (8 bytes in llama.cpp 0.3.36's)
        head = at + 4 + 4 * slot
        if len(state) < head + 4 + tail or int.from_bytes(state[at:at + 4], "little") != n_src:
            continue
        if any(state[at + 4:head]) or (tail and any(state[len(state) - tail:])):
            continue
        return state[:at] + n_dst.to_bytes(4, "little") + state[head:len(state) - tail] + bytes(4 * (n_dst - 1))
    return None


def _children(plan: LabelPlan) -> dict[tuple[int, ...], set[int]]:
    """Trie prefix -> the label tokens that follow it (whose logprob its logits row gives)."""
    children: dict[tuple[int, ...], set[int]] = {}
    for _, path in plan.paths:
        full = (*plan.root, *path)
        for d in range(len(plan.root), len(full)):
            children.setdefault(full[:d], set()).add(full[d])
    return children


def _chains(plan: LabelPlan) -> list[tuple[int, ...]]:
    """The token runs to feed (root + each label but its last token) that are no other's prefix,
    sorted: one sequence each."""
    needs = sorted({(*plan.root, *path[:-1]) for _, path in plan.paths})
    return [c for i, c in enumerate(needs) if i + 1 == len(needs) or needs[i + 1][: len(c)] != c]


def _waves(chains: list[tuple[int, ...]], max_seqs: int, rows: int) -> list[list[tuple[int, ...]]]:
    """Chains (sorted by length) in waves of at most `max_seqs`, each wave's chains padded to its
    longest within `rows` batch rows."""
    waves: list[list[tuple[int, ...]]] = []
    for chain in chains:
        if waves and len(waves[-1]) < max_seqs and (len(waves[-1]) + 1) * len(chain) <= rows:
            waves[-1].append(chain)
        else:
            waves.append([chain])
    return waves


def _read_row(cond: Conditionals, ptr: Any, n_vocab: int, prefix: tuple[int, ...], kids: set[int]) -> None:
    row = np.ctypeslib.as_array(ptr, shape=(n_vocab,))
    top = float(row.max())
    lse = top + float(np.log(np.exp(row - top, dtype=np.float64).sum()))
    for k in kids:
        cond[(prefix, k)] = float(row[k]) - lse
