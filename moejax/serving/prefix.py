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
"""

from __future__ import annotations

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


class PrefixCache:
    """Row tables and the free rows' LRU order for one engine of `slots` rows in `shards` batch
    shards. Counters (in tokens, as vLLM's prefix_cache_queries / prefix_cache_hits): queried,
    hit; evicted counts blocks dropped when a free row went to a request that did not reuse them."""

    def __init__(self, slots: int, shards: int, enabled: bool = True):
        self.per_shard = slots // shards
        self.enabled = enabled
        self.tables: list[list[int]] = [[] for _ in range(slots)]
        self.last_used = [0.0] * slots  # when each row's request finished (0: never used)
        self.queried = self.hit = self.evicted = 0

    def place(self, names: list[int], prompt_len: int, free: list[int], preferred: list[int]
              ) -> tuple[int, int | None, int]:
        """For a prompt whose blocks are `names`, among the `free` rows (at least one): (the row it
        gets, the row to copy the reused positions from or None, how many prompt tokens it reuses).
        Without a cached prefix: the least recently used of `preferred` (a nonempty subset of
        `free`: the engine's least busy shard). Reuse leaves the last prompt token to compute."""
        row, donor, n, best = None, None, 0, (0, False)
        if self.enabled and names:
            limit = (prompt_len - 1) // BLOCK  # full blocks that leave a token to compute
            for r, table in enumerate(self.tables):
                key = (min(matched(table, names), limit), r in free)  # a free holder needs no copy
                if not key[0] or key <= best:
                    continue
                shard_free = [f for f in free if f // self.per_shard == r // self.per_shard]
                if shard_free:
                    best, donor, n = key, r, key[0]
                    row = r if r in free else min(shard_free, key=self._lru_key)
        if row is None:
            row = min(preferred, key=self._lru_key)
        self.queried += prompt_len
        self.hit += n * BLOCK
        if row == donor:
            donor = None  # the row already holds them
        kept = n if donor is None else 0
        self.evicted += max(0, len(self.tables[row]) - kept)
        self.tables[row] = list(names[:n])
        return row, donor, n * BLOCK

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
