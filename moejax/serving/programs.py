"""The device side of one serving engine: its parameters, its KV cache and the compiled programs that
run on them (decode, extend, mixed, the prefix copy), each compiled once per shape (serving/engine.py
decides which to call and with what). Every program donates the cache and returns the new one, which
this object keeps."""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from moejax.inference.generate import put
from moejax.inference.sampling import logprobs_at, sample_rows
from moejax.models import transformer as model
from moejax.serving.batching import ExtendPlan, sampling_rows
from moejax.serving.request import MAX_LOGPROBS


class Programs:
    def __init__(self, rs: model.RunSpec, mesh, params, slots: int, max_len: int):
        self.rs, self.mesh, self.params, self.slots = rs, mesh, params, slots
        self.shards = rs.layout.shards("batch", rs.shape)
        self.rs_extend = dataclasses.replace(rs, microbatches=1)  # extend and mixed: one microbatch
        self.cache = model.init_cache(rs, mesh, slots, max_len)
        self._decode = None
        self._extend: dict[tuple[int, int, bool], object] = {}
        self._mixed: dict[tuple[int, int], object] = {}
        self._copy = None  # model.copy_prefix, built on first use
        self.compile_s = 0.0

    def _put(self, name: str, a: np.ndarray):
        return put(self.mesh, self.rs.layout, name, a)

    def _compile(self, fn, inputs: list[tuple[str, tuple]], every_position: bool = False):
        """fn(params, *inputs, cache) followed by per-row sampling, as one executable:
        (params, *inputs, cache, [targets_BT,] *sampling rows) -> ((tokens [b], their logprobs [b],
        top-K logprobs [b, K], their ids [b, K][, prompt logprobs of targets_BT [b, T], top-K
        [b, T, K], ids [b, T, K]]), cache). K = MAX_LOGPROBS; the logprobs stay on the device unless
        a request asked for them. inputs: (activation name, shape) of each input, compiled with
        padding rows that write nothing (-1). every_position: fn's logits are the chunk's every position
        (`build(..., every_position=True)`), read at targets_BT (each position's next prompt token);
        the sampled token comes from each row's last one."""
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

        lay = self.rs.layout
        args = [put(self.mesh, lay, name, np.full(shape, 0 if name == "tokens" else -1, np.int32))
                for name, shape in inputs]
        n_out = sum(shape[0] for name, shape in inputs if name == "tokens")  # rows sampled
        rows = ((args[0],) if every_position else ()) + sampling_rows([None] * n_out)
        t0 = time.perf_counter()
        compiled = jax.jit(step, donate_argnums=(n_inputs + 1,)).lower(self.params, *args, self.cache, *rows).compile()
        # a first run: XLA:CPU's first call of a program ran ~1.4x slower than later ones
        _, self.cache = compiled(self.params, *args, self.cache, *rows)
        jax.block_until_ready(self.cache)
        self.compile_s += time.perf_counter() - t0
        return compiled

    def compiled_decode(self):
        if self._decode is None:
            self._decode = self._compile(model.build(self.rs, self.mesh, "decode"),
                                         [("tokens", (self.slots, 1)), ("lengths", (self.slots,))])
        return self._decode

    def compiled_extend(self, rows: int, length: int, every_position: bool = False):
        """every_position: the variant with prompt logprobs, compiled when a request first asks
        for them (echo with logprobs); warmup compiles the others only."""
        key = (rows, length, every_position)
        if key not in self._extend:
            fn = model.build(self.rs_extend, self.mesh, "extend", every_position=every_position)
            b = rows * self.shards
            self._extend[key] = self._compile(fn, [("tokens", (b, length))] + [("lengths", (b,))] * 3, every_position)
        return self._extend[key]

    def compiled_mixed(self, rows: int, length: int):
        if (rows, length) not in self._mixed:
            b = rows * self.shards
            self._mixed[rows, length] = self._compile(
                model.build(self.rs_extend, self.mesh, "mixed"),
                [("tokens", (self.slots, 1)), ("lengths", (self.slots,)), ("tokens", (b, length))] + [("lengths", (b,))] * 3)
        return self._mixed[rows, length]

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
            self._copy = model.copy_prefix(self.rs, self.mesh)
        self.cache = self._copy(self.cache, *(self._put("lengths", v) for v in vecs))
