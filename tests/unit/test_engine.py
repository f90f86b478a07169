"""Engine behaviour on the tiny model: parity with a plain loop, batching, sampling, limits."""

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest

from stratus.errors import ContextLengthExceeded
from stratus.params import SamplingParams
from stratus_engine.engine import Engine, EngineFailed, GenerationRequest

PROMPTS = [[1, 40 + 7 * i, 90 + i, 120 + 3 * i, 200 - i][: 3 + i % 3] for i in range(16)]


def greedy(n, **kw):
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, **kw)


def plain_greedy_loop(model_dir, cfg, prompt, n):
    """Reference: one sequence, cache copied through session.run, no batching or binding."""
    sess = ort.InferenceSession(str(model_dir / "model.onnx"))
    names = [o.name for o in sess.get_outputs()]
    past = {
        f"past_key_values.{i}.{k}": np.zeros((1, cfg.num_kv_heads, 0, cfg.head_dim), np.float32)
        for i in range(cfg.num_layers)
        for k in ("key", "value")
    }
    ids, pos, out = list(prompt), 0, []
    for _ in range(n):
        o = sess.run(
            None,
            {
                "input_ids": np.array([ids]),
                "attention_mask": np.ones((1, pos + len(ids)), np.int64),
                "position_ids": np.arange(pos, pos + len(ids))[None],
                **past,
            },
        )
        past = {k.replace("present", "past_key_values"): v for k, v in zip(names[1:], o[1:])}
        pos += len(ids)
        ids = [int(o[0][0, -1].argmax())]
        out.append(ids[0])
    return out


@pytest.fixture(scope="module")
def engines(tiny):
    return {q: Engine.from_dir(tiny.dirs[q], threads=1, initial_capacity=8) for q in ("fp32", "int4")}


def test_greedy_matches_plain_loop(tiny, engines):
    got = engines["fp32"].generate([GenerationRequest(PROMPTS[0], greedy(20))])[0]
    assert got.token_ids == plain_greedy_loop(tiny.dirs["fp32"], tiny.config, PROMPTS[0], 20)
    assert got.finish_reason == "length"
    assert got.usage.prompt_tokens == len(PROMPTS[0]) and got.usage.completion_tokens == 20
    assert got.timings.ttft_s > 0 and got.timings.total_s >= got.timings.ttft_s


@pytest.mark.parametrize("quant", ["fp32", "int4"])
def test_batch_invariance_alone_vs_with_15_others(engines, quant):
    engine = engines[quant]
    alone = engine.generate([GenerationRequest(PROMPTS[0], greedy(24))])[0].token_ids
    batched = engine.generate([GenerationRequest(p, greedy(24)) for p in PROMPTS])
    assert batched[0].token_ids == alone
    for p, r in zip(PROMPTS[1:4], batched[1:4]):
        assert r.token_ids == engine.generate([GenerationRequest(p, greedy(24))])[0].token_ids


def test_requests_join_and_leave_between_decode_steps(engines):
    # Given one long request running, when two short ones arrive mid-way,
    # then they run alongside it, finish first, and every result equals its solo run.
    engine = engines["fp32"]
    solo = {
        i: engine.generate([GenerationRequest(PROMPTS[i], greedy(n))])[0].token_ids
        for i, n in ((0, 30), (1, 5), (2, 8))
    }
    long = engine.submit(GenerationRequest(PROMPTS[0], greedy(30)))
    for _ in range(4):
        engine.step()
    short = [
        engine.submit(GenerationRequest(PROMPTS[1], greedy(5))),
        engine.submit(GenerationRequest(PROMPTS[2], greedy(8))),
    ]
    engine.step()
    assert engine.num_running == 3
    while not all(f.done() for f in short):
        engine.step()
    assert not long.done() and engine.num_running == 1
    while not long.done():
        engine.step()
    assert long.result().token_ids == solo[0]
    assert [f.result().token_ids for f in short] == [solo[1], solo[2]]
    assert engine.num_running == 0


def test_a_cpu_step_prefills_in_chunks_each_chunks_first_tokens_out_before_the_next(tiny):
    # Given an engine whose prefill chunks hold 10 padded tokens: these prompts' lengths 3, 4, 5, 3, 4, 5 go in pairs
    whole = Engine.from_dir(tiny.dirs["int4"], threads=1, prefill_chunk_tokens=4096)
    chunked = Engine.from_dir(tiny.dirs["int4"], threads=1, prefill_chunk_tokens=10)
    assert Engine.from_dir(tiny.dirs["int4"], threads=1).prefill_chunk_tokens == 128  # a CPU's default
    events = []
    prefill = chunked.cache.prefill

    def recorded(ids, *args, **kwargs):
        events.append(("prefill", ids.shape[0]))
        return prefill(ids, *args, **kwargs)

    chunked.cache.prefill = recorded
    reqs = [GenerationRequest(PROMPTS[i], greedy(6)) for i in range(6)]
    futures = [
        chunked.submit(
            GenerationRequest(r.prompt_ids, r.params, on_token=lambda t, lp, i=i: events.append(("token", i)))
        )
        for i, r in enumerate(reqs)
    ]
    # When one step admits all six
    chunked.step()
    # Then it runs their prefills one chunk after another, each chunk's first tokens sent before the next runs
    pair = lambda i: [("prefill", 2), ("token", i), ("token", i + 1)]  # a chunk's prefill of two rows, their tokens
    assert events[:9] == pair(0) + pair(2) + pair(4)
    while not all(f.done() for f in futures):
        chunked.step()
    # and every result is what one prefill of all six gives
    assert [f.result().token_ids for f in futures] == [r.token_ids for r in whole.generate(reqs)]


def test_seeded_sampling_is_reproducible(engines):
    engine = engines["fp32"]
    run = lambda seed: (
        engine.generate(
            [GenerationRequest(PROMPTS[3], SamplingParams(max_tokens=16, temperature=1.0, seed=seed, ignore_eos=True))]
        )[0].token_ids
    )
    assert run(11) == run(11)
    assert run(11) != run(12)


def test_any_integer_seed_and_a_tiny_temperature_generate(engines):
    engine = engines["fp32"]
    run = lambda **kw: (
        engine.generate([GenerationRequest(PROMPTS[3], SamplingParams(max_tokens=12, ignore_eos=True, **kw))])[
            0
        ].token_ids
    )
    assert run(temperature=1.0, seed=-1) == run(temperature=1.0, seed=-1) == run(temperature=1.0, seed=2**64 - 1)
    assert run(temperature=1e-320, seed=3) == run(temperature=0)  # (no NaN probabilities, which would kill the engine)


def test_a_request_whose_sampling_fails_fails_alone(engines, monkeypatch):
    from stratus_engine import sampling

    engine, real = engines["fp32"], sampling.sample_row

    def fails_for_penalised(logits, params, *args):
        if params.repetition_penalty == 1.5:
            raise FloatingPointError("this request's sampling failed")
        return real(logits, params, *args)

    monkeypatch.setattr(sampling, "sample_row", fails_for_penalised)
    ok = [
        engine.submit(
            GenerationRequest(PROMPTS[i], SamplingParams(max_tokens=8, temperature=1.0, seed=i, ignore_eos=True))
        )
        for i in range(2)
    ]
    bad = engine.submit(
        GenerationRequest(
            PROMPTS[5], SamplingParams(max_tokens=8, temperature=1.0, seed=9, repetition_penalty=1.5, n=2)
        )
    )
    while not all(f.done() for f in ok + [bad]):
        engine.step()
    with pytest.raises(FloatingPointError):
        bad.result()
    assert [len(f.result().token_ids) for f in ok] == [8, 8] and engine.num_running == 0
    monkeypatch.undo()
    alone = [
        engine.generate(
            [GenerationRequest(PROMPTS[i], SamplingParams(max_tokens=8, temperature=1.0, seed=i, ignore_eos=True))]
        )[0].token_ids
        for i in range(2)
    ]
    assert [f.result().token_ids for f in ok] == alone


@pytest.mark.parametrize("dies_in", ["step", "_run_prompts"])
def test_an_engine_whose_loop_dies_fails_every_request_and_refuses_new_ones(tiny, monkeypatch, dies_in):
    # Given an engine with a request decoding and more waiting, whose next step (or the prefill of
    # the requests it admits, out of the waiting list and not yet running) raises
    import threading

    engine = Engine.from_dir(tiny.dirs["int4"], threads=1, max_batch=2, interactive_headroom=0)
    futures = [engine.submit(GenerationRequest(PROMPTS[0], greedy(50)))]
    engine.step()
    futures += [engine.submit(GenerationRequest(PROMPTS[i], greedy(5))) for i in (1, 2)]
    assert engine.num_running == 1 and engine.num_waiting == 2
    monkeypatch.setattr(engine, dies_in, lambda *_: (_ for _ in ()).throw(MemoryError("out of memory")))
    # When its loop runs: the error is raised to the loop's thread
    with pytest.raises(MemoryError):
        engine.run(threading.Event())
    # Then every request fails with EngineFailed (none waits for ever), and so does a new one
    for f in futures:
        with pytest.raises(EngineFailed, match="MemoryError"):
            f.result(timeout=1)
    with pytest.raises(EngineFailed):
        engine.submit(GenerationRequest(PROMPTS[3], greedy(5)))


def test_stop_string_truncates_and_finishes(engines):
    engine = engines["fp32"]
    full = engine.generate([GenerationRequest(PROMPTS[0], greedy(20))])[0]
    stop = full.text[5:8]
    got = engine.generate([GenerationRequest(PROMPTS[0], greedy(20, stop=(stop,)))])[0]
    assert got.finish_reason == "stop"
    assert got.text == full.text[: full.text.find(stop)]
    assert len(got.token_ids) < 20


def test_stops_cut_at_the_earliest_whatever_their_order_and_keep_the_split_tokens_logprob(engines):
    engine = engines["fp32"]
    the = engine.model.tokenizer.token_to_id("Ġthe")  # forced: " the" " the" " the"

    def run(stop):
        p = SamplingParams(max_tokens=3, temperature=0, logit_bias={the: 100}, stop=stop, logprobs=0)
        r = engine.generate([GenerationRequest([5, 6, 7], p)])[0]
        return r.text, [t.token for t in r.choices[0].logprobs]

    # (the same cut whatever the stops' order, and the split token keeps its log-probability)
    assert run(["e", "he"]) == run(["he", "e"]) == (" t", [the])


@pytest.fixture(scope="module")
def ends_early(tiny, tmp_path_factory):
    """A model whose EOS is a token greedy decoding first produces at step k > 0 -> (engine, the
    greedy tokens without EOS, k)."""
    first = Engine.from_dir(tiny.dirs["fp32"], threads=1).generate([GenerationRequest(PROMPTS[0], greedy(10))])[0]
    ids = first.token_ids
    k = next(j for j in range(1, len(ids)) if ids[j] not in ids[:j])
    model = tmp_path_factory.mktemp("eos") / "m"
    shutil.copytree(tiny.dirs["fp32"], model)
    gen = json.loads((model / "generation_config.json").read_text())
    gen["eos_token_ids"] = [ids[k]]
    (model / "generation_config.json").write_text(json.dumps(gen))
    return Engine.from_dir(model, threads=1), ids, k


def test_eos_from_generation_config_stops(ends_early):
    # Given a model whose EOS is a token greedy decoding first produces at step k > 0,
    # then generation stops there with finish_reason "stop" and k completion tokens.
    engine, ids, k = ends_early
    got = engine.generate([GenerationRequest(PROMPTS[0], SamplingParams(max_tokens=10, temperature=0))])[0]
    assert got.finish_reason == "stop" and got.token_ids == ids[:k]


def test_min_tokens_holds_off_the_eos_and_ignore_eos_runs_to_max_tokens(ends_early):
    engine, ids, k = ends_early
    eos = ids[k]
    # min_tokens past the step where EOS comes: the first min_tokens tokens are never it
    held = engine.generate(
        [GenerationRequest(PROMPTS[0], SamplingParams(max_tokens=10, temperature=0, min_tokens=k + 2))]
    )[0]
    assert held.token_ids[:k] == ids[:k] and eos not in held.token_ids[: k + 2] and len(held.token_ids) >= k + 2
    # min_tokens short of it changes nothing
    same = engine.generate([GenerationRequest(PROMPTS[0], SamplingParams(max_tokens=10, temperature=0, min_tokens=k))])[
        0
    ]
    assert same.token_ids == ids[:k] and same.finish_reason == "stop"
    # ignore_eos: the EOS is generated like any token, and the output runs to max_tokens
    full = engine.generate([GenerationRequest(PROMPTS[0], greedy(10))])[0]
    assert full.token_ids == ids and full.finish_reason == "length" and len(full.token_ids) == 10


def test_cancellation_between_steps(engines):
    engine = engines["fp32"]
    calls = {"n": 0}

    def cancelled_after_three_checks():
        calls["n"] += 1
        return calls["n"] > 3

    running = engine.submit(GenerationRequest(PROMPTS[0], greedy(50), is_cancelled=cancelled_after_three_checks))
    queued = engine.submit(GenerationRequest(PROMPTS[1], greedy(50), is_cancelled=lambda: True))
    while not (running.done() and queued.done()):
        engine.step()
    assert running.result().finish_reason == "cancelled" and 0 < len(running.result().token_ids) < 50
    assert queued.result().finish_reason == "cancelled" and queued.result().token_ids == []


def test_prompt_plus_max_tokens_beyond_context_is_typed_error(engines, tiny):
    with pytest.raises(ContextLengthExceeded) as err:
        engines["fp32"].submit(GenerationRequest([1] * 200, greedy(100)))
    assert err.value.status == 400 and "exceeds the model's context length of 256" in err.value.message


def test_cache_grows_past_initial_capacity(engines):
    engine = engines["fp32"]
    got = engine.generate([GenerationRequest(PROMPTS[0], greedy(40))])[0]
    assert engine.cache.capacity >= 40 and len(got.token_ids) == 40


def test_in_place_cache_moves_and_grows_rows_on_its_device(tiny):
    # Given rows with known contents, when one row is moved and the capacity doubles,
    # then the moved row and every existing column survive, and new columns are zero.
    from stratus_engine.kv_cache import InPlaceCache
    from stratus_engine.model_dir import load

    cache = InPlaceCache(load(tiny.dirs["fp32"], threads=1), max_batch=3, capacity=4)
    rng = np.random.default_rng(0)
    for buf in cache.buffers:
        buf.update_inplace(rng.standard_normal(cache.shape).astype(np.float32))
    before = [cache.rows(i, 0, 3).copy() for i in range(len(cache.buffers))]
    cache.move_row(2, 0, length=4)
    cache._ensure(5)
    assert cache.capacity == 8
    for i, old in enumerate(before):
        now = cache.rows(i, 0, 3)
        np.testing.assert_array_equal(now[0, :, :4], old[2])
        np.testing.assert_array_equal(now[1:, :, :4], old[1:])
        assert not now[:, :, 4:].any()


def test_providers_prefer_cuda_when_onnxruntime_has_it(monkeypatch):
    import onnxruntime

    from stratus_engine.model_dir import pick_providers

    monkeypatch.setattr(
        onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    assert pick_providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert pick_providers() == ["CPUExecutionProvider"]
    assert pick_providers(["CUDAExecutionProvider"]) == ["CPUExecutionProvider"]


def test_reused_row_bindings_accept_a_new_logits_shape(tiny):
    # Given a scored sequence (logits for every position) on rows [0, 1), when a one-row prefill
    # reuses that row range, then it still returns last-position logits equal to a fresh engine's.
    engine = Engine.from_dir(tiny.dirs["fp32"], threads=1)
    engine.score(PROMPTS[0] * 3)
    got = engine.generate([GenerationRequest(PROMPTS[1], greedy(4))])[0].token_ids
    assert (
        got
        == Engine.from_dir(tiny.dirs["fp32"], threads=1)
        .generate([GenerationRequest(PROMPTS[1], greedy(4))])[0]
        .token_ids
    )
