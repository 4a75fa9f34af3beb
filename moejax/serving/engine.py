"""A continuous-batching engine: one per dp replica, on that replica's (1, pp, tp, ep) devices.

The engine owns S decode slots, each a row of a preallocated KV cache of `max_len` positions
(rows split over the replica's batch shards like any batch). Its thread loops:
  1. take new requests and aborts from its inbox; a waiting request gets a free slot (on the
     batch shard with the fewest busy slots), FIFO (`static`: only when every slot is free, the
     fixed batches of infer.py, kept for comparison);
  2. prefill: one `extend` call runs the next chunk (at most `chunk` tokens) of prefilling
     prompts, oldest first, as many per batch shard as fit `budget` tokens (rows x padded length)
     into their slots' cache rows; a prompt whose last chunk ran samples its first token. A long
     prompt thus delays the others' next token by one call of <= budget tokens, not by its whole
     prefill;
  3. decode: one `decode` call advances every decoding slot by one token (positions per slot);
     a finished sequence frees its slot at once.
Programs are the serving program of model.py (`build("extend")`, `build("decode")`); extend
batches come in power-of-two row counts and lengths (>= 16), compiled on first use or by `warmup`.
Each program also returns every row's logprobs (the sampled token's and the top MAX_LOGPROBS),
fetched only for requests that ask; prompt logprobs (echo) come from an extend variant with the
head at every position, compiled when a request first asks for them.
Nothing crosses replicas: each engine has its own mesh, parameters, cache and thread.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from moejax.models import transformer as model
from moejax.inference.generate import fetch, put
from moejax.inference.sampling import logprobs_at, sample_rows
from moejax.serving.request import MAX_LOGPROBS, Event, Request

log = logging.getLogger("moejax.serving")
MIN_CHUNK = 16


def pow2_at_least(n: int, lo: int = 1) -> int:
    b = lo
    while b < n:
        b *= 2
    return b


def buckets(lo: int, hi: int) -> list[int]:
    """lo, 4 lo, 16 lo, ... below hi, then hi."""
    out = []
    while lo < hi:
        out.append(lo)
        lo *= 4
    return out + [hi]


def bucket(n: int, lo: int, hi: int) -> int:
    """The smallest of buckets(lo, hi) >= n (hi if none)."""
    return next((b for b in buckets(lo, hi) if b >= n), hi)


class Engine:
    def __init__(self, rs: model.RunSpec, mesh, params, *, slots: int, max_len: int, chunk: int = 256,
                 budget: int = 1024, index: int = 0, metrics=None, static: bool = False):
        self.rs, self.mesh, self.params = rs, mesh, params
        self.index, self.metrics, self.static = index, metrics, static
        self.shards = rs.layout.shards("batch", rs.shape)
        if slots % rs.batch_multiple:
            raise ValueError(f"{slots} slots: need a multiple of {rs.batch_multiple}")
        self.slots, self.max_len = slots, max_len
        self.chunk = max(MIN_CHUNK, pow2_at_least(min(chunk, max_len)))
        self.per_shard = slots // self.shards
        self.budget = max(budget, self.chunk)
        self.rs_extend = dataclasses.replace(rs, microbatches=1)
        self.cache = model.init_cache(rs, mesh, slots, max_len)
        self.eos_id = rs.cfg.eos_token_id
        self._decode = None
        self._extend: dict[tuple[int, int, bool], object] = {}
        self.compile_s = 0.0
        self.slot_req: list[Request | None] = [None] * slots
        self.waiting: collections.deque[Request] = collections.deque()
        self._inbox: collections.deque = collections.deque()
        self._wake = threading.Condition()
        self._stop = False
        self._closed = False  # the thread has ended (set under _wake)
        self.dead: str | None = None  # the error that stopped the thread
        self.thread = threading.Thread(target=self._loop, name=f"moejax-engine-{index}", daemon=True)
        self.steps = {"extend": 0, "decode": 0}

    # ---- compiled programs --------------------------------------------------------------------
    def _compile(self, fn, n_inputs: int, b: int, length: int, every_position: bool = False):
        """fn(params, *inputs, cache) followed by per-row sampling, as one executable:
        (params, *inputs, cache, [targets_BT,] *sampling rows) -> ((tokens [b], their logprobs [b],
        top-K logprobs [b, K], their ids [b, K][, prompt logprobs of targets_BT [b, T], top-K
        [b, T, K], ids [b, T, K]]), cache). K = MAX_LOGPROBS; the logprobs stay on the device unless
        a request asked for them. every_position: fn's logits are the chunk's every position
        (`build(..., every_position=True)`), read at targets_BT (each position's next prompt token);
        the sampled token comes from each row's last one."""
        def step(params, *args):
            inputs, cache, rest = args[:n_inputs], args[n_inputs], args[n_inputs + 1:]
            logits, cache, _ = fn(params, *inputs, cache)
            prompt = ()
            if every_position:
                targets, rest = rest[0], rest[1:]
                prompt = logprobs_at(logits, targets, MAX_LOGPROBS)
                last = jnp.maximum(inputs[1], 1) - 1  # extend's counts
                logits = logits[jnp.arange(logits.shape[0]), last]
            tokens = sample_rows(logits, *rest)
            return (tokens, *logprobs_at(logits, tokens, MAX_LOGPROBS), *prompt), cache

        lay = self.rs.layout
        tok = put(self.mesh, lay, "tokens", np.zeros((b, length), np.int32))
        vec = put(self.mesh, lay, "lengths", np.full((b,), -1, np.int32))  # every row padding: writes nothing
        rows = ((tok,) if every_position else ()) + _sampling_rows([None] * b)
        t0 = time.perf_counter()
        compiled = jax.jit(step, donate_argnums=(n_inputs + 1,)).lower(
            self.params, tok, *[vec] * (n_inputs - 1), self.cache, *rows).compile()
        # a first run: XLA:CPU's first call of a program ran ~1.4x slower than later ones
        _, self.cache = compiled(self.params, tok, *[vec] * (n_inputs - 1), self.cache, *rows)
        jax.block_until_ready(self.cache)
        self.compile_s += time.perf_counter() - t0
        return compiled

    def _compiled_decode(self):
        if self._decode is None:
            self._decode = self._compile(model.build(self.rs, self.mesh, "decode"), 2, self.slots, 1)
        return self._decode

    def _compiled_extend(self, rows: int, length: int, every_position: bool = False):
        """every_position: the variant with prompt logprobs, compiled when a request first asks
        for them (echo with logprobs); warmup compiles the others only."""
        key = (rows, length, every_position)
        if key not in self._extend:
            fn = model.build(self.rs_extend, self.mesh, "extend", every_position=every_position)
            self._extend[key] = self._compile(fn, 4, rows * self.shards, length, every_position)
        return self._extend[key]

    def extend_shapes(self) -> list[tuple[int, int]]:
        """Every (rows per shard, length) an extend call can take: lengths 16, 64, ... and the chunk;
        rows 1, 4, ... and the most that fit the budget at that length (steps of 4 keep the
        compiled programs few: each takes seconds to compile)."""
        return [(r, t) for t in buckets(MIN_CHUNK, self.chunk) for r in buckets(1, self._max_rows(t))]

    def _max_rows(self, length: int) -> int:
        return max(1, min(self.per_shard, self.budget // length))

    def warmup(self) -> float:
        """Compile every program the loop can call; returns the seconds spent compiling."""
        self._compiled_decode()
        for r, t in self.extend_shapes():
            self._compiled_extend(r, t)
        return self.compile_s

    # ---- the API side (any thread) --------------------------------------------------------------
    def start(self):
        self.thread.start()

    def load(self) -> int:
        """Requests this engine holds (running + waiting + not yet taken): the router's measure."""
        return (sum(r is not None for r in self.slot_req) + len(self.waiting)
                + sum(kind == "add" for kind, _ in list(self._inbox)))

    def waiting_count(self) -> int:
        """Requests held beyond the slots (those waiting once the inbox is taken)."""
        return max(0, self.load() - self.slots)

    def submit(self, req: Request):
        self._post(("add", req))

    def abort(self, req: Request):
        self._post(("abort", req))

    def stop(self):
        self._stop = True
        self._post(("stop", None))

    def _post(self, item):
        with self._wake:
            if not self._closed:
                self._inbox.append(item)
                self._wake.notify()
                return
        kind, req = item
        if kind == "add":  # the thread has ended: nothing will serve it
            req.emit(Event([], "", "abort", error=self.dead or "the server is shutting down"))

    # ---- the engine thread ------------------------------------------------------------------
    def _loop(self):
        try:
            while not self._stop:
                if not self.step():
                    with self._wake:
                        if not self._inbox and not self._stop:
                            self._wake.wait(timeout=0.5)
        except Exception as e:  # the engine is dead: say so to every request it holds
            self.dead = f"{type(e).__name__}: {e}"
            log.error("engine %d stopped: %s", self.index, traceback.format_exc())
        reason = self.dead or "the server is shutting down"
        with self._wake:  # from here on _post answers new requests itself
            self._closed = True
            inbox, self._inbox = list(self._inbox), collections.deque()
        for req in [r for r in self.slot_req if r is not None] + list(self.waiting) + \
                [r for kind, r in inbox if kind == "add"]:
            req.emit(Event([], "", "abort", error=reason))
        self._publish()

    def step(self) -> bool:
        """One iteration; False when there was nothing to do."""
        self._take_inbox()
        self._admit()
        busy = prefilling = any(r is not None and r.prefilled < len(r.prompt) for r in self.slot_req)
        if prefilling:
            self._run_extend()
        # static batching decodes a batch once all of it is prefilled, as infer.py does
        if not (self.static and prefilling) and any(r is not None and r.decoding for r in self.slot_req):
            self._run_decode()
            busy = True
        self._publish()
        return busy

    def _take_inbox(self):
        with self._wake:
            items, self._inbox = list(self._inbox), collections.deque()
        for kind, req in items:
            if kind == "add":
                self.waiting.append(req)
            elif kind == "abort":
                if req in self.waiting:  # aborted before it had a slot: counted like any abort
                    self.waiting.remove(req)
                    req.finish_reason = "abort"
                    req.emit(Event([], "", "abort"))
                    if self.metrics:
                        self.metrics.finished(self.index, req)
                elif req.slot is not None and self.slot_req[req.slot] is req:
                    self._finish(req, "abort")

    def _admit(self):
        if self.static and any(r is not None for r in self.slot_req):
            return  # static batching: a new batch only once the last one has finished
        while self.waiting:
            busy = [sum(self.slot_req[s * self.per_shard + i] is not None for i in range(self.per_shard))
                    for s in range(self.shards)]
            shard = int(np.argmin(busy))
            if busy[shard] == self.per_shard:
                return
            base = shard * self.per_shard
            slot = next(base + i for i in range(self.per_shard) if self.slot_req[base + i] is None)
            req = self.waiting.popleft()
            req.slot, req.scheduled = slot, time.perf_counter()
            self.slot_req[slot] = req
            if self.metrics:
                self.metrics.queued(self.index, req.scheduled - req.arrival)

    def _finish(self, req: Request, reason: str, event: Event | None = None):
        req.finish_reason = reason
        self.slot_req[req.slot] = None
        if event is None:
            event = Event([], req.text.flush() if reason != "abort" else "", reason)
        req.emit(event)
        if self.metrics:
            self.metrics.finished(self.index, req)

    def _emit_token(self, req: Request, token: int, row: tuple | None = None):
        event = req.accept(token, self.eos_id, row)
        if self.metrics:
            self.metrics.token(self.index, req)
        if req.finish_reason:
            self._finish(req, req.finish_reason, event)
        else:
            req.emit(event)

    def _run_extend(self):
        """The next prompt chunk of the oldest prefilling slots, as many per batch shard as fit the
        budget (rows x the longest chunk, both rounded up to a compiled bucket)."""
        picked: list[list[Request]] = [[] for _ in range(self.shards)]
        order = sorted((r for r in self.slot_req if r is not None and r.prefilled < len(r.prompt)),
                       key=lambda r: r.scheduled)
        take, length, rows = {}, 0, 0
        for r in order:
            shard = r.slot // self.per_shard
            n = min(self.chunk, len(r.prompt) - r.prefilled)
            t = max(length, bucket(n, MIN_CHUNK, self.chunk))
            k = max(rows, len(picked[shard]) + 1)
            if take and k > self._max_rows(t):
                continue  # a later, shorter chunk may still fit
            picked[shard].append(r)
            take[r.id], length, rows = n, t, k
        rows = bucket(rows, 1, self._max_rows(length))
        b = rows * self.shards
        tokens = np.zeros((b, length), np.int32)
        counts, starts, cache_rows = np.zeros(b, np.int32), np.zeros(b, np.int32), np.zeros(b, np.int32)
        row_req: list[Request | None] = [None] * b
        for shard, reqs in enumerate(picked):
            for k, r in enumerate(reqs):
                i, n = shard * rows + k, take[r.id]
                tokens[i, :n] = r.prompt[r.prefilled: r.prefilled + n]
                counts[i], starts[i], cache_rows[i] = n, r.prefilled, r.slot % self.per_shard
                row_req[i] = r
        lay = self.rs.layout
        scored = [r if r is not None and r.params.prompt_logprobs is not None else None for r in row_req]
        targets = ()
        if any(scored):  # each position's next prompt token (the prompt's end: none, its row is the token's)
            tgt = np.zeros((b, length), np.int32)
            for i, r in enumerate(scored):
                if r is not None:
                    nxt = r.prompt[r.prefilled + 1: r.prefilled + take[r.id] + 1]
                    tgt[i, :len(nxt)] = nxt
            targets = (put(self.mesh, lay, "tokens", tgt),)
        fn = self._compiled_extend(rows, length, bool(targets))
        done = [r if r is not None and r.prefilled + take[r.id] == len(r.prompt) else None for r in row_req]
        out, self.cache = fn(self.params, put(self.mesh, lay, "tokens", tokens),
                             *(put(self.mesh, lay, "lengths", a) for a in (counts, starts, cache_rows)),
                             self.cache, *targets, *_sampling_rows(done))
        self.steps["extend"] += 1
        if targets:
            plp, ptop, pids = (fetch(a) for a in out[4:7])
            for i, r in enumerate(scored):
                if r is not None:
                    m = min(take[r.id], len(r.prompt) - 1 - r.prefilled)
                    r.add_prompt_rows(tgt[i, :m], plp[i, :m], pids[i, :m], ptop[i, :m])
        for r in filter(None, row_req):
            r.prefilled += take[r.id]
        if any(done):
            self._emit_sampled(done, out)

    def _run_decode(self):
        reqs = [r if r is not None and r.decoding else None for r in self.slot_req]
        tokens = np.zeros((self.slots, 1), np.int32)
        pos = np.full((self.slots,), -1, np.int32)
        for i, r in enumerate(reqs):
            if r is not None:
                tokens[i, 0] = r.generated[-1]
                pos[i] = len(r.prompt) + len(r.generated) - 1
        lay = self.rs.layout
        out, self.cache = self._compiled_decode()(
            self.params, put(self.mesh, lay, "tokens", tokens), put(self.mesh, lay, "lengths", pos), self.cache,
            *_sampling_rows(reqs))
        self.steps["decode"] += 1
        self._emit_sampled(reqs, out)

    def _emit_sampled(self, reqs: list[Request | None], out):
        """Each request's sampled token (out[0]), with its logprob row when it asked for one (the
        logprobs are fetched only then); a request scoring its prompt only (max_tokens 0) ends."""
        sampled = fetch(out[0])
        rows = None
        if any(r is not None and r.params.logprobs is not None for r in reqs):
            lp, top, ids = (fetch(a) for a in out[1:4])
            rows = [(lp[i], ids[i], top[i]) for i in range(len(reqs))]
        for i, r in enumerate(reqs):
            if r is None:
                continue
            if r.params.max_tokens == 0:
                self._finish(r, "length", r.score_only())
            else:
                self._emit_token(r, int(sampled[i]), rows[i] if rows else None)

    def _publish(self):
        if self.metrics:
            running = sum(r is not None for r in self.slot_req)
            self.metrics.engine_state(self.index, running, len(self.waiting), running / self.slots)


def _sampling_rows(reqs: list[Request | None]) -> tuple[np.ndarray, ...]:
    """sample_rows' per-row inputs (seed, tokens drawn so far, temperature, top_k, top_p); rows
    without a request are greedy and ignored."""
    n = len(reqs)
    seeds, counts = np.zeros(n, np.uint32), np.zeros(n, np.int32)
    temps, top_k, top_p = np.zeros(n, np.float32), np.zeros(n, np.int32), np.ones(n, np.float32)
    for i, r in enumerate(reqs):
        if r is not None:
            p = r.params
            seeds[i], counts[i] = p.seed % 2**32, len(r.generated)
            temps[i], top_k[i], top_p[i] = p.temperature, min(p.top_k, 2**31 - 1), p.top_p
    return seeds, counts, temps, top_k, top_p
