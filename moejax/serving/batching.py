"""How the engine batches: the compiled shapes' buckets, the prompt chunks of one forward (a plan), and
the sampling settings of each row. Host-side NumPy only."""

from __future__ import annotations

import dataclasses

import numpy as np

from moejax.serving.request import Request

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


@dataclasses.dataclass
class ExtendPlan:
    """The prompt chunks of one extend (or mixed) call: rows per batch shard x length, each row's
    chunk, its token count, first position and cache row; the request of each row, how many tokens
    each request takes, and the requests whose prompt this call finishes (they sample a token)."""
    rows: int
    length: int
    tokens: np.ndarray
    counts: np.ndarray
    starts: np.ndarray
    cache_rows: np.ndarray
    row_req: list
    take: dict
    done: list = dataclasses.field(default_factory=list)


def sampling_rows(reqs: list[Request | None]) -> tuple[np.ndarray, ...]:
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


def plan_extend(slot_req: list, shards: int, per_shard: int, chunk: int, max_rows) -> ExtendPlan:
    """The next prompt chunk of the oldest prefilling slots (`slot_req`: the request in each slot or
    None), as many per batch shard as fit the budget (rows x the longest chunk, both rounded up to a
    compiled bucket; max_rows(length): the most rows per shard at that length)."""
    picked: list[list[Request]] = [[] for _ in range(shards)]
    order = sorted((r for r in slot_req if r is not None and r.prefilled < len(r.prompt)),
                   key=lambda r: r.scheduled)
    take, length, rows = {}, 0, 0
    for r in order:
        shard = r.slot // per_shard
        n = min(chunk, len(r.prompt) - r.prefilled)
        t = max(length, bucket(n, MIN_CHUNK, chunk))
        k = max(rows, len(picked[shard]) + 1)
        if take and k > max_rows(t):
            continue  # a later, shorter chunk may still fit
        picked[shard].append(r)
        take[r.id], length, rows = n, t, k
    rows = bucket(rows, 1, max_rows(length))
    b = rows * shards
    plan = ExtendPlan(rows, length, np.zeros((b, length), np.int32), np.zeros(b, np.int32), np.zeros(b, np.int32),
                      np.zeros(b, np.int32), [None] * b, take)
    for shard, reqs in enumerate(picked):
        for k, r in enumerate(reqs):
            i, n = shard * rows + k, take[r.id]
            plan.tokens[i, :n] = r.prompt[r.prefilled: r.prefilled + n]
            plan.counts[i], plan.starts[i], plan.cache_rows[i] = n, r.prefilled, r.slot % per_shard
            plan.row_req[i] = r
    plan.done = [r if r is not None and r.prefilled + take[r.id] == len(r.prompt) else None for r in plan.row_req]
    return plan

