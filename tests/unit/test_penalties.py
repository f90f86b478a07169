"""presence_penalty, frequency_penalty and logit_bias (OpenAI / vLLM semantics), checked against a
plain-Python reference, in the engine, and in the request contract."""

import numpy as np
import pytest

from stratus.errors import InvalidRequest
from stratus.params import SamplingParams
from stratus.wire import parse_request
from stratus_engine.engine import Engine, GenerationRequest
from stratus_engine.sampling import sample, sample_row


def reference(logits, params, generated):  # the documented formula, one token at a time
    x = [float(v) for v in logits]
    for t, b in params.logit_bias:
        x[t] += b
    for t in set(generated):
        x[t] -= params.frequency_penalty * generated.count(t) + params.presence_penalty
    return int(np.argmax(x))


@pytest.mark.parametrize("seed", range(20))
def test_penalties_and_bias_match_the_reference(seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=64).astype(np.float32)
    generated = [int(t) for t in rng.integers(0, 64, size=int(rng.integers(0, 12)))]
    params = SamplingParams(
        temperature=0,
        presence_penalty=float(rng.uniform(-2, 2)),
        frequency_penalty=float(rng.uniform(-2, 2)),
        logit_bias={str(int(t)): float(rng.uniform(-5, 5)) for t in rng.integers(0, 64, 3)},
    )
    got = sample_row(logits, params, np.zeros(0, np.int64), rng, generated)
    assert got == reference(logits, params, generated)
    # batched: each row keeps its own parameters and history
    rows = sample(
        np.stack([logits, logits]),
        [params, SamplingParams(temperature=0)],
        [np.zeros(0, np.int64)] * 2,
        [rng, rng],
        [generated, []],
    )
    assert rows == [got, int(np.argmax(logits))]


def test_defaults_leave_the_request_json_and_so_the_cache_key_unchanged():
    d = SamplingParams(temperature=0).to_json()
    assert not {"presence_penalty", "frequency_penalty", "logit_bias"} & set(d)
    p = SamplingParams(presence_penalty=0.5, logit_bias={"7": -100})
    assert SamplingParams.from_json(p.to_json()) == p


@pytest.mark.parametrize(
    "field, value",
    [
        ("presence_penalty", 2.5),
        ("frequency_penalty", -3),
        ("logit_bias", {"x": 1}),
        ("logit_bias", {"5": 101}),
        ("logit_bias", {"-1": 1}),
        ("logit_bias", [1]),
        ("logit_bias", {"5": 10**400}),  # a JSON integer past float range
        ("temperature", 10**400),
        ("top_p", 10**400),
        ("presence_penalty", -(10**400)),
        ("stop", "x" * 257),  # each stop string is matched against every flush of text: bounded
        ("stop", ["ok", "x" * 257]),
    ],
)
def test_out_of_range_values_are_refused_naming_the_field(field, value):
    with pytest.raises(InvalidRequest) as err:
        parse_request(
            "chat",
            {"model": "m", "messages": [{"role": "user", "content": "hi"}], field: value},
            max_messages=8,
            max_tokens_limit=64,
        )
    assert err.value.param == field


def test_the_developer_role_is_the_system_role():
    req = parse_request(
        "chat",
        {"model": "m", "messages": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "hi"}]},
        max_messages=8,
        max_tokens_limit=64,
    )
    assert req.messages[0]["role"] == "system"


@pytest.fixture(scope="module")
def engine(tiny):
    return Engine.from_dir(tiny.dirs["int8"], threads=1, max_batch=4)


def test_a_large_logit_bias_forces_its_token(engine):
    forced = 42
    [r] = engine.generate(
        [
            GenerationRequest(
                [1, 40, 90], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logit_bias={str(forced): 100})
            )
        ]
    )
    assert r.token_ids == [forced] * 8


def test_a_presence_penalty_stops_greedy_repetition(engine):
    base = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    [plain] = engine.generate([GenerationRequest([1, 40, 90], base)])
    [penalized] = engine.generate(
        [
            GenerationRequest(
                [1, 40, 90],
                SamplingParams(
                    max_tokens=24, temperature=0, ignore_eos=True, presence_penalty=2.0, frequency_penalty=2.0
                ),
            )
        ]
    )
    assert len(set(penalized.token_ids)) > len(set(plain.token_ids))


def test_a_logit_bias_outside_the_vocabulary_is_refused_by_the_engine(engine):
    with pytest.raises(InvalidRequest, match="vocabulary"):
        engine.submit(GenerationRequest([1, 40], SamplingParams(max_tokens=2, logit_bias={"999999": 1})))


def test_a_stop_string_of_the_longest_length_is_read():
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stop": ["x" * 256]}
    assert parse_request("chat", body, max_messages=8, max_tokens_limit=64).params.stop == ("x" * 256,)
