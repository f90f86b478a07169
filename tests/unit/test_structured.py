"""Structured output: response_format's JSON schema enforced while decoding (llguidance masks),
on the tiny model (seeded random weights: whatever it prefers, only schema-valid JSON can come out)."""

import json

import jsonschema
import pytest

from stratus.errors import InvalidRequest
from stratus.params import SamplingParams
from stratus.wire import parse_request
from stratus_engine.engine import Engine, GenerationRequest

SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["n", "ok", "tag", "name", "tags"],
    "properties": {
        "n": {"type": "integer", "minimum": 0, "maximum": 999},
        "ok": {"type": "boolean"},
        "tag": {"enum": ["red", "green"]},
        "name": {"type": "string", "maxLength": 6},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2},
    },
}


@pytest.fixture(scope="module")
def engine(tiny):
    return Engine.from_dir(tiny.dirs["int4"], threads=1, max_batch=8)


def guided(**kw):
    return SamplingParams(max_tokens=96, json_schema=json.dumps(SCHEMA), **kw)


def test_greedy_and_sampled_rows_all_produce_schema_valid_json(engine):
    # Given greedy, sampled (10 seeds, and n=3) and an unguided row in one batch
    reqs = [GenerationRequest([1, 40, 90], guided(temperature=0))]
    reqs += [GenerationRequest([1, 40 + i, 90], guided(temperature=1.0, seed=i)) for i in range(10)]
    reqs += [
        GenerationRequest([1, 7], guided(temperature=1.2, top_p=0.9, seed=99, n=3)),
        GenerationRequest([1, 40, 90], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)),
    ]
    results = engine.generate(reqs)
    # then every guided choice parses and validates, and ends because the document is complete
    for r in results[:-1]:
        for c in r.choices:
            jsonschema.validate(json.loads(c.text), SCHEMA)
            assert c.finish_reason == "stop"
    # and the unguided row beside them is what it is alone
    alone = engine.generate(
        [GenerationRequest([1, 40, 90], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))]
    )
    assert results[-1].token_ids == alone[0].token_ids


def test_json_object_gives_an_object(engine):
    [r] = engine.generate(
        [GenerationRequest([1, 40, 90], SamplingParams(max_tokens=64, temperature=0, json_schema='{"type":"object"}'))]
    )
    if r.finish_reason == "stop":
        assert isinstance(json.loads(r.text), dict)
    else:  # out of tokens mid-document: still a prefix of an object
        assert r.text.startswith("{")


def test_logprobs_of_guided_tokens_are_the_unmasked_models(engine):
    [r] = engine.generate([GenerationRequest([1, 40, 90], guided(temperature=0, logprobs=1))])
    first = r.choices[0].logprobs[0]
    assert first.token == r.token_ids[0]
    # "{" is forced by the grammar; its reported log-probability is the model's own, below 0
    assert first.logprob < 0 and first.top[0][1] >= first.logprob


def test_a_schema_that_cannot_be_compiled_is_refused_before_running(engine):
    with pytest.raises(InvalidRequest) as err:
        engine.check_request(3, SamplingParams(max_tokens=4, json_schema='{"$ref": "#/definitions/missing"}'))
    assert err.value.param == "response_format"


@pytest.mark.parametrize(
    "value, expected",
    [
        (None, ""),
        ({"type": "text"}, ""),
        ({"type": "json_object"}, '{"type":"object"}'),
        (
            {
                "type": "json_schema",
                "json_schema": {"name": "p", "schema": {"type": "object", "properties": {"b": {}, "a": {}}}},
            },
            '{"type":"object","properties":{"b":{},"a":{}}}',
        ),  # key order kept: it is the output's order
    ],
)
def test_response_format_shapes(value, expected):
    req = parse_request(
        "chat",
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "response_format": value},
        max_messages=8,
        max_tokens_limit=64,
    )
    assert req.params.json_schema == expected
    assert "json_schema" in req.params.to_json() if expected else "json_schema" not in req.params.to_json()


@pytest.mark.parametrize(
    "value",
    [
        {"type": "xml"},
        {"type": "json_schema"},
        {"type": "json_schema", "json_schema": 3},
        {"type": "json_schema", "json_schema": {"schema": []}},
        "json",
        [1],
        {"type": "json_schema", "json_schema": {"schema": {"enum": ["x" * 40_000]}}},
    ],
)
def test_bad_response_formats_are_refused_naming_the_field(value):
    with pytest.raises(InvalidRequest) as err:
        parse_request(
            "chat",
            {"model": "m", "messages": [{"role": "user", "content": "hi"}], "response_format": value},
            max_messages=8,
            max_tokens_limit=64,
        )
    assert err.value.param == "response_format"
