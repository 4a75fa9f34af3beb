"""Prefix caching (serving/prefix.py): the row tables, hits and misses, the LRU under pressure, rows of
other batch shards never shared; and in the engine, requests reusing a cached prefix give the same
tokens and logprobs as the same requests with caching off."""

import numpy as np

from helpers import setup
from moejax.serving.engine import Engine
from moejax.serving.prefix import BLOCK, PrefixCache, block_names
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
    assert pc.place(names, len(p), free=[0, 1, 2, 3], preferred=[2, 3]) == (2, None, 0)
    pc.prefilled(2, names, len(p))
    assert pc.tables[2] == names
    pc.released(2, now=1.0)
    # the same prefix again: the free row that holds it, no copy; the prompt's last token is computed
    assert pc.place(names, len(p), free=[0, 1, 2, 3], preferred=[0, 1]) == (2, None, 3 * BLOCK)
    # row 2 busy: a free row of its shard receives a copy
    q = SYSTEM + [4]
    assert pc.place(block_names(q), len(q), free=[0, 1, 3], preferred=[0, 1]) == (3, 2, 3 * BLOCK)
    # both rows of shard 1 busy: the prefix there is not shared with shard 0
    assert pc.place(block_names(q), len(q), free=[0, 1], preferred=[0, 1])[1:] == (None, 0)
    # a prompt of exactly 3 blocks reuses 2: its last token must be computed
    exact = SYSTEM[:3 * BLOCK]
    assert pc.place(block_names(exact), len(exact), free=[3], preferred=[3]) == (3, None, 2 * BLOCK)
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
    row, donor, n = pc.place(block_names(new), len(new), free=[0, 1, 2], preferred=[0, 1, 2])
    assert (row, donor, n) == (1, None, 0) and pc.evicted == 2  # row 1 finished first: its 2 blocks go
    assert pc.place(block_names(prompts[2]), len(prompts[2]), [0, 2], [0, 2]) == (2, None, 2 * BLOCK)
    off = PrefixCache(slots=2, shards=1, enabled=False)
    assert off.place(block_names(prompts[0]), len(prompts[0]), [0, 1], [0, 1])[1:] == (None, 0)


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
    results = {}
    for cache in (False, True):
        eng = Engine(rs, m, params, slots=4, max_len=128, chunk=32, budget=64, prefix_cache=cache)
        results[cache] = _serve(eng, prompts, 6)
        if cache:  # one by one: every prompt after the first reuses the system prompt; all at once too,
            # but a batch shard's first two rows (admitted together) find no holder on their own shard
            misses = 1 + 2 * (eng.shards - 1)
            assert eng.prefix.hit >= (2 * len(prompts) - misses) * 3 * BLOCK
            assert eng.tokens["prefill"] == 2 * sum(map(len, prompts)) - eng.prefix.hit
        else:
            assert eng.prefix.hit == 0 and eng.tokens["prefill"] == 2 * sum(map(len, prompts))
    (t0, l0), (t1, l1) = results[False], results[True]
    assert t1 == t0
    np.testing.assert_allclose(np.array(l1), np.array(l0), rtol=0, atol=1e-5)
