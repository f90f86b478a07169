"""Log-probabilities (generated and echoed prompt tokens), n > 1 choices, and the request shapes
that carry them, on the tiny model."""

import numpy as np
import pytest

from stratus.contracts import InferenceRequest
from stratus.errors import InvalidRequest
from stratus.params import SamplingParams
from stratus.shapes import TextOffsets, completion_logprobs
from stratus.wire import parse_request
from stratus_engine.engine import Engine, GenerationRequest
from stratus_engine.sampling import log_softmax

PROMPT = [1, 40, 90, 120, 33]


@pytest.fixture(scope="module")
def engine(tiny):
    return Engine.from_dir(tiny.dirs["fp32"], threads=1, max_batch=8)


def teacher_forced(engine, ids):  # [S] -> [S, V] log-probabilities of the next token at each position
    return log_softmax(engine.score(list(ids)))


def test_generated_logprobs_are_the_models_own_distribution(engine):
    # Given a greedy run asking for 3 alternatives per token
    [r] = engine.generate(
        [GenerationRequest(PROMPT, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=3))]
    )
    entries = r.choices[0].logprobs
    # then each token's logprob is that of the same sequence scored in one pass (float32)
    lp = teacher_forced(engine, PROMPT + r.token_ids)
    assert [e.token for e in entries] == r.token_ids
    for j, e in enumerate(entries):
        row = lp[len(PROMPT) - 1 + j]
        assert e.logprob == pytest.approx(row[e.token], abs=1e-4)
        assert len(e.top) == 3 and e.top[0][0] == e.token  # greedy: the chosen token is the best
        assert [t for t, _ in e.top] == list(np.argsort(-row, kind="stable")[:3])
        assert [v for _, v in e.top] == sorted((v for _, v in e.top), reverse=True)


def test_logprobs_ignore_sampling_edits(engine):
    # a +100 bias forces token 42, but its reported logprob is the unbiased model's
    [r] = engine.generate(
        [
            GenerationRequest(
                PROMPT, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True, logprobs=0, logit_bias={"42": 100})
            )
        ]
    )
    [e] = r.choices[0].logprobs
    assert e.token == 42 and e.top == ()
    assert e.logprob == pytest.approx(teacher_forced(engine, PROMPT)[-1][42], abs=1e-4)


def test_echo_scores_every_prompt_token_with_the_first_null(engine):
    [r] = engine.generate(
        [GenerationRequest(PROMPT, SamplingParams(max_tokens=0, temperature=0, logprobs=2, echo=True))]
    )
    assert r.choices[0].token_ids == [] and r.choices[0].finish_reason == "length"
    scored = r.prompt_logprobs
    assert [e.token for e in scored] == PROMPT
    assert scored[0].logprob is None and scored[0].top is None
    lp = teacher_forced(engine, PROMPT)
    for i in range(1, len(PROMPT)):
        assert scored[i].logprob == pytest.approx(lp[i - 1][PROMPT[i]], abs=1e-5)
        assert scored[i].top[0][1] == pytest.approx(lp[i - 1].max(), abs=1e-5)


def test_an_echo_request_batched_with_others_gives_the_same_answers(engine):
    others = [
        GenerationRequest([1, 50 + i, 60], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
        for i in range(3)
    ]
    echo = GenerationRequest(
        PROMPT, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=1, echo=True)
    )
    together = engine.generate(others[:2] + [echo] + others[2:])
    alone = [engine.generate([g])[0] for g in others[:2] + [echo] + others[2:]]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert [e.logprob for e in together[2].prompt_logprobs[1:]] == pytest.approx(
        [e.logprob for e in alone[2].prompt_logprobs[1:]], abs=1e-5
    )


def test_a_long_echo_prompt_is_scored_in_chunks_with_the_one_pass_answers(engine, monkeypatch):
    # Given an engine that scores echoed prompts 16 tokens at a time, and a 100-token prompt
    prompt = [1] + [int(t) for t in np.random.default_rng(7).integers(3, 200, 99)]
    kept = []  # positions whose logits each prefill returned
    for name in ("prefill", "prefill_after"):
        run = getattr(engine.cache, name)
        monkeypatch.setattr(
            engine.cache, name, lambda *a, run=run, **kw: kept.append((out := run(*a, **kw)).shape[-2]) or out
        )
    monkeypatch.setattr(engine, "score_chunk", 16)
    # When it echoes the prompt's log-probabilities and then generates
    [r] = engine.generate(
        [GenerationRequest(prompt, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=1, echo=True))]
    )
    monkeypatch.undo()
    # Then no prefill kept more than a chunk of logits, every prompt token is scored as in one pass,
    # and the text is that of a plain run
    assert kept == [16] * 6 + [4]  # ceil(100 / 16) chunks
    lp = teacher_forced(engine, prompt)
    assert [e.token for e in r.prompt_logprobs] == prompt and r.prompt_logprobs[0].logprob is None
    assert [e.logprob for e in r.prompt_logprobs[1:]] == pytest.approx(
        [lp[i - 1][prompt[i]] for i in range(1, 100)], abs=1e-4
    )
    [plain] = engine.generate([GenerationRequest(prompt, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))])
    assert r.token_ids == plain.token_ids


def test_n_choices_share_one_prefill_and_sample_with_seed_plus_i(engine):
    # Given n=4 seeded sampling
    params = dict(max_tokens=8, temperature=1.0, ignore_eos=True, seed=7)
    [r] = engine.generate([GenerationRequest(PROMPT, SamplingParams(n=4, **params))])
    # then choice i is what n=1 with seed 7 + i gives, and the usage counts every choice's tokens
    singles = [
        engine.generate([GenerationRequest(PROMPT, SamplingParams(**{**params, "seed": 7 + i}))])[0] for i in range(4)
    ]
    assert [c.token_ids for c in r.choices] == [s.token_ids for s in singles]
    assert len({tuple(c.token_ids) for c in r.choices}) > 1
    assert r.usage.prompt_tokens == len(PROMPT) and r.usage.completion_tokens == 32


def test_n_greedy_choices_are_identical_and_fill_the_batch_beside_others(engine):
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    single = engine.generate([GenerationRequest(PROMPT, greedy)])[0].token_ids
    got = engine.generate(
        [
            GenerationRequest([1, 2, 3], greedy),
            GenerationRequest(PROMPT, SamplingParams(n=5, max_tokens=6, temperature=0, ignore_eos=True)),
            GenerationRequest([1, 9], greedy),
        ]
    )
    assert [c.token_ids for c in got[1].choices] == [single] * 5
    assert got[0].token_ids == engine.generate([GenerationRequest([1, 2, 3], greedy)])[0].token_ids


def test_n_above_the_batch_is_refused(engine):
    with pytest.raises(InvalidRequest, match="n must be at most 8"):
        engine.submit(GenerationRequest(PROMPT, SamplingParams(n=9, max_tokens=4)))


def test_token_ids_outside_the_vocabulary_are_refused(engine):
    with pytest.raises(InvalidRequest, match="not in this model's vocabulary"):
        engine.check_token_ids([1, 10**6])


def test_logprobs_stop_at_a_stop_string(engine):
    free = engine.generate(
        [GenerationRequest(PROMPT, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=0))]
    )[0]
    text = free.text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    if not stop.strip():
        pytest.skip("the tiny model's text has no usable stop string here")
    cut = engine.generate(
        [
            GenerationRequest(
                PROMPT, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=0, stop=[stop])
            )
        ]
    )[0]
    entries = cut.choices[0].logprobs
    decode = engine.model.tokenizer.decode
    assert len(decode([e.token for e in entries])) >= len(cut.text)
    assert len(decode([e.token for e in entries[:-1]])) < len(cut.text) or not entries


# ---- the request contract --------------------------------------------------------------------------


def parse(route, **body):
    base = {"model": "m", **({"messages": [{"role": "user", "content": "hi"}]} if route == "chat" else {})}
    return parse_request(route, {**base, **body}, max_messages=8, max_tokens_limit=64)


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("hello", "hello"),
        (["hello"], "hello"),
        ([1, 2, 3], ((1, 2, 3),)),
        ([[1, 2], "two"], ((1, 2), "two")),
        (["a", "b"], ("a", "b")),
    ],
)
def test_prompts_as_text_token_ids_or_lists_of_either(prompt, expected):
    req = parse("completion", prompt=prompt)
    assert req.prompt == expected
    assert InferenceRequest.from_json(req.to_json()) == req


@pytest.mark.parametrize("prompt", [[], "", [[]], [1.5], [True], [[1], 2], [{"x": 1}], ["a"] * 17, [-1]])
def test_bad_prompts_are_refused_naming_the_field(prompt):
    with pytest.raises(InvalidRequest) as err:
        parse("completion", prompt=prompt)
    assert err.value.param == "prompt"


@pytest.mark.parametrize(
    "route, body, logprobs, echo",
    [
        ("chat", {"logprobs": True, "top_logprobs": 5}, 5, False),
        ("chat", {"logprobs": True}, 0, False),
        ("chat", {"logprobs": False}, None, False),
        ("completion", {"logprobs": 1, "echo": True, "max_tokens": 0}, 1, True),
        ("completion", {"logprobs": 0}, 0, False),
        ("completion", {"echo": True}, None, True),
    ],
)
def test_logprobs_and_echo_fields(route, body, logprobs, echo):
    p = parse(route, **({"prompt": "hi"} if route == "completion" else {}), **body).params
    assert (p.logprobs, p.echo) == (logprobs, echo)


@pytest.mark.parametrize(
    "route, body, param",
    [
        ("chat", {"top_logprobs": 2}, "top_logprobs"),
        ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("chat", {"logprobs": 3}, "logprobs"),
        ("chat", {"echo": True}, "echo"),
        ("completion", {"logprobs": 21}, "logprobs"),
        ("completion", {"logprobs": True}, "logprobs"),
        ("completion", {"top_logprobs": 2}, "top_logprobs"),
        ("completion", {"max_tokens": 0}, "max_tokens"),
        ("completion", {"n": 0}, "n"),
        ("completion", {"n": 4, "prompt": ["a", "b", "c", "d", "e"]}, "n"),
    ],
)
def test_bad_logprobs_echo_and_n_are_refused_naming_the_field(route, body, param):
    with pytest.raises(InvalidRequest) as err:
        parse(route, **{**({"prompt": "hi"} if route == "completion" else {}), **body})
    assert err.value.param == param


def test_streaming_serves_one_choice_without_echo():
    for body in ({"n": 2}, {"prompt": ["a", "b"]}, {"echo": True}):
        with pytest.raises(InvalidRequest, match="stream: true serves one choice"):
            parse_request(
                "completion",
                {"model": "m", "prompt": "hi", "stream": True, **body},
                max_messages=8,
                max_tokens_limit=64,
                streaming=True,
            )


def test_new_fields_at_their_defaults_keep_the_request_json():
    d = SamplingParams(temperature=0).to_json()
    assert not {"n", "logprobs", "echo"} & set(d)
    p = SamplingParams(n=3, logprobs=2, echo=True, max_tokens=0)
    assert SamplingParams.from_json(p.to_json()) == p


def test_completion_logprobs_shape():
    entries = [
        {"token": "Hel", "logprob": None, "bytes": [72, 101, 108], "top_logprobs": None},
        {
            "token": "lo",
            "logprob": -0.5,
            "bytes": [108, 111],
            "top_logprobs": [{"token": "lo", "logprob": -0.5, "bytes": [108, 111]}],
        },
    ]
    assert completion_logprobs(entries) == {
        "tokens": ["Hel", "lo"],
        "token_logprobs": [None, -0.5],
        "top_logprobs": [None, {"lo": -0.5}],
        "text_offset": [0, 3],
    }


def test_text_offsets_count_characters_not_token_pieces():
    # "é a" + "日本": é's two bytes and 日's three come split over tokens; each piece is "\ufffd" alone
    pieces = [b"\xc3", b"\xa9", b" a", b"\xe6\x97", b"\xa5\xe6", b"\x9c\xac"]
    entries = [
        {"token": p.decode("utf-8", "replace"), "logprob": -1.0, "bytes": list(p), "top_logprobs": None} for p in pieces
    ]
    text = b"".join(pieces).decode()
    assert text == "é a日本"
    offsets = completion_logprobs(entries)["text_offset"]
    assert offsets == [0, 0, 1, 3, 3, 4]  # each token's start: where its first whole character is
    # and a stream's chunks, sharing one TextOffsets, give the same offsets wherever they are split
    # (here inside 日, whose bytes come in two calls)
    for cut in range(len(entries) + 1):
        shared = TextOffsets()
        assert (
            completion_logprobs(entries[:cut], shared)["text_offset"]
            + completion_logprobs(entries[cut:], shared)["text_offset"]
        ) == offsets


def test_a_result_too_big_to_hold_is_refused_naming_what_to_lower():
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "logprobs": True}
    parse = lambda body: parse_request("chat", body, max_messages=8, max_tokens_limit=4096)
    # 16 choices x 4096 tokens x 21 entries: ~1.4 million, past the budget
    with pytest.raises(InvalidRequest) as err:
        parse({**chat, "n": 16, "max_tokens": 4096, "top_logprobs": 20})
    assert err.value.param == "logprobs" and "200,000" in err.value.message
    # one choice of the same is within it, as are 16 without alternatives
    assert parse({**chat, "max_tokens": 4096, "top_logprobs": 20}).params.logprobs == 20
    assert parse({**chat, "n": 16, "max_tokens": 4096, "logprobs": False}).params.n == 16
