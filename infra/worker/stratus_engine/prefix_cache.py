"""Shared-prefix reuse: the KV cache of prompt prefixes, kept so that requests starting with the
same tokens (a system prompt, few-shot examples, the chat template's default system message, a
batch file's shared instructions) prefill only what follows.

  lookup(ids)        -> (entry, L): the longest stored prefix of `ids`, L a multiple of BLOCK and
                        below len(ids) (the last prompt token is always run: it gives the logits)
  add(ids, L, kv)    store ids[:L]'s KV (per-buffer tensors, KVCache.save_prefix); every block
                        boundary inside it is indexed, so any shorter block-aligned prefix hits too
  evictions          least recently used first, keeping the stored KV within budget_bytes

Keys are the token tuples themselves (Python's hash, then an equality check), so a hit is exact.
A prefix's KV depends only on its own tokens and positions (causal attention), so a row built from
it is the row a full prefill would have built; greedy tokens are the same with and without reuse
(tests/unit/test_prefix_cache.py).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

BLOCK = 16  # prefixes are stored and matched in whole blocks of tokens
MIN_TOKENS = 32  # shorter shared prefixes are not worth a copy


@dataclass(eq=False)
class Entry:
    ids: tuple[int, ...]
    kv: list  # one tensor per cache buffer: [1, kv heads, len(ids), head dim]
    nbytes: int


@dataclass
class PrefixStats:
    hits: int = 0
    misses: int = 0
    tokens_reused: int = 0
    evictions: int = 0


@dataclass
class PrefixCache:
    budget_bytes: int
    bytes_per_token: int
    entries: OrderedDict = field(default_factory=OrderedDict)  # id(entry) -> Entry, least recent first
    index: dict = field(default_factory=dict)  # token prefix (tuple) -> Entry holding it
    stats: PrefixStats = field(default_factory=PrefixStats)
    used_bytes: int = 0

    def lookup(self, ids: list[int]) -> tuple[Entry | None, int]:
        """The entry holding the longest stored prefix of `ids` and its length (counted, and made
        most recently used), or (None, 0)."""
        entry, length = self._find(ids)
        if entry is None:
            self.stats.misses += 1
            return None, 0
        self.entries.move_to_end(id(entry))
        self.stats.hits += 1
        self.stats.tokens_reused += length
        return entry, length

    def matched(self, ids: list[int]) -> int:
        """How many of `ids`' first tokens a lookup would reuse now (nothing counted or moved)."""
        return self._find(ids)[1]

    def _find(self, ids: list[int]) -> tuple[Entry | None, int]:
        longest = (len(ids) - 1) // BLOCK * BLOCK
        for length in range(longest, MIN_TOKENS - 1, -BLOCK):
            entry = self.index.get(tuple(ids[:length]))
            if entry is not None:
                return entry, length
        return None, 0

    def storable(self, ids: list[int]) -> int:
        """How many of `ids`' tokens a new entry would hold (0: not worth storing, or held already)."""
        length = (len(ids) - 1) // BLOCK * BLOCK
        if length < MIN_TOKENS or length * self.bytes_per_token > self.budget_bytes:
            return 0
        return 0 if tuple(ids[:length]) in self.index else length

    def add(self, ids: list[int], length: int, kv: list) -> None:
        entry = Entry(tuple(ids[:length]), kv, length * self.bytes_per_token)
        while self.entries and self.used_bytes + entry.nbytes > self.budget_bytes:
            self._evict()
        self.entries[id(entry)] = entry
        self.used_bytes += entry.nbytes
        for end in range(MIN_TOKENS, length + 1, BLOCK):  # block boundaries from MIN_TOKENS (a multiple of BLOCK)
            self.index[entry.ids[:end]] = entry

    def report(self) -> dict:
        return {"entries": len(self.entries), "bytes": self.used_bytes, "budget_bytes": self.budget_bytes,
                "hits": self.stats.hits, "misses": self.stats.misses, "tokens_reused": self.stats.tokens_reused,
                "evictions": self.stats.evictions}

    def _evict(self) -> None:
        _, entry = self.entries.popitem(last=False)
        self.used_bytes -= entry.nbytes
        self.stats.evictions += 1
        for end in range(MIN_TOKENS, len(entry.ids) + 1, BLOCK):
            key = entry.ids[:end]
            if self.index.get(key) is entry:
                del self.index[key]
                # a shorter prefix may still live in another entry
                for other in reversed(self.entries.values()):
                    if len(other.ids) >= end and other.ids[:end] == key:
                        self.index[key] = other
                        break
