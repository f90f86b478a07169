"""Prefill: running prompts into KV cache rows, and reusing stored prompt prefixes (prefix_cache.py,
docs/scheduling.md "Shared-prefix reuse").

  a stored prefix   load it, run only the rest of the prompt (one row at a time)
  otherwise         right-padded together; a prompt sharing a prefix with one run in the same step
                    waits for it to be stored, then reuses it
  echo + logprobs   alone, keeping every position's logits (no reuse: every position is scored)

A prefix's KV depends only on its own tokens and positions (causal attention), so a row built from a
stored prefix is the row a full prefill would have built.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from stratus_engine.outputs import TokenLogprob
from stratus_engine.prefix_cache import MIN_TOKENS, PrefixCache
from stratus_engine.sampling import token_logprobs

SCORE_CHUNK = 512  # prompt tokens an echo-scoring prefill runs at a time (x 49,152 float32 logits: 100 MB)


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    scored: int | None = None  # echo + logprobs: each prompt token's log-probability and k alternatives
    scope: str = ""  # whose stored prefixes it may reuse (prefix_cache.py): the tenant, or "" when shared


@dataclass
class Prefilled:
    order: list[int] = field(default_factory=list)  # indices of the prompts, in the order of their rows
    last: list[np.ndarray] = field(default_factory=list)  # each one's logits at its last token [V], in that order
    prompt_logprobs: dict[int, list[TokenLogprob]] = field(default_factory=dict)  # scored prompts' (by index)
    reused: dict[int, int] = field(default_factory=dict)  # prompt index -> tokens a stored prefix gave it


def shares_prefix(a: Prompt, b: Prompt) -> bool:
    """Do two prompts of one scope share a prefix worth reusing (at least MIN_TOKENS, before both their ends)?"""
    n = min(len(a.ids), len(b.ids), MIN_TOKENS)
    return a.scope == b.scope and n == MIN_TOKENS and a.ids[:n] == b.ids[:n] and min(len(a.ids), len(b.ids)) > n


def tokens_to_run(prefixes: PrefixCache | None, prompt: Prompt) -> int:
    """Prompt tokens its prefill runs: those after a stored prefix it will reuse (nothing counted)."""
    return len(prompt.ids) - (prefixes.matched(prompt.ids, prompt.scope) if prefixes and prompt.scored is None else 0)


def prefill_scored(
    cache, prompt: list[int], start: int, k: int, chunk: int = SCORE_CHUNK
) -> tuple[np.ndarray, list[TokenLogprob]]:
    """Prefill one prompt into cache row `start` keeping every position's logits -> (logits at its
    last token [V], each prompt token's log-probability given the tokens before it).
    A cache that can continue a row (prefill_after) runs the prompt `chunk` tokens at a time, so the
    host holds chunk x V logits at once rather than S x V (an 8,192-token prompt: 1.6 GB)."""
    ids = np.asarray(prompt, np.int64)
    step = chunk if hasattr(cache, "prefill_after") else len(ids)
    scored = [TokenLogprob(prompt[0], None, None)]
    for a in range(0, len(ids), step):
        part = ids[a : a + step]
        logits = (
            cache.prefill(
                part[None], np.ones((1, len(part)), np.int64), np.arange(len(part), dtype=np.int64)[None], start
            )[0]
            if a == 0
            else cache.prefill_after(start, part, a, keep=0)
        )  # [len(part), V]
        targets = ids[a + 1 : a + 1 + len(part)]  # position a + j predicts token a + j + 1
        scored += [TokenLogprob(*t) for t in token_logprobs(logits[: len(targets)], targets, k)]
    return logits[-1], scored


def prefill_last(cache, prompts: list[list[int]], start: int) -> tuple[np.ndarray, np.ndarray]:
    """Prefill prompts (right-padded) into cache rows from `start` -> (logits at each prompt's last
    token [m, V], lengths [m]). Only the trailing columns that hold a last token pay the LM head."""
    lengths = np.array([len(p) for p in prompts])
    width = int(lengths.max())
    ids = np.zeros((len(prompts), width), np.int64)
    mask = np.zeros((len(prompts), width), np.int64)
    for b, p in enumerate(prompts):
        ids[b, : lengths[b]] = p
        mask[b, : lengths[b]] = 1
    positions = np.ascontiguousarray(np.broadcast_to(np.arange(width, dtype=np.int64), ids.shape))
    keep = width - int(lengths.min()) + 1  # enough trailing columns to hold every row's last token
    logits = cache.prefill(ids, mask, positions, start, keep)  # [m, keep, V]
    return logits[np.arange(len(prompts)), lengths - 1 - (width - logits.shape[1])], lengths


def run_prompts(
    cache, prefixes: PrefixCache | None, prompts: Sequence[Prompt], start: int, chunk: int = SCORE_CHUNK
) -> Prefilled:
    """Run each prompt into row start + i, i its place in the returned order (module docstring):
    stored prefixes reused, fresh ones stored, scored prompts last."""
    plain = [i for i, p in enumerate(prompts) if p.scored is None]
    scored = [i for i, p in enumerate(prompts) if p.scored is not None]
    hits, fresh, later = [], [], []
    for i in plain:
        entry, length = prefixes.lookup(prompts[i].ids, prompts[i].scope) if prefixes else (None, 0)
        if entry is not None:
            hits.append((i, entry, length))
        elif prefixes and any(shares_prefix(prompts[i], prompts[f]) for f in fresh):
            later.append(i)
        else:
            fresh.append(i)
    out = Prefilled()
    if fresh:
        logits, _ = prefill_last(cache, [prompts[i].ids for i in fresh], start)
        out.order, out.last = list(fresh), list(logits)
        store_prefixes(cache, prefixes, [prompts[i] for i in fresh], start)
    for i in later:
        entry, length = prefixes.lookup(prompts[i].ids, prompts[i].scope)
        if entry is not None:
            hits.append((i, entry, length))
        else:
            out.last.append(prefill_last(cache, [prompts[i].ids], start + len(out.order))[0][0])
            out.order.append(i)
            store_prefixes(cache, prefixes, [prompts[i]], start + len(out.order) - 1)
    for i, entry, length in hits:
        ids = prompts[i].ids
        out.reused[i] = length
        row = start + len(out.order)
        cache.load_prefix(entry.kv, row, len(ids) + 1)
        out.last.append(cache.prefill_after(row, np.asarray(ids[length:], np.int64), length)[-1])
        out.order.append(i)
    for i in scored:
        logits, out.prompt_logprobs[i] = prefill_scored(
            cache, prompts[i].ids, start + len(out.order), prompts[i].scored, chunk
        )
        out.last.append(logits)
        out.order.append(i)
    return out


def store_prefixes(cache, prefixes: PrefixCache | None, prompts: list[Prompt], start: int) -> None:
    """Keep the prefixes of prompts freshly prefilled into rows from `start` (prefix_cache.py)."""
    for i, prompt in enumerate(prompts):
        length = prefixes.storable(prompt.ids, prompt.scope) if prefixes else 0
        if length:
            prefixes.add(prompt.ids, length, cache.save_prefix(start + i, length), prompt.scope)
