"""Generation: batch padding, a preallocated sharded KV cache, jitted prefill and decode, sampling,
timings and MoE statistics."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from moejax.models import cache as kv_cache
from moejax.models import transformer as model
from moejax.errors import UserError
from moejax.inference.sampling import Sampling, sample


def fetch(x) -> np.ndarray:
    """A global array as NumPy on every process."""
    if x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def put(mesh, layout, act: str, x: np.ndarray):
    """Place a host array (identical on every process) with the sharding the rules give `act`."""
    sharding = NamedSharding(mesh, layout.act_spec(act))
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def check_prompts(prompts: list[list[int]], vocab_size: int) -> None:
    if not prompts:
        raise UserError("no prompt given: pass --prompt TEXT or --prompt-ids [[ids...]]")
    for i, p in enumerate(prompts):
        if not p:
            raise UserError(f"prompt {i} is empty: every prompt needs at least one token")
        bad = [t for t in p if not (isinstance(t, (int, np.integer)) and 0 <= t < vocab_size)]
        if bad:
            raise UserError(f"prompt {i}: token id {bad[0]!r} is outside the vocabulary [0, {vocab_size})")


def _max_load_ratio(load_LE: np.ndarray) -> float:
    mean = load_LE.mean(axis=1)
    ratio = np.where(mean > 0, load_LE.max(axis=1) / np.where(mean > 0, mean, 1), 0.0)
    return round(float(ratio.max()), 4)


def moe_summary(load_LE: np.ndarray, served_LE: np.ndarray, dropped: int, rerouted: int) -> dict:
    """Requested load (every top-k choice, before drop / reroute) and served load (what each
    expert ran), per layer and expert."""
    load_LE, served_LE = np.asarray(load_LE, np.float64), np.asarray(served_LE, np.float64)
    return {"dropped": int(dropped), "rerouted": int(rerouted),
            "assignments": int(load_LE.sum()), "max_load_ratio": _max_load_ratio(load_LE),
            "served_max_load_ratio": _max_load_ratio(served_LE),
            "requested_tokens_per_expert": load_LE.astype(np.int64).tolist(),
            "served_tokens_per_expert": served_LE.astype(np.int64).tolist()}


def padded_batch(rs: model.RunSpec, batch: int) -> int:
    """The batch a run computes: a multiple of (batch shards x microbatches), with at least 2 rows
    per microbatch on CPU (XLA:CPU upcasts bfloat16 matrix-vector dots to float32 weight copies)."""
    rows = 2 if rs.platform == "cpu" else 1
    return round_up(max(batch, rows * rs.batch_multiple), rs.batch_multiple)


class Generator:
    """Compiled prefill + decode for one (RunSpec, mesh, batch, max length)."""

    def __init__(self, rs: model.RunSpec, mesh, params, batch: int, prompt_len: int, max_len: int,
                 decode_chunk: int = 0):
        """decode_chunk K > 0: decode K steps per dispatch in one compiled loop on the device
        (sampling there too), reading the new tokens back once per K steps."""
        self.rs, self.mesh, self.params = rs, mesh, params
        self.decode_chunk = decode_chunk
        self._chunks: dict = {}  # (sampling, eos, max new tokens) -> jitted K-step loop
        self.batch = padded_batch(rs, batch)
        self.prompt_len = prompt_len
        self.max_len = max_len
        lay = rs.layout
        b = self.batch
        tokens = put(mesh, lay, "tokens", np.zeros((b, prompt_len), np.int32))
        lengths = put(mesh, lay, "lengths", np.ones((b,), np.int32))
        cache = kv_cache.init_cache(rs, mesh, b, max_len)
        t0 = time.perf_counter()
        self.prefill = model.build(rs, mesh, "prefill").lower(params, tokens, lengths, cache).compile()
        one = put(mesh, lay, "tokens", np.zeros((b, 1), np.int32))
        self.decode = model.build(rs, mesh, "decode").lower(params, one, lengths, cache).compile()
        self.compile_s = time.perf_counter() - t0
        self._warmed: list[dict] = []  # sampling settings `_warm` has run

    def _warm(self, opts: dict, eos_id: int | None, max_new: int):
        """Run every operation `generate` times once, untimed, on a batch of zero tokens in a cache
        of its own: the sampler and the small helpers compile on their first call, and the first
        call of a compiled program (and of each branch it takes) runs slower, which timings must
        not include."""
        if (opts, eos_id, max_new) in self._warmed:
            return
        mesh, lay, b, t = self.mesh, self.rs.layout, self.batch, self.prompt_len
        cache = kv_cache.init_cache(self.rs, mesh, b, self.max_len)
        logits, cache, stats = self.prefill(self.params, put(mesh, lay, "tokens", np.zeros((b, t), np.int32)),
                                            put(mesh, lay, "lengths", np.full((b,), t, np.int32)), cache)
        key, sub = jax.random.split(jax.random.key(0))
        fetch(sample(logits, sub, **opts))
        logits, cache, more = self.decode(self.params, put(mesh, lay, "tokens", np.zeros((b, 1), np.int32)),
                                          put(mesh, lay, "lengths", np.full((b,), min(t, self.max_len - 1), np.int32)),
                                          cache)
        key, sub = jax.random.split(key)
        fetch(sample(logits, sub, **opts))
        totals = jax.tree.map(lambda a, c: a + c, stats, more)
        if self.decode_chunk:  # compiled here, run on rows that are all done (it writes nothing)
            ints = put(mesh, lay, "lengths", np.zeros((b,), np.int32))
            all_done = put(mesh, lay, "lengths", np.ones((b,), bool))
            out = self._chunk_fn(opts, eos_id, max_new)(self.params, ints, ints, all_done, 0,
                                                        np.asarray(jax.random.key_data(key)), cache)
            fetch(out[0]), fetch(out[1]), fetch(out[3])
            totals = jax.tree.map(lambda a, c: a + c, totals, out[6])
        moe_summary(fetch(totals["load"]), fetch(totals["served_load"]), int(fetch(totals["dropped"]).sum()),
                    int(fetch(totals["rerouted"]).sum()))
        self._warmed.append((opts, eos_id, max_new))

    def _chunk_fn(self, opts: dict, eos_id: int | None, max_new: int):
        """K decode steps in one jit: lax.scan over `model.build("decode")` and `sample`, with the
        host loop's rules (a row is done after EOS or max_new tokens; a done row writes nothing)."""
        key_ = (tuple(sorted(opts.items())), eos_id, max_new)
        if key_ in self._chunks:
            return self._chunks[key_]
        decode = model.build(self.rs, self.mesh, "decode")
        eos = jnp.asarray(eos_id if eos_id else (-1,), jnp.int32)

        def run(params, tok_B, lengths_B, done_B, step0, key_data, cache):
            # the key travels as its raw data: a key that came out of this program carries the
            # mesh in its type, and the next call would compile the program again
            key = jax.random.wrap_key_data(key_data)
            def body(carry, i):
                tok_B, done_B, key, cache = carry
                step = step0 + i
                active = step + 1 < max_new  # the host loop's `steps + 1 < max_new_tokens`
                was_done_B = done_B | ~active
                pos_B = jnp.where(was_done_B, -1, lengths_B + step)
                logits, cache, stats = decode(params, tok_B[:, None], pos_B, cache)
                key, sub = jax.random.split(key)
                nxt_B = sample(logits, sub, **opts)
                done_B = was_done_B | jnp.isin(nxt_B, eos) | (step + 2 >= max_new)
                return (jnp.where(was_done_B, tok_B, nxt_B), done_B, key, cache), (nxt_B, ~was_done_B, stats)

            (tok_B, done_B, key, cache), (toks_KB, new_KB, stats) = jax.lax.scan(
                body, (tok_B, done_B, key, cache), jnp.arange(self.decode_chunk))
            return toks_KB, new_KB, tok_B, done_B, jax.random.key_data(key), cache, jax.tree.map(lambda a: a.sum(0), stats)

        self._chunks[key_] = jax.jit(run, donate_argnums=(6,))
        return self._chunks[key_]

    def generate(self, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling,
                 eos_id: int | tuple | None, progress=None, keep_logits: bool = False) -> dict:
        """New tokens for each prompt (stopping at an EOS id, which is kept), timings and MoE statistics.
        eos_id: one id or a tuple of them (a tokenizer's generation_config list). keep_logits: also
        return the logits each new token was sampled from ([steps][n, V])."""
        eos_id = () if eos_id is None else (eos_id,) if isinstance(eos_id, int) else tuple(eos_id)
        rs, mesh, lay = self.rs, self.mesh, self.rs.layout
        n = len(prompts)
        lengths = np.zeros((self.batch,), np.int32)
        tokens = np.zeros((self.batch, self.prompt_len), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = p
            lengths[i] = len(p)
        key = jax.random.key(sampling.seed)
        opts = dict(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
        self._warm(opts, eos_id, max_new_tokens)
        cache = kv_cache.init_cache(rs, mesh, self.batch, self.max_len)

        t0 = time.perf_counter()
        logits, cache, stats = self.prefill(self.params, put(mesh, lay, "tokens", tokens),
                                            put(mesh, lay, "lengths", lengths), cache)
        key, sub = jax.random.split(key)
        nxt = fetch(sample(logits, sub, **opts))
        ttft = time.perf_counter() - t0
        totals = stats  # summed on the devices; read once, after decoding
        out = [[int(nxt[i])] for i in range(n)]
        step_logits = [fetch(logits)[:n]] if keep_logits else []
        done = np.array([max_new_tokens <= 1 or out[i][-1] in eos_id for i in range(n)]
                        + [True] * (self.batch - n))
        t1 = time.perf_counter()
        steps = 0
        if self.decode_chunk:
            if keep_logits:
                raise ValueError("keep_logits needs the host decode loop (decode_chunk=0)")
            run = self._chunk_fn(opts, eos_id, max_new_tokens)
            tok = put(mesh, lay, "lengths", nxt.astype(np.int32))
            done_dev = put(mesh, lay, "lengths", done)
            len_dev = put(mesh, lay, "lengths", lengths)
            key_data = np.asarray(jax.random.key_data(key))
            while not done.all() and steps + 1 < max_new_tokens:
                toks, new, tok, done_dev, key_data, cache, stats = run(self.params, tok, len_dev, done_dev, steps,
                                                                       key_data, cache)
                key_data = fetch(key_data)
                totals = jax.tree.map(lambda a, b: a + b, totals, stats)
                toks, new = fetch(toks), fetch(new)
                for k in range(self.decode_chunk):
                    for i in range(n):
                        if new[k, i]:
                            out[i].append(int(toks[k, i]))
                steps += self.decode_chunk
                done = fetch(done_dev).astype(bool)
                if progress:
                    progress(min(steps, max_new_tokens - 1), max_new_tokens - 1, time.perf_counter() - t1)
        while not done.all() and steps + 1 < max_new_tokens:
            pos = np.where(done, -1, lengths + steps).astype(np.int32)
            logits, cache, stats = self.decode(self.params, put(mesh, lay, "tokens", nxt[:, None].astype(np.int32)),
                                               put(mesh, lay, "lengths", pos), cache)
            key, sub = jax.random.split(key)
            nxt = fetch(sample(logits, sub, **opts))
            if keep_logits:
                step_logits.append(fetch(logits)[:n])
            totals = jax.tree.map(lambda a, b: a + b, totals, stats)
            steps += 1
            for i in range(n):
                if not done[i]:
                    out[i].append(int(nxt[i]))
                    done[i] = out[i][-1] in eos_id or len(out[i]) >= max_new_tokens
            if progress:
                progress(steps, max_new_tokens - 1, time.perf_counter() - t1)
        decode_s = time.perf_counter() - t1
        prompt_tokens = int(lengths.sum())
        new_tokens = sum(len(o) for o in out)
        decoded = new_tokens - n  # the first token of each sequence came from the prefill
        devices = rs.shape.size
        return {
            "generated_ids": out,
            **({"step_logits": step_logits} if keep_logits else {}),
            "ttft_s": ttft,
            "decode_s": decode_s,
            "prompt_tokens": prompt_tokens,
            "new_tokens": new_tokens,
            "prefill_tokens_per_s": prompt_tokens / ttft,
            "decode_tokens_per_s": decoded / decode_s if decoded else 0.0,
            "tokens_per_ms_per_device": (prompt_tokens + decoded) / ((ttft + decode_s) * 1e3) / devices,
            "moe": moe_summary(fetch(totals["load"]), fetch(totals["served_load"]),
                               int(fetch(totals["dropped"]).sum()), int(fetch(totals["rerouted"]).sum())),
        }
