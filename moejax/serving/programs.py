"""The device side of one serving engine: its parameters, its KV cache and the compiled programs that
run on them (decode, extend, mixed, the prefix copy), each compiled once per shape (serving/engine.py
decides which to call and with what). Every program donates the cache and returns the new one, which
this object keeps."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from moejax.inference.generate import put
from moejax.inference.sampling import logprobs_at, sample_rows
from moejax.models import cache as kv_cache
from moejax.models import transformer as model
from moejax.serving.batching import ExtendPlan, sampling_rows
from moejax.serving.prefix import BLOCK
from moejax.serving.request import MAX_LOGPROBS


class Programs:
    """Programs are keyed ("decode",), ("extend", rows, length, every_position), ("mixed", rows, length)
    (rows per batch shard); each is compiled once, by whichever thread asks first (another thread
    asking meanwhile waits for it), so `compile_all` may compile on threads while the engine runs."""

    def __init__(self, rs: model.RunSpec, mesh, params, slots: int, max_len: int, ring: bool = False,
                 pool_blocks: int = 0):
        self.rs, self.mesh, self.params, self.slots = rs, mesh, params, slots
        self.shards = rs.layout.shards("batch", rs.shape)
        self.rs_extend = dataclasses.replace(rs, microbatches=1)  # extend and mixed: one microbatch
        self.cache = kv_cache.init_cache(rs, mesh, slots, max_len, ring)  # ring: sliding layers keep their window
        # what programs are compiled against: the cache's shapes and shardings, never its buffers (which the
        # engine's calls donate and replace, maybe while another thread compiles)
        self._cache_type = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                                        self.cache)
        self._programs: dict[tuple, object] = {}
        self._pending: dict[tuple, threading.Event] = {}  # keys a thread is compiling now
        self._lock = threading.Lock()  # guards the two dicts and compile_s
        self._copy = None  # cache.copy_prefix, built on first use
        # the prefix cache's block pool (serving/prefix.py): pool_blocks rows of BLOCK positions
        self.blocks_per_row = max_len // BLOCK
        self.pool = kv_cache.init_cache(rs, mesh, pool_blocks, BLOCK) if pool_blocks else None
        self._move = None  # cache.move_blocks, built on first use
        self.compile_s = 0.0

    def _put(self, name: str, a: np.ndarray):
        return put(self.mesh, self.rs.layout, name, a)

    def _spec(self, key: tuple):
        """(fn, inputs, every_position) of `_lower` for a program key."""
        if key[0] == "decode":
            fn = model.build(self.rs, self.mesh, "decode")
            return fn, [("tokens", (self.slots, 1)), ("lengths", (self.slots,))], False
        b = key[1] * self.shards
        if key[0] == "extend":
            every_position = key[3]
            fn = model.build(self.rs_extend, self.mesh, "extend", every_position=every_position)
            return fn, [("tokens", (b, key[2]))] + [("lengths", (b,))] * 3, every_position
        if key[0] == "mixed":
            return (model.build(self.rs_extend, self.mesh, "mixed"),
                    [("tokens", (self.slots, 1)), ("lengths", (self.slots,)), ("tokens", (b, key[2]))]
                    + [("lengths", (b,))] * 3, False)
        raise ValueError(key)

    def _padding(self, inputs: list[tuple[str, tuple]], every_position: bool):
        """Inputs of a call whose every row is padding (-1: writes nothing), and its sampling rows."""
        args = [put(self.mesh, self.rs.layout, name, np.full(shape, 0 if name == "tokens" else -1, np.int32))
                for name, shape in inputs]
        n_out = sum(shape[0] for name, shape in inputs if name == "tokens")  # rows sampled
        return args, ((args[0],) if every_position else ()) + sampling_rows([None] * n_out)

    def _lower(self, fn, inputs: list[tuple[str, tuple]], every_position: bool = False):
        """fn(params, *inputs, cache) followed by per-row sampling, lowered as one program (`.compile()`
        makes the executable): (params, *inputs, cache, [targets_BT,] *sampling rows) -> ((tokens [b],
        their logprobs [b], top-K logprobs [b, K], their ids [b, K][, prompt logprobs of targets_BT [b, T],
        top-K [b, T, K], ids [b, T, K]]), cache). K = MAX_LOGPROBS; the logprobs stay on the device unless
        a request asked for them. inputs: (activation name, shape) of each input, compiled with
        padding rows that write nothing (-1). every_position: fn's logits are the chunk's every position
        (`build(..., every_position=True)`), read at targets_BT (each position's next prompt token);
        the sampled token comes from each row's last one. Reads no buffer of the cache (any thread)."""
        n_inputs = len(inputs)

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

        args, rows = self._padding(inputs, every_position)
        return jax.jit(step, donate_argnums=(n_inputs + 1,)).lower(self.params, *args, self._cache_type, *rows)

    def _first_run(self, key: tuple, compiled):
        """Run a program once on padding rows. Only from the thread that owns the cache (the engine's, or
        before it starts), as it donates the cache. Kept from the BPE model (its first call ran ~1.4x
        slower); on the seed model it takes 0.01-0.25 s and leaves the first real call of each shape
        0.4-1.5 s slower all the same (docs/SERVING.md, start-up of the seed config)."""
        _, inputs, every_position = self._spec(key)
        args, rows = self._padding(inputs, every_position)
        _, self.cache = compiled(self.params, *args, self.cache, *rows)
        jax.block_until_ready(self.cache)

    def _claim(self, key: tuple, wait: bool) -> threading.Event | None:
        """A new event when this thread is to compile `key` (it then calls `_done`); None when `key` is
        compiled, or (wait=False) another thread is compiling it. wait=True waits for that thread (and
        claims the key if its compile failed)."""
        while True:
            with self._lock:
                if key in self._programs:
                    return None
                event = self._pending.get(key)
                if event is None:
                    event = self._pending[key] = threading.Event()
                    return event
            if not wait:
                return None
            event.wait()

    def _done(self, key: tuple, event: threading.Event, compiled=None):
        """Publish `key`'s program (None: its compile failed) and wake the threads waiting for it."""
        with self._lock:
            if compiled is not None:
                self._programs[key] = compiled
            del self._pending[key]
        event.set()

    def program(self, key: tuple, first_run: bool = True):
        """The compiled program of `key`, compiled here unless some thread has it (or is compiling it: then
        this waits); first_run: run it once after compiling (only from the thread that owns the cache)."""
        event = self._claim(key, wait=True)
        if event is None:
            return self._programs[key]
        t0, ready = time.perf_counter(), None
        try:
            compiled = self._lower(*self._spec(key)).compile()
            if first_run:
                self._first_run(key, compiled)
            ready = compiled
            with self._lock:
                self.compile_s += time.perf_counter() - t0
        finally:
            self._done(key, event, ready)
        return ready

    def compile_all(self, keys: list[tuple], workers: int, first_run: bool = True) -> float:
        """Compile `keys` (those no other thread has or is compiling): this thread lowers them one after
        another (tracing holds the GIL) while `workers` threads compile them (XLA's compile, or its load
        from the persistent cache, does not hold it); first_run: this thread runs each once when it is
        ready (only before the engine thread starts: it owns the cache from then on). Returns the wall
        seconds (added to compile_s)."""
        t0 = time.perf_counter()
        futures: dict[concurrent.futures.Future, tuple] = {}

        def compile_one(key, event, lowered):
            compiled = None
            try:
                compiled = lowered.compile()
            finally:
                self._done(key, event, compiled)
            return compiled

        def run_ready(wait: bool):
            for f in concurrent.futures.as_completed(list(futures)) if wait else [f for f in futures if f.done()]:
                key, _ = futures.pop(f)
                compiled = f.result()  # a failed compile raises here
                if first_run:
                    self._first_run(key, compiled)

        pool = concurrent.futures.ThreadPoolExecutor(max(1, workers), thread_name_prefix="moejax-compile")
        try:
            for key in keys:
                event = self._claim(key, wait=False)
                if event is None:
                    continue
                try:
                    lowered = self._lower(*self._spec(key))
                except BaseException:
                    self._done(key, event)
                    raise
                futures[pool.submit(compile_one, key, event, lowered)] = (key, event)
                run_ready(wait=False)
            run_ready(wait=True)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            for f, (key, event) in futures.items():
                if f.cancelled():  # never ran: its key is still claimed
                    self._done(key, event)
        dt = time.perf_counter() - t0
        with self._lock:
            self.compile_s += dt
        return dt

    def compiled_decode(self):
        return self.program(("decode",))

    def compiled_extend(self, rows: int, length: int, every_position: bool = False):
        """every_position: the variant with prompt logprobs, compiled when a request first asks
        for them (echo with logprobs); warmup compiles the others only."""
        return self.program(("extend", rows, length, every_position))

    def compiled_mixed(self, rows: int, length: int):
        return self.program(("mixed", rows, length))

    # ---- runs: host arrays in, the step's device outputs back (the cache stays here) ----------
    def decode(self, tokens: np.ndarray, pos: np.ndarray, rows: tuple):
        """One decode step of every slot: last tokens [S, 1], positions [S] (-1: none), sampling rows."""
        out, self.cache = self.compiled_decode()(self.params, self._put("tokens", tokens), self._put("lengths", pos),
                                                 self.cache, *rows)
        return out

    def _extend_inputs(self, plan: ExtendPlan) -> list:
        return [self._put("tokens", plan.tokens), *(self._put("lengths", a) for a in (plan.counts, plan.starts,
                                                                                       plan.cache_rows))]

    def extend(self, plan: ExtendPlan, targets: np.ndarray | None, rows: tuple):
        """The plan's prompt chunks; with `targets` (each position's next prompt token) also their prompt
        logprobs (the every-position variant)."""
        fn = self.compiled_extend(plan.rows, plan.length, targets is not None)
        extra = () if targets is None else (self._put("tokens", targets),)
        out, self.cache = fn(self.params, *self._extend_inputs(plan), self.cache, *extra, *rows)
        return out

    def mixed(self, tokens: np.ndarray, pos: np.ndarray, plan: ExtendPlan, rows: tuple):
        """A decode step of every slot and the plan's prompt chunks as one forward."""
        fn = self.compiled_mixed(plan.rows, plan.length)
        out, self.cache = fn(self.params, self._put("tokens", tokens), self._put("lengths", pos),
                             *self._extend_inputs(plan), self.cache, *rows)
        return out

    def copy_prefix(self, shard: int, src: int, dst: int, tokens: int):
        """On batch shard `shard`, its cache row `dst` gets the first `tokens` positions of its row `src`."""
        vecs = [np.full(self.shards, -1, np.int32) for _ in range(3)]
        for v, x in zip(vecs, (src, dst, tokens)):
            v[shard] = x
        if self._copy is None:
            self._copy = kv_cache.copy_prefix(self.rs, self.mesh)
        self.cache = self._copy(self.cache, *(self._put("lengths", v) for v in vecs))

    def warm_copies(self):
        """Compile and run the prefix copies (both no-ops here: every shard's row is -1), so that the first
        request reusing a prefix does not wait for their compile. From the thread that owns the cache."""
        t0 = time.perf_counter()
        self.copy_prefix(0, -1, -1, 0)
        if self.pool is not None:
            self.move_blocks(0, -1, (), ())
        jax.block_until_ready(self.cache)
        with self._lock:
            self.compile_s += time.perf_counter() - t0

    def move_blocks(self, shard: int, row: int, save: tuple, load: tuple):
        """On batch shard `shard`, its row `row`'s blocks go to the pool ((row block, pool block) pairs
        of `save`), then pool blocks into the row ((pool block, row block) pairs of `load`)."""
        row_q = np.full(self.shards, -1, np.int32)
        row_q[shard] = row
        mats = [np.full((self.shards, self.blocks_per_row), -1, np.int32) for _ in range(4)]
        for pairs, (a, b) in ((save, mats[:2]), (load, mats[2:])):
            for i, (x, y) in enumerate(pairs):
                a[shard, i], b[shard, i] = x, y
        if self._move is None:
            self._move = kv_cache.move_blocks(self.rs, self.mesh, BLOCK)
        self.cache, self.pool = self._move(self.cache, self.pool, self._put("lengths", row_q),
                                           *(self._put("tokens", m) for m in mats))
