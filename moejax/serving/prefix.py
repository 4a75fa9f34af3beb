"""Prefix caching over the engine's KV-cache rows: which rows hold which prompt blocks.

A prompt is read in blocks of BLOCK tokens; block i is named by a hash chained over every token up
to its end (vLLM's scheme: equal names mean equal prefixes). Each cache row (slot) keeps the names
of the full prompt blocks whose keys and values it holds, in order: a row's table. A row keeps its
table after its request finishes, until the row is given to a request that does not reuse it: free
rows are handed out least recently used first, so the prefixes used last survive longest (the LRU).

A new request reuses the longest run of leading blocks that any row of its batch shard holds (a row
still serving its own request included: the prompt part of a row never changes while it decodes):
it takes that row if it is free, else a free row of the same shard receives a copy of those
positions (one small device program, `models/cache.copy_prefix`). Either way the request
starts its prefill after the reused tokens, and at least its last prompt token is computed, so its
first token comes from its own forward. Rows of different batch shards, or of different dp
replicas (separate engines), never share.

Behind the rows, a block pool (vLLM's paged cache, for prefixes no row holds any more): each batch
shard has `pool_blocks / shards` blocks of BLOCK positions, each naming one prompt block; the pool's
table maps a block name to its block, in least-recently-used order. When a free row goes to a
request that does not keep all of its blocks, the row's blocks the pool lacks are first saved into
it; a request whose leading blocks the pool holds (more of them than any row) gets them copied into
its row. A full pool drops its least recently used block; a chain's blocks are touched last block
first, so a chain is dropped from its end, never leaving later blocks that cannot match. Both
copies run in one small device program (`models/cache.move_blocks`), inside each device.
"""

from __future__ import annotations

import collections
from typing import NamedTuple

BLOCK = 16  # tokens per block


def block_names(prompt: list[int], block: int = BLOCK) -> list[int]:
    """The chained hash of each full block of `prompt`."""
    names, h = [], 0
    for i in range(len(prompt) // block):
        h = hash((h, tuple(prompt[i * block:(i + 1) * block])))
        names.append(h)
    return names


def matched(table: list[int], names: list[int]) -> int:
    """How many leading blocks of `names` the row table holds."""
    n = 0
    for a, b in zip(table, names):
        if a != b:
            break
        n += 1
    return n


def matched_in(table, names: list[int]) -> int:
    """How many leading blocks of `names` the pool table holds."""
    n = 0
    for name in names:
        if name not in table:
            break
        n += 1
    return n


class Placement(NamedTuple):
    """Where a new request goes: its row; the row to copy its reused positions from (None: none, or
    from the pool); how many prompt tokens it reuses; the pool copies to run first, each within the
    row's batch shard: `save` (row block index, pool block) pairs from the row's old blocks, then
    `load` (pool block, row block index) pairs into the row."""
    row: int
    donor: int | None
    reused: int
    save: tuple = ()
    load: tuple = ()


class PrefixCache:
    """Row tables, the free rows' LRU order and the block pool's tables for one engine of `slots`
    rows in `shards` batch shards. Counters (in tokens, as vLLM's prefix_cache_queries /
    prefix_cache_hits): queried, hit (from rows or the pool); in blocks: evicted (dropped from a row
    when a free row went to a request that did not reuse them), saved (copied into the pool),
    loaded (copied from the pool into a row), dropped (from the pool, least recently used)."""

    def __init__(self, slots: int, shards: int, enabled: bool = True, pool_blocks: int = 0):
        self.per_shard = slots // shards
        self.enabled = enabled
        self.tables: list[list[int]] = [[] for _ in range(slots)]
        self.last_used = [0.0] * slots  # when each row's request finished (0: never used)
        # per shard: block name -> pool block, least recently used first; the unused blocks
        self.pool = [collections.OrderedDict() for _ in range(shards)]
        self.pool_free = [list(range(pool_blocks // shards)) for _ in range(shards)]
        self.queried = self.hit = self.evicted = 0
        self.saved = self.loaded = self.dropped = 0

    def place(self, names: list[int], prompt_len: int, free: list[int], preferred: list[int]) -> Placement:
        """For a prompt whose blocks are `names`, among the `free` rows (at least one): where it goes.
        Without a cached prefix: the least recently used of `preferred` (a nonempty subset of `free`:
        the engine's least busy shard). Reuse leaves the last prompt token to compute; a row holder
        wins over the pool at equal length (no copy, or a row-to-row one)."""
        row, donor, n, best = None, None, 0, (0, False)
        load: list[int] = []
        if self.enabled and names:
            limit = (prompt_len - 1) // BLOCK  # full blocks that leave a token to compute
            for r, table in enumerate(self.tables):
                key = (min(matched(table, names), limit), r in free)  # a free holder needs no copy
                if not key[0] or key <= best:
                    continue
                shard_free = self._shard_free(free, r // self.per_shard)
                if shard_free:
                    best, donor, n = key, r, key[0]
                    row = r if r in free else min(shard_free, key=self._lru_key)
            for shard, table in enumerate(self.pool):
                k = min(matched_in(table, names), limit)
                shard_free = self._shard_free(free, shard)
                if k > n and shard_free:
                    row, donor, n = min(shard_free, key=self._lru_key), None, k
                    load = [table[name] for name in names[:k]]
        if row is None:
            row = min(preferred, key=self._lru_key)
        self.queried += prompt_len
        self.hit += n * BLOCK
        if row == donor:
            donor = None  # the row already holds them
        kept = n if donor is None and not load else 0
        old = self.tables[row]
        save = self._save(row // self.per_shard, old, set(load)) if len(old) > kept else []
        self.evicted += max(0, len(old) - kept)
        self.tables[row] = list(names[:n])
        if load:
            self._touch(row // self.per_shard, names[:n])
            self.loaded += n
        return Placement(row, donor, n * BLOCK, tuple(save), tuple(zip(load, range(n))))

    def _shard_free(self, free: list[int], shard: int) -> list[int]:
        return [f for f in free if f // self.per_shard == shard]

    def _save(self, shard: int, names: list[int], keep: set[int]) -> list[tuple[int, int]]:
        """Put the row blocks `names` the pool lacks into it, first block first, dropping least
        recently used blocks but none of `keep` or of this chain: (row block index, pool block) pairs.
        Stops at the first block that finds no room (later ones could never match without it)."""
        table, free, out = self.pool[shard], self.pool_free[shard], []
        mine = {table[name] for name in names if name in table}
        for i, name in enumerate(names):
            if name in table:
                continue
            if not free:
                victim = next((nm for nm, b in table.items() if b not in keep and b not in mine), None)
                if victim is None:
                    break
                free.append(table.pop(victim))
                self.dropped += 1
            block = free.pop()
            table[name] = block
            mine.add(block)
            out.append((i, block))
        self.saved += len(out)
        self._touch(shard, names)
        return out

    def _touch(self, shard: int, names: list[int]):
        """Mark a chain's pooled blocks most recently used, its first block last (dropped last)."""
        table = self.pool[shard]
        for name in reversed(names):
            if name in table:
                table.move_to_end(name)

    def _lru_key(self, row: int):
        # an empty row first, then the row whose request finished longest ago
        return (bool(self.tables[row]), self.last_used[row])

    def prefilled(self, row: int, names: list[int], tokens: int):
        """The row now holds its prompt's first `tokens` tokens: record the full blocks among them."""
        if self.enabled:
            full = min(tokens // BLOCK, len(names))
            if full > len(self.tables[row]):
                self.tables[row] = list(names[:full])

    def released(self, row: int, now: float):
        self.last_used[row] = now
        if not self.enabled:
            self.tables[row] = []
