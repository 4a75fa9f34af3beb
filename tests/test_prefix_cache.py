"""Prefix caching (serving/prefix.py): the row tables, hits and misses, the LRU under pressure, rows of
other batch shards never shared, the block pool (saves, loads, its LRU dropping chains from their end);
and in the engine, requests reusing a cached prefix, from a row or from the pool, give the same tokens
and logprobs as the same requests with caching off."""

import jax
import numpy as np
import pytest

from helpers import setup
from moejax.inference.generate import put
from moejax.models.cache import init_cache, move_blocks
from moejax.serving.engine import Engine
from moejax.serving.metrics import Metrics
from moejax.serving.prefix import BLOCK, PrefixCache, block_names, matched_in
from moejax.serving.request import Request, SamplingParams

SYSTEM = [int(t) for t in np.random.default_rng(7).integers(3, 256, size=3 * BLOCK + 5)]  # 3 full blocks + 5


def test_block_names_chain_over_the_whole_prefix():
    a = block_names(list(range(40)))
    assert len(a) == 2 and block_names(list(range(40)) + [1, 2]) == a
    b = block_names([99] + list(range(1, 40)))  # first block differs: so does every later name
    assert a[0] != b[0] and a[1] != b[1]


def test_hit_miss_copy_and_lru():
    pc = PrefixCache(slots=4, shards=2)  # rows 0, 1 on shard 0; 2, 3 on shard 1
    p = SYSTEM + [1, 2, 3]
    names = block_names(p)
    # a miss: the least recently used row of the preferred (least busy) rows
    assert pc.place(names, len(p), free=[0, 1, 2, 3], preferred=[2, 3]) == (2, None, 0, (), ())
    pc.prefilled(2, names, len(p))
    assert pc.tables[2] == names
    pc.released(2, now=1.0)
    # the same prefix again: the free row that holds it, no copy; the prompt's last token is computed
    assert pc.place(names, len(p), free=[0, 1, 2, 3], preferred=[0, 1])[:3] == (2, None, 3 * BLOCK)
    # row 2 busy: a free row of its shard receives a copy
    q = SYSTEM + [4]
    assert pc.place(block_names(q), len(q), free=[0, 1, 3], preferred=[0, 1])[:3] == (3, 2, 3 * BLOCK)
    # both rows of shard 1 busy: the prefix there is not shared with shard 0
    assert pc.place(block_names(q), len(q), free=[0, 1], preferred=[0, 1])[1:3] == (None, 0)
    # a prompt of exactly 3 blocks reuses 2: its last token must be computed
    exact = SYSTEM[:3 * BLOCK]
    assert pc.place(block_names(exact), len(exact), free=[3], preferred=[3])[:3] == (3, None, 2 * BLOCK)
    assert pc.queried == 2 * len(p) + 2 * len(q) + len(exact)
    assert pc.hit == 3 * BLOCK + 3 * BLOCK + 2 * BLOCK


def test_lru_gives_the_row_used_longest_ago_and_counts_evictions():
    pc = PrefixCache(slots=3, shards=1)
    prompts = [[k] * (2 * BLOCK + 1) for k in (5, 6, 7)]
    for row, (p, t) in enumerate(zip(prompts, (3.0, 1.0, 2.0))):
        pc.place(block_names(p), len(p), free=[row], preferred=[row])
        pc.prefilled(row, block_names(p), len(p))
        pc.released(row, now=t)
    new = [9] * 40
    row, donor, n = pc.place(block_names(new), len(new), free=[0, 1, 2], preferred=[0, 1, 2])[:3]
    assert (row, donor, n) == (1, None, 0) and pc.evicted == 2  # row 1 finished first: its 2 blocks go
    assert pc.place(block_names(prompts[2]), len(prompts[2]), [0, 2], [0, 2])[:3] == (2, None, 2 * BLOCK)
    off = PrefixCache(slots=2, shards=1, enabled=False)
    assert off.place(block_names(prompts[0]), len(prompts[0]), [0, 1], [0, 1])[1:] == (None, 0, (), ())


def _use(pc: PrefixCache, prompt: list[int], free: list[int], preferred: list[int], now: float):
    """Place a prompt, prefill it whole, release its row: the placement."""
    p = pc.place(block_names(prompt), len(prompt), free, preferred)
    pc.prefilled(p.row, block_names(prompt), len(prompt))
    pc.released(p.row, now)
    return p


def test_the_pool_keeps_an_evicted_rows_blocks_and_drops_chains_from_their_end():
    pc = PrefixCache(slots=2, shards=2, pool_blocks=10)  # one row per shard; 5 pool blocks per shard
    a, b, c = [5] * (3 * BLOCK + 1), [6] * (2 * BLOCK + 1), [7] * (4 * BLOCK + 1)
    assert _use(pc, a, [0, 1], [0], 1.0) == (0, None, 0, (), ())
    # b takes row 0: first a's 3 blocks go to shard 0's pool
    p = _use(pc, b, [0, 1], [0], 2.0)
    assert p[:3] == (0, None, 0) and [i for i, _ in p.save] == [0, 1, 2] and p.load == ()
    # a again, preferring shard 1: shard 0's pool holds its 3 blocks, more than any row: b's 2 blocks
    # are saved, then a's loaded into row 0, in order
    p = _use(pc, a, [0, 1], [1], 3.0)
    assert p[:3] == (0, None, 3 * BLOCK) and [i for i, _ in p.save] == [0, 1]
    assert [r for _, r in p.load] == [0, 1, 2] and len({b for b, _ in p.load + p.save}) == 5
    assert pc.saved == 5 and pc.loaded == 3 and not pc.pool_free[0]
    # shard 1's pool is its own: a there finds nothing
    assert pc.place(block_names(a), len(a), [1], [1])[1:3] == (None, 0)
    # c evicts a (already pooled: nothing to save), then d evicts c: c's 4 blocks need room in a full
    # pool of 5: the least recently used chain, b's, goes from its end, then a's from its end
    assert _use(pc, c, [0], [0], 4.0).save == ()
    p = _use(pc, [8] * 20, [0], [0], 5.0)
    assert [i for i, _ in p.save] == [0, 1, 2, 3] and pc.dropped == 4
    assert matched_in(pc.pool[0], block_names(b)) == 0
    assert matched_in(pc.pool[0], block_names(a)) == 1  # a's first block is left
    assert matched_in(pc.pool[0], block_names(c)) == 4 and pc.hit == 3 * BLOCK


def test_a_full_pool_never_drops_the_blocks_it_is_loading():
    pc = PrefixCache(slots=1, shards=1, pool_blocks=3)
    a, b = [5] * (3 * BLOCK + 1), [6] * (2 * BLOCK + 1)
    _use(pc, a, [0], [0], 1.0)
    _use(pc, b, [0], [0], 2.0)  # a's 3 blocks fill the pool
    p = pc.place(block_names(a), len(a), [0], [0])  # b's 2 blocks find no room: not saved
    assert p.reused == 3 * BLOCK and len(p.load) == 3 and p.save == () and pc.dropped == 0


@pytest.mark.parametrize("config", ["configs/tiny.yaml", "configs/deepseek-v3-tiny.yaml"])  # keys and
# values over tp; multi-head latent attention's one latent buffer, replicated over tp
def test_move_blocks_copies_exactly_the_named_blocks_on_each_shard(config):
    rs, m, _ = setup(config, "1x2x2x2")  # 2 batch shards, 2 stages, heads over tp
    q, rows, nb = 2, 2, 4  # shards, rows per shard, blocks per row
    cache, pool = init_cache(rs, m, q * rows, nb * BLOCK), init_cache(rs, m, q * 3, BLOCK)  # 3 pool blocks a shard
    rng = np.random.default_rng(0)
    fill = lambda tree: jax.tree.map(lambda a: jax.device_put(  # noqa: E731
        rng.standard_normal(a.shape).astype(a.dtype), a.sharding), tree)
    cache, pool = fill(cache), fill(pool)
    c0, p0 = jax.tree.map(np.asarray, (cache, pool))
    # shard 1, its row 1: blocks 2 and 0 to pool blocks 0 and 2, then pool block 1 to its block 3 and
    # pool block 2 (just written: row block 0) to its block 1; shard 0 does nothing
    args = [np.full(q, -1, np.int32)] + [np.full((q, nb), -1, np.int32) for _ in range(4)]
    args[0][1] = 1
    for a, v in zip(args[1:], ([2, 0], [0, 2], [1, 2], [3, 1])):
        a[1, :2] = v
    cache, pool = move_blocks(rs, m, BLOCK)(cache, pool, put(m, rs.layout, "lengths", args[0]),
                                            *(put(m, rs.layout, "tokens", a) for a in args[1:]))
    for c, p, c1, p1 in zip(jax.tree.leaves(c0), jax.tree.leaves(p0), *(jax.tree.leaves(jax.tree.map(np.asarray, t))
                                                                         for t in (cache, pool))):
        blk = lambda a, row, b: a[:, row, b * BLOCK:(b + 1) * BLOCK]  # noqa: E731  [pp, BLOCK, ...]
        want_p, want_c = p.copy(), c.copy()
        want_p[:, 3 + 0], want_p[:, 3 + 2] = blk(c, 3, 2), blk(c, 3, 0)  # shard 1's pool blocks are 3..5
        want_c[:, 3, 3 * BLOCK:4 * BLOCK], want_c[:, 3, BLOCK:2 * BLOCK] = p[:, 3 + 1], blk(c, 3, 0)
        np.testing.assert_array_equal(p1, want_p)
        np.testing.assert_array_equal(c1, want_c)


def _serve(eng: Engine, prompts, new: int):
    """Every prompt one at a time (each after the last finished), then all at once: (tokens, logprobs)."""
    out, lps = {}, {}

    def emit(i):
        def on(ev):
            out.setdefault(i, []).extend(ev.token_ids)
            if ev.logprobs is not None:
                lps.setdefault(i, []).extend(np.asarray(ev.logprobs.logprobs).tolist())
        return on

    n = len(prompts)
    reqs = [Request(p, SamplingParams(max_tokens=new, temperature=0, ignore_eos=True, logprobs=2), emit(i))
            for i, p in enumerate(prompts + prompts)]
    for r in reqs[:n]:
        eng.submit(r)
        while not r.finish_reason:
            eng.step()
    for r in reqs[n:]:
        eng.submit(r)
    while not all(r.finish_reason for r in reqs):
        eng.step()
    return [out[i] for i in range(2 * n)], [lps[i] for i in range(2 * n)]


def test_cached_prefixes_give_the_same_tokens_and_logprobs():
    rs, m, params = setup("configs/tiny.yaml", "1x2x2x2")  # one mesh, for the suite's time
    rng = np.random.default_rng(3)
    prompts = [SYSTEM + [int(t) for t in rng.integers(3, 256, size=n)] for n in (4, 30, 1, 17, 9, 60)]
    prompts.append(list(prompts[1]))  # the same prompt twice
    # then five other system prompts, more than the 4 rows hold: the second time round, the rows gave
    # some of them to other prompts and the block pool serves them
    systems = [[int(t) for t in rng.integers(3, 256, size=2 * BLOCK + 3)] for _ in range(5)]
    others = [s + [int(t) for t in rng.integers(3, 256, size=5)] for s in systems]
    results = {}
    for cache in (False, True):
        metrics = Metrics("tiny", 1, 4)
        eng = Engine(rs, m, params, slots=4, max_len=128, chunk=32, budget=64, prefix_cache=cache, metrics=metrics)
        results["rows", cache] = _serve(eng, prompts, 6)
        if cache:  # one by one: every prompt after the first reuses the system prompt; all at once too,
            # but a batch shard's first two rows (admitted together) find no holder on their own shard
            misses = 1 + 2 * (eng.shards - 1)
            assert eng.prefix.hit >= (2 * len(prompts) - misses) * 3 * BLOCK
            assert eng.tokens["prefill"] == 2 * sum(map(len, prompts)) - eng.prefix.hit
        else:
            assert eng.prefix.hit == 0 and eng.tokens["prefill"] == 2 * sum(map(len, prompts))
        hit, loaded = eng.prefix.hit, eng.prefix.loaded
        results["pool", cache] = _serve(eng, others, 4)
        if cache:  # the second round (all at once) finds some of them in the pool, those whose shard
            # has a free row
            assert eng.pool_blocks == 4 * 128 // BLOCK and eng.prefix.saved > 0
            assert eng.prefix.loaded - loaded >= 2 and eng.prefix.hit - hit >= (eng.prefix.loaded - loaded) * BLOCK
            text = metrics.render().decode()  # /metrics counts what the cache did
            for name, n in (("hits", eng.prefix.hit), ("queries", eng.prefix.queried)):
                assert f'moejax:prefix_cache_{name}_total{{engine="0",model_name="tiny"}} {n}.0' in text
            for event in ("saved", "loaded", "dropped"):
                n = getattr(eng.prefix, event)
                assert f'moejax:prefix_cache_pool_blocks_total{{engine="0",event="{event}",model_name="tiny"}} {n}.0' in text
        assert eng.tokens["prefill"] == 2 * sum(map(len, prompts + others)) - eng.prefix.hit
    for part in ("rows", "pool"):
        (t0, l0), (t1, l1) = results[part, False], results[part, True]
        assert t1 == t0
        np.testing.assert_allclose(np.array(l1), np.array(l0), rtol=0, atol=1e-5)
