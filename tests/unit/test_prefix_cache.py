"""Shared-prefix reuse (prefix_cache.py) and request priority in the engine, on the tiny model."""

import numpy as np
import pytest

from stratus.params import SamplingParams
from stratus_engine.engine import Engine, GenerationRequest
from stratus_engine.prefix_cache import BLOCK, MIN_TOKENS, PrefixCache

SHARED = [1] + [int(t) for t in np.random.default_rng(1).integers(3, 260, 70)]  # a 71-token "system prompt"
QUESTIONS = [[int(t) for t in np.random.default_rng(10 + i).integers(3, 260, 5 + i)] for i in range(6)]


def greedy(n=12):
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


@pytest.mark.parametrize("quant", ["fp32", "int4"])  # the builds whose batch invariance holds on AVX2 and AVX-512
def test_greedy_tokens_are_the_same_with_and_without_reuse(tiny, quant):
    plain = Engine.from_dir(tiny.dirs[quant], threads=1, initial_capacity=16)
    reuse = Engine.from_dir(tiny.dirs[quant], threads=1, initial_capacity=16, prefix_cache_bytes=64 << 20)
    prompts = [SHARED + q for q in QUESTIONS]
    expected = [r.token_ids for r in plain.generate([GenerationRequest(p, greedy()) for p in prompts])]
    # one at a time (each later prompt hits the first one's stored prefix) ...
    assert [reuse.generate([GenerationRequest(p, greedy())])[0].token_ids for p in prompts] == expected
    # ... and all in one step (the first runs, the rest wait for its prefix and reuse it)
    assert [r.token_ids for r in reuse.generate([GenerationRequest(p, greedy()) for p in prompts])] == expected
    report = reuse.prefixes.report()
    assert report["hits"] >= 2 * len(prompts) - 1 and report["tokens_reused"] >= 64 * (2 * len(prompts) - 1)
    assert report["bytes"] <= report["budget_bytes"]


def test_n_choices_and_logprobs_on_a_reused_prefix(tiny):
    engine = Engine.from_dir(tiny.dirs["fp32"], threads=1, prefix_cache_bytes=64 << 20)
    plain = Engine.from_dir(tiny.dirs["fp32"], threads=1)
    engine.generate([GenerationRequest(SHARED + QUESTIONS[0], greedy())])  # stores the prefix
    params = SamplingParams(max_tokens=6, temperature=0.8, seed=3, n=3, logprobs=2)
    [got] = engine.generate([GenerationRequest(SHARED + QUESTIONS[1], params)])
    [want] = plain.generate([GenerationRequest(SHARED + QUESTIONS[1], params)])
    assert engine.prefixes.stats.hits >= 1
    assert [c.token_ids for c in got.choices] == [c.token_ids for c in want.choices]
    assert [e.logprob for e in got.choices[0].logprobs] == pytest.approx(
        [e.logprob for e in want.choices[0].logprobs], abs=1e-4
    )


def test_a_prefix_is_reused_within_its_scope_only(tiny):
    # Given a prefix stored by one tenant's request
    engine = Engine.from_dir(tiny.dirs["fp32"], threads=1, prefix_cache_bytes=64 << 20)
    [first] = engine.generate([GenerationRequest(SHARED + QUESTIONS[0], greedy(), cache_scope="acme")])
    # When another tenant sends the same prefix, and then the first tenant does
    [other] = engine.generate([GenerationRequest(SHARED + QUESTIONS[1], greedy(), cache_scope="initech")])
    assert engine.prefixes.stats.hits == 0  # (its prefill time tells it nothing of acme's prompts)
    [again] = engine.generate([GenerationRequest(SHARED + QUESTIONS[2], greedy(), cache_scope="acme")])
    # Then only the first tenant's own later request reused it, and its usage says how many tokens
    assert engine.prefixes.stats.hits == 1
    assert first.usage.cached_tokens == other.usage.cached_tokens == 0
    assert again.usage.cached_tokens == engine.prefixes.stats.tokens_reused >= BLOCK


def test_stored_prefixes_stay_within_the_budget():
    per_token = 1000
    cache = PrefixCache(budget_bytes=100 * per_token, bytes_per_token=per_token)
    a, b = list(range(1, 90)), list(range(500, 590))
    cache.add(a, cache.storable(a), kv=[])
    assert cache.lookup(a[:40] + [7, 7, 7]) == (
        cache.entries[next(iter(cache.entries))],
        32,
    )  # any block-aligned prefix
    cache.add(b, cache.storable(b), kv=[])  # 80 + 80 tokens > 100: the older entry goes
    assert cache.used_bytes <= 100 * per_token and cache.stats.evictions == 1
    assert cache.lookup(a)[0] is None and cache.lookup(b)[1] == 80
    assert cache.storable(list(range(MIN_TOKENS))) == 0  # too short to be worth a copy
    assert cache.storable(b) == 0  # already held
    assert (len(b) - 1) // BLOCK * BLOCK == 80


def test_interactive_requests_are_admitted_before_waiting_batch_requests(tiny):
    # Given one slot, running batch work, and more batch work waiting
    engine = Engine.from_dir(tiny.dirs["fp32"], threads=1, max_batch=1)
    order = []

    def request(name, priority):
        return GenerationRequest(
            [1, 40, 90],
            greedy(4),
            priority=priority,
            on_token=lambda _t, _lp: order.append(name) if name not in order else None,
        )

    futures = [engine.submit(request("batch-1", 1))]
    engine.step()
    futures += [engine.submit(request("batch-2", 1)), engine.submit(request("interactive", 0))]
    while not all(f.done() for f in futures):
        engine.step()
    # then the interactive request, though it came last, runs before the waiting batch request
    assert order == ["batch-1", "interactive", "batch-2"]


def test_a_light_tenants_request_runs_before_a_heavy_tenants_backlog(tiny):
    # Given one slot, a heavy tenant's request running and four more of its requests waiting
    engine = Engine.from_dir(tiny.dirs["fp32"], threads=1, max_batch=1, interactive_headroom=0)
    order = []

    def request(name, tenant):
        return GenerationRequest(
            [1, 40, 90],
            greedy(4),
            tenant=tenant,
            on_token=lambda _t, _lp: order.append(name) if name not in order else None,
        )

    futures = [engine.submit(request("heavy-0", "heavy"))]
    engine.step()
    futures += [engine.submit(request(f"heavy-{i}", "heavy")) for i in range(1, 5)]
    futures.append(engine.submit(request("light", "light")))
    while not all(f.done() for f in futures):
        engine.step()
    # Then the light tenant's request, which came last, runs next
    assert order == ["heavy-0", "light", "heavy-1", "heavy-2", "heavy-3", "heavy-4"]


def test_batch_rows_stay_few_while_interactive_requests_are_about(tiny):
    # Given an engine whose clock we move, and interactive traffic
    now = [100.0]
    engine = Engine.from_dir(
        tiny.dirs["fp32"], threads=1, max_batch=8, batch_rows_beside_interactive=2, clock=lambda: now[0]
    )
    engine.submit(GenerationRequest([1, 40, 90], greedy(40), priority=0))
    batch = [engine.submit(GenerationRequest([1, 50 + i, 90], greedy(40), priority=1)) for i in range(6)]
    engine.step()
    # then beside it only 2 batch rows run, though 7 slots are free
    assert sum(1 for r in engine._active if r.req.priority == 1) == 2 and engine.num_running == 3
    # and once no interactive request has come for the window, batch rows fill the batch again
    now[0] += 10
    engine.step()
    assert sum(1 for r in engine._active if r.req.priority == 1) == 6
    while not all(f.done() for f in batch):
        engine.step()


def test_a_batch_request_with_more_choices_than_the_cap_still_runs_beside_interactive_traffic(tiny):
    now = [100.0]
    engine = Engine.from_dir(
        tiny.dirs["fp32"], threads=1, max_batch=8, batch_rows_beside_interactive=1, clock=lambda: now[0]
    )
    wide = engine.submit(
        GenerationRequest([5, 6, 7], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, n=2), priority=1)
    )
    behind = engine.submit(GenerationRequest([5, 6, 8], greedy(4), priority=1))
    # When interactive requests keep coming (one every 5 steps, well inside the window)
    for i in range(40):
        if i % 5 == 0:
            engine.submit(GenerationRequest([9, 10], greedy(3), priority=0))
        now[0] += 0.1
        engine.step()
    # Then both batch requests finished: n=2 over a cap of 1 is admitted, and so is the request behind it
    assert wide.done() and behind.done() and len(wide.result().choices) == 2


def test_an_interactive_request_joins_a_batch_full_of_batch_rows_at_the_next_step(tiny):
    # Given an engine of 4 rows full of long batch rows (no interactive traffic), one batch row waiting
    engine = Engine.from_dir(tiny.dirs["fp32"], threads=1, max_batch=4)
    batch = [engine.submit(GenerationRequest([1, 50 + i, 90], greedy(40), priority=1)) for i in range(5)]
    engine.step()
    assert engine.num_running == 4 and engine.interactive_headroom == 1
    # When an interactive request arrives
    interactive = engine.submit(GenerationRequest([1, 40, 90], greedy(3), priority=0))
    engine.step()
    # Then it runs at once in the headroom beside the 4 batch rows; the waiting batch row still waits
    assert engine.num_running == 5 and sum(1 for r in engine._active if r.req.priority == 0) == 1
    while not interactive.done():
        engine.step()
    assert not batch[4].done() and sum(1 for f in batch if f.done()) == 0
    # and interactive requests alone never run more than max_batch rows
    more = [engine.submit(GenerationRequest([1, 60 + i, 90], greedy(2), priority=0)) for i in range(6)]
    engine.step()
    assert sum(1 for r in engine._active if r.req.priority == 0) <= 4 and engine.num_running <= 5
    while not all(f.done() for f in batch + more):
        engine.step()


def test_requests_that_reuse_a_prefix_count_only_their_suffix_against_the_prefill_budget(tiny):
    # Given a stored 64-token prefix and a prefill budget of 200 tokens a step
    engine = Engine.from_dir(tiny.dirs["fp32"], threads=1, prefill_token_budget=200, prefix_cache_bytes=64 << 20)
    plain = Engine.from_dir(tiny.dirs["fp32"], threads=1)
    engine.generate([GenerationRequest(SHARED + QUESTIONS[0], greedy(2))])
    # When six ~80-token prompts sharing it arrive (480 tokens in all, ~100 after the prefix)
    prompts = [SHARED + q for q in QUESTIONS]
    futures = [engine.submit(GenerationRequest(p, greedy())) for p in prompts]
    engine.step()
    # Then all six are admitted in one step, and their tokens are what a plain engine gives
    assert engine.num_running == 6
    while not all(f.done() for f in futures):
        engine.step()
    want = plain.generate([GenerationRequest(p, greedy()) for p in prompts])
    assert [f.result().token_ids for f in futures] == [w.token_ids for w in want]


def test_an_evicted_entrys_shorter_prefixes_stay_found_in_another():
    # Given two stored prompts sharing their first 48 tokens, the shared boundaries indexed to the later one
    cache = PrefixCache(budget_bytes=1000, bytes_per_token=1)
    shared = list(range(1, 49))
    a, b = shared + list(range(100, 140)), shared + list(range(200, 240))
    cache.add(b, cache.storable(b), kv=[])
    cache.add(a, cache.storable(a), kv=[])
    cache.lookup(b)  # b most recent: a goes first
    # When the older entry is evicted
    cache._evict()
    # Then the shared prefix is still found, in the survivor, and a's own tail is not
    entry, length = cache.lookup(shared + [999] * 20)
    assert length == 48 and entry.ids[:48] == tuple(shared)
    assert cache.lookup(a)[1] == 48
