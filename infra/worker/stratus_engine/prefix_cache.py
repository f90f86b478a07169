"""Shared-prefix reuse: the KV cache of prompt prefixes, kept so that requests starting with the
same tokens (a system prompt, few-shot examples, the chat template's default system message, a
batch file's shared instructions) prefill only what follows.

  lookup(ids, scope)     -> (entry, L): the longest stored prefix of `ids`, L a multiple of BLOCK
                            and below len(ids) (the last prompt token is always run: it gives the logits)
  add(ids, L, kv, scope) store ids[:L]'s KV (per-buffer tensors, KVCache.save_prefix); every block
                            boundary inside it is indexed, so any shorter block-aligned prefix hits too
  evictions              least recently used first, keeping the stored KV within budget_bytes

A scope (the worker passes the tenant, unless the deployment shares its cache) keeps prefixes
apart: a request never reuses, and so never times, another scope's prompts.

Each block boundary is keyed by (length, a hash chained over the blocks before it), so finding the
longest stored prefix of an L-token prompt costs O(L), not a tuple per boundary (O(L^2 / BLOCK));
a hit is then checked token by token, so it is exact.
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
    keys: list = field(default_factory=list)  # its boundaries' index keys, MIN_TOKENS first
    scope: str = ""


def boundary_keys(ids: list[int], longest: int, scope: str = "") -> list[tuple[int, int]]:
    """(length, chained hash of scope and ids[:length]) for each block boundary from MIN_TOKENS to `longest`."""
    keys, h = [], hash(scope)
    for end in range(BLOCK, longest + 1, BLOCK):
        h = hash((h, tuple(ids[end - BLOCK : end])))
        if end >= MIN_TOKENS:
            keys.append((end, h))
    return keys


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
    index: dict = field(default_factory=dict)  # boundary key (boundary_keys) -> Entry holding that prefix
    stats: PrefixStats = field(default_factory=PrefixStats)
    used_bytes: int = 0

    def lookup(self, ids: list[int], scope: str = "") -> tuple[Entry | None, int]:
        """The entry holding the longest stored prefix of `ids` and its length (counted, and made
        most recently used), or (None, 0)."""
        entry, length = self._find(ids, scope)
        if entry is None:
            self.stats.misses += 1
            return None, 0
        self.entries.move_to_end(id(entry))
        self.stats.hits += 1
        self.stats.tokens_reused += length
        return entry, length

    def matched(self, ids: list[int], scope: str = "") -> int:
        """How many of `ids`' first tokens a lookup would reuse now (nothing counted or moved)."""
        return self._find(ids, scope)[1]

    def _find(self, ids: list[int], scope: str) -> tuple[Entry | None, int]:
        for key in reversed(boundary_keys(ids, (len(ids) - 1) // BLOCK * BLOCK, scope)):
            entry = self._held(ids, key, scope)
            if entry is not None:
                return entry, key[0]
        return None, 0

    def _held(self, ids: list[int], key: tuple[int, int], scope: str) -> Entry | None:
        entry = self.index.get(key)
        held = entry is not None and entry.scope == scope and entry.ids[: key[0]] == tuple(ids[: key[0]])
        return entry if held else None

    def storable(self, ids: list[int], scope: str = "") -> int:
        """How many of `ids`' tokens a new entry would hold (0: not worth storing, or held already)."""
        length = (len(ids) - 1) // BLOCK * BLOCK
        if length < MIN_TOKENS or length * self.bytes_per_token > self.budget_bytes:
            return 0
        return 0 if self._held(ids, boundary_keys(ids, length, scope)[-1], scope) else length

    def add(self, ids: list[int], length: int, kv: list, scope: str = "") -> None:
        keys = boundary_keys(ids, length, scope)
        entry = Entry(tuple(ids[:length]), kv, length * self.bytes_per_token, keys, scope)
        while self.entries and self.used_bytes + entry.nbytes > self.budget_bytes:
            self._evict()
        self.entries[id(entry)] = entry
        self.used_bytes += entry.nbytes
        for key in entry.keys:
            self.index[key] = entry

    def report(self) -> dict:
        return {
            "entries": len(self.entries),
            "bytes": self.used_bytes,
            "budget_bytes": self.budget_bytes,
            "hits": self.stats.hits,
            "misses": self.stats.misses,
            "tokens_reused": self.stats.tokens_reused,
            "evictions": self.stats.evictions,
        }

    def _evict(self) -> None:
        _, entry = self.entries.popitem(last=False)
        self.used_bytes -= entry.nbytes
        self.stats.evictions += 1
        for key in entry.keys:
            if self.index.get(key) is entry:
                del self.index[key]
                # a shorter prefix may still live in another entry
                for other in reversed(self.entries.values()):
                    if key in other.keys and other.ids[: key[0]] == entry.ids[: key[0]]:
                        self.index[key] = other
                        break
