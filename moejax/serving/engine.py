"""A continuous-batching engine: one per dp replica, on that replica's (1, pp, tp, ep) devices.

The engine owns S decode slots, each a row of a preallocated KV cache of `max_len` positions
(rows split over the replica's batch shards like any batch). Its thread loops:
  1. take new requests and aborts from its inbox; a waiting request gets a free slot, FIFO: a row
     that holds its prompt's leading blocks (prefix caching, serving/prefix.py: reused in place, or
     copied into a free row of the same batch shard, or from the shard's block pool), else the
     least recently used free row of the batch shard with the fewest busy slots (`static`: only
     when every slot is free, the fixed batches of infer.py, kept for comparison);
  2. one forward (`mixed`): the decode step of every decoding slot and the next chunk (at most
     `chunk` tokens) of prefilling prompts, oldest first, as many per batch shard as fit `budget`
     tokens (rows x padded length), written into their slots' cache rows; a prompt whose last chunk
     ran samples its first token. A long prompt thus delays the others' next token by one forward of
     <= budget tokens, not by its whole prefill; with no prompt prefilling, a `decode` call alone
     (`mixed=False`: an `extend` call, then a `decode` call, as before);
  3. a finished sequence frees its slot at once.
Programs (serving/programs.py, which also holds the KV cache) are the serving program of model.py
(`build("mixed")`, `build("decode")`, `build("extend")`);
chunks come in power-of-two row counts and lengths (>= 16), compiled by `warmup` or on first use.
Each program also returns every row's logprobs (the sampled token's and the top MAX_LOGPROBS),
fetched only for requests that ask; prompt logprobs (echo) come from an extend variant with the
head at every position, compiled when a request first asks for them (such chunks run as an extend
call, then a decode call). `tokens` counts the positions each call computed: prompt, decode, and
the padding of the compiled shapes (also in /metrics).
Nothing crosses replicas: each engine has its own mesh, parameters, cache and thread.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
import traceback

import numpy as np

from moejax.models import cache as kv_cache
from moejax.models import transformer as model
from moejax.inference.generate import fetch
from moejax.serving.batching import MIN_CHUNK, ExtendPlan, buckets, plan_extend, pow2_at_least, sampling_rows
from moejax.serving.programs import Programs
from moejax.serving.prefix import BLOCK, PrefixCache, block_names
from moejax.serving.request import Event, Request

log = logging.getLogger("moejax.serving")


class Engine:
    def __init__(self, rs: model.RunSpec, mesh, params, *, slots: int, max_len: int, chunk: int = 256,
                 budget: int = 1024, index: int = 0, metrics=None, static: bool = False, mixed: bool = True,
                 prefix_cache: bool = True, ring_cache: bool = True, prefix_pool: int | None = None):
        self.rs = rs
        self.index, self.metrics, self.static = index, metrics, static
        self.shards = rs.layout.shards("batch", rs.shape)
        if slots % rs.batch_multiple:
            raise ValueError(f"{slots} slots: need a multiple of {rs.batch_multiple}")
        self.slots, self.max_len = slots, max_len
        self.chunk = max(MIN_CHUNK, pow2_at_least(min(chunk, max_len)))
        self.per_shard = slots // self.shards
        self.budget = max(budget, self.chunk)
        # sliding-window layers keep a ring of their window (ops/attention.py); a ring holds the last
        # window of whatever its row held last, not a reusable prompt prefix: no prefix caching with it
        self.ring = ring_cache and min(kv_cache.slot_lengths(rs.cfg, rs.shape.pp, max_len, True)) < max_len
        caching = prefix_cache and not static and not self.ring
        # the prefix cache's block pool: `prefix_pool` positions (None: as many as the rows hold), in
        # blocks, an equal number per batch shard
        pool = (slots * max_len if prefix_pool is None else prefix_pool) if caching else 0
        self.pool_blocks = pool // BLOCK // self.shards * self.shards
        self.programs = Programs(rs, mesh, params, slots, max_len, self.ring, self.pool_blocks)
        self.eos_id = rs.cfg.eos_token_id
        self.prefix = PrefixCache(slots, self.shards, enabled=caching, pool_blocks=self.pool_blocks)
        self.mixed = mixed and not static
        self.slot_req: list[Request | None] = [None] * slots
        self.waiting: collections.deque[Request] = collections.deque()
        self._inbox: collections.deque = collections.deque()
        self._wake = threading.Condition()
        self._stop = False
        self._closed = False  # the thread has ended (set under _wake)
        self.dead: str | None = None  # the error that stopped the thread
        self.thread = threading.Thread(target=self._loop, name=f"moejax-engine-{index}", daemon=True)
        self.steps = {"extend": 0, "decode": 0, "mixed": 0}
        # tokens by what they were: prompt tokens prefilled, decode tokens, and every token position the
        # calls computed (real ones plus padding: compiled shapes are buckets, decode runs every slot)
        self.tokens = {"prefill": 0, "decode": 0, "computed": 0}

    @property
    def compile_s(self) -> float:
        return self.programs.compile_s

    def extend_shapes(self) -> list[tuple[int, int]]:
        """Every (rows per shard, length) an extend call can take: lengths 16, 64, ... and the chunk;
        rows 1, 4, ... and the most that fit the budget at that length (steps of 4 keep the
        compiled programs few: each takes seconds to compile)."""
        return [(r, t) for t in buckets(MIN_CHUNK, self.chunk) for r in buckets(1, self._max_rows(t))]

    def _max_rows(self, length: int) -> int:
        return max(1, min(self.per_shard, self.budget // length))

    def program_keys(self) -> list[tuple]:
        """The programs warmup compiles (Programs' keys): decode, then a mixed (or extend) program per
        extend shape, smallest rows first (the shapes the first requests are likeliest to take)."""
        shapes = sorted(self.extend_shapes())
        # mixed: an extend without decode rows is a mixed call too
        return [("decode",)] + [("mixed", r, t) if self.mixed else ("extend", r, t, False) for r, t in shapes]

    def warmup(self, background: bool = False, workers: int | None = None) -> float:
        """Compile every program the loop can call (Programs.compile_all: lowered one after another on this
        thread, compiled on `workers` threads, default one per CPU core, at most 4), each then run once;
        returns the seconds spent compiling. Before the engine thread starts.
        background: compile the decode step now and the rest one at a time on a thread while the engine
        serves, without their first run (the engine thread owns the cache); a call whose program is not
        ready compiles it itself, or waits for the thread that is compiling it (docs/SERVING.md)."""
        keys = self.program_keys()
        if workers is None:
            workers = min(4, os.cpu_count() or 1)
        if self.prefix.enabled:
            self.programs.warm_copies()
        if not background:
            self.programs.compile_all(keys, min(workers, len(keys)))
            return self.compile_s
        self.programs.program(keys[0])

        def rest():  # one program at a time: the engine keeps the other core
            t0 = time.perf_counter()
            try:
                for key in keys[1:]:
                    self.programs.program(key, first_run=False)
                log.info("replica %d: the other %d programs compiled in the background in %.1f s", self.index, len(keys) - 1,
                         time.perf_counter() - t0)
            except Exception:  # noqa: BLE001 (the engine compiles what it needs on first use)
                log.error("replica %d: background compile failed: %s", self.index, traceback.format_exc())

        self.warming = threading.Thread(target=rest, name=f"moejax-warmup-{self.index}", daemon=True)
        self.warming.start()
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
        plan = None
        if prefilling:
            plan = plan_extend(self.slot_req, self.shards, self.per_shard, self.chunk, self._max_rows)
        if plan and self.mixed and not any(r.params.prompt_logprobs is not None for r in filter(None, plan.row_req)):
            self._run_mixed(plan)  # one forward: the decode step (if any row decodes) and the prompt chunks
        else:
            if plan:
                self._run_extend(plan)
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
            req = self.waiting[0]
            # prompt logprobs need every prompt position computed: no reuse for them
            req.blocks = block_names(req.prompt) if self.prefix.enabled and req.params.prompt_logprobs is None else []
            free = [i for i, r in enumerate(self.slot_req) if r is None]
            # a row reusing the longest cached prefix, else the least busy shard's least recently used row
            dropped = self.prefix.dropped
            slot, donor, reused, save, load = self.prefix.place(req.blocks, len(req.prompt), free,
                                                                [i for i in free if i // self.per_shard == shard])
            self.waiting.popleft()
            if save or load:  # the row's old blocks into the pool, then the reused ones from it
                self.programs.move_blocks(slot // self.per_shard, slot % self.per_shard, save, load)
            if donor is not None:
                self.programs.copy_prefix(donor // self.per_shard, donor % self.per_shard, slot % self.per_shard,
                                          reused)
            req.slot, req.scheduled, req.prefilled = slot, time.perf_counter(), reused
            self.slot_req[slot] = req
            if self.metrics and self.prefix.enabled:
                self.metrics.prefix(self.index, len(req.prompt), reused, len(save), len(load),
                                    self.prefix.dropped - dropped)
            if self.metrics:
                self.metrics.queued(self.index, req.scheduled - req.arrival)

    def _finish(self, req: Request, reason: str, event: Event | None = None):
        req.finish_reason = reason
        self.slot_req[req.slot] = None
        self.prefix.released(req.slot, time.perf_counter())
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

    def _prefilled(self, plan: ExtendPlan):
        for r in filter(None, plan.row_req):
            r.prefilled += plan.take[r.id]
            self.prefix.prefilled(r.slot, r.blocks, r.prefilled)

    def _account(self, kind: str, prefill: int, decode: int, computed: int):
        """A forward call of `kind`: its real prompt and decode tokens and every position it computed."""
        self.steps[kind] += 1
        for k, n in (("prefill", prefill), ("decode", decode), ("computed", computed)):
            self.tokens[k] += n
        if self.metrics:
            self.metrics.forward(self.index, kind, prefill, decode, computed)

    def _run_extend(self, plan: ExtendPlan):
        """The plan's chunks as one extend call (with the prompt logprobs of rows that ask)."""
        scored = [r if r is not None and r.params.prompt_logprobs is not None else None for r in plan.row_req]
        tgt = None
        if any(scored):  # each position's next prompt token (the prompt's end: none, its row is the token's)
            tgt = np.zeros(plan.tokens.shape, np.int32)
            for i, r in enumerate(scored):
                if r is not None:
                    nxt = r.prompt[r.prefilled + 1: r.prefilled + plan.take[r.id] + 1]
                    tgt[i, :len(nxt)] = nxt
        out = self.programs.extend(plan, tgt, sampling_rows(plan.done))
        self._account("extend", int(plan.counts.sum()), 0, plan.tokens.size)
        if tgt is not None:
            plp, ptop, pids = (fetch(a) for a in out[4:7])
            for i, r in enumerate(scored):
                if r is not None:
                    m = min(plan.take[r.id], len(r.prompt) - 1 - r.prefilled)
                    r.add_prompt_rows(tgt[i, :m], plp[i, :m], pids[i, :m], ptop[i, :m])
        self._prefilled(plan)
        if any(plan.done):
            self._emit_sampled(plan.done, out)

    def _run_mixed(self, plan: ExtendPlan):
        """One forward for the decode step of every decoding slot and the plan's prompt chunks
        (`build("mixed")`): the weights are read once for both."""
        dec, tokens, pos = self._decode_rows()
        rows_out: list[Request | None] = []  # logits rows: per batch shard, its decode rows, then its extend rows
        for shard in range(self.shards):
            rows_out += dec[shard * self.per_shard:(shard + 1) * self.per_shard]
            rows_out += plan.done[shard * plan.rows:(shard + 1) * plan.rows]
        out = self.programs.mixed(tokens, pos, plan, sampling_rows(rows_out))
        self._account("mixed", int(plan.counts.sum()), sum(r is not None for r in dec), plan.tokens.size + self.slots)
        self._prefilled(plan)
        self._emit_sampled(rows_out, out)

    def _decode_rows(self):
        """(the request decoding in each slot or None, its last token [S, 1], its position [S], -1: none)."""
        reqs = [r if r is not None and r.decoding else None for r in self.slot_req]
        tokens = np.zeros((self.slots, 1), np.int32)
        pos = np.full((self.slots,), -1, np.int32)
        for i, r in enumerate(reqs):
            if r is not None:
                tokens[i, 0] = r.generated[-1]
                pos[i] = len(r.prompt) + len(r.generated) - 1
        return reqs, tokens, pos

    def _run_decode(self):
        reqs, tokens, pos = self._decode_rows()
        out = self.programs.decode(tokens, pos, sampling_rows(reqs))
        self._account("decode", 0, sum(r is not None for r in reqs), self.slots)
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
