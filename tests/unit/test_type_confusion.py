"""Every field of a request body, a batch line and a requests-queue message, given a value of the
wrong type or magnitude, is refused with InvalidRequest (a 400, an error line, an error reply): never
another exception, which would be a 500, a wedged batch slice or a message retried to the DLQ."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stratus.batches.lines import parse_line
from stratus.errors import InvalidRequest
from stratus.trigger import RequestMessage
from stratus.wire import parse_request

ODD = [None, True, -1, 1.5, 10**400, -(10**400), 1e308, "", "x", [], [1], ["a"], {}, {"a": 1}, [{}], [[1]]]
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
COMPLETION = {"model": "m", "prompt": "hi", "max_tokens": 4}
FIELDS = [
    "model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
    "repetition_penalty", "seed", "stop", "n", "logprobs", "top_logprobs", "echo", "logit_bias",
    "presence_penalty", "frequency_penalty", "response_format", "stream", "stream_options", "tools",
    "tool_choice", "functions", "function_call", "best_of", "suffix", "ignore_eos", "min_tokens",
    "audio", "modalities", "prediction", "web_search_options", "parallel_tool_calls", "service_tier",
]  # fmt: skip


def parse(route: str, body) -> None:
    try:
        parse_request(route, body, max_messages=8, max_tokens_limit=64, streaming=True)
    except InvalidRequest:
        pass


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("route, base", [("chat", CHAT), ("completion", COMPLETION)])
def test_a_body_field_of_any_type_is_refused_or_read(route, base, field):
    for value in ODD:
        parse(route, {**base, field: value})


@pytest.mark.parametrize("key", ["role", "content"])
def test_a_message_field_of_any_type_is_refused_or_read(key):
    for value in [*ODD, [{"type": "text", "text": 5}], [{"type": "text", "text": []}], [{"type": []}]]:
        parse("chat", {**CHAT, "messages": [{"role": "user", "content": "hi", key: value}]})
        parse("chat", {**CHAT, "messages": [value]})


@pytest.mark.parametrize(
    "schema_field", ["type", "json_schema", "schema", "name", "strict"]
)  # response_format's own fields
def test_a_response_format_of_any_shape_is_refused_or_read(schema_field):
    for value in ODD:
        fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
        target = fmt if schema_field == "type" else fmt["json_schema"]
        target[schema_field] = value
        parse("chat", {**CHAT, "response_format": fmt})


def line_of(**fields) -> str:
    return json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": CHAT, **fields})


@pytest.mark.parametrize("field", ["custom_id", "method", "url", "body"])
def test_a_batch_line_field_of_any_type_is_an_error_line(field):
    for value in ODD:
        try:
            _, route, body, _ = parse_line(line_of(**{field: value}), "m")
        except InvalidRequest:
            continue
        parse(route, body)


@pytest.mark.parametrize("field", ["recordId", "modelInput"])
def test_a_bedrock_record_field_of_any_type_is_an_error_line(field):
    for value in ODD:
        record = {"recordId": "r1", "modelInput": {"prompt": "hi", "max_gen_len": 4}, field: value}
        try:
            _, route, body, _ = parse_line(json.dumps(record), "m")
        except InvalidRequest:
            continue
        parse(route, body)


@pytest.mark.parametrize("field", ["id", "url", "body", "reply_to", "tenant"])
def test_a_queue_message_field_of_any_type_is_an_error_reply(field):
    for value in ODD:
        message = {"id": "o1", "url": "/v1/chat/completions", "body": CHAT, field: value}
        try:
            msg = RequestMessage.parse(json.dumps(message), default_tenant="queue", reply_pattern="*-replies*")
        except InvalidRequest:
            continue
        parse(msg.route, msg.body)


# ---- the same, property-based: any JSON value, nested anywhere, of any magnitude ----------------

JSON_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**500), max_value=10**500)
    | st.floats()  # NaN and ±Infinity included: Python's json reads them
    | st.text(max_size=12)
)
JSON = st.recursive(
    JSON_LEAVES,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(["role", "content", "type", "text", "name", "x"]), inner, max_size=3)
    ),
    max_leaves=8,
)


def mutate(data, base: dict, fields: list[str]) -> dict:
    """`base` with one field (or one field of its first message) given any JSON value."""
    body = json.loads(json.dumps(base))
    if "messages" in body and data.draw(st.booleans(), label="in a message"):
        body["messages"][0][data.draw(st.sampled_from(["role", "content", "name", "x"]), label="key")] = data.draw(JSON)
    else:
        body[data.draw(st.sampled_from(fields), label="field")] = data.draw(JSON, label="value")
    return body


def as_json(value) -> str:
    return json.dumps(value, allow_nan=True)


@settings(max_examples=400, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_any_json_in_a_body_a_batch_line_or_a_queue_message_is_read_or_refused(data):
    route, base = data.draw(st.sampled_from([("chat", CHAT), ("completion", COMPLETION)]), label="route")
    body = mutate(data, base, FIELDS)
    parse(route, json.loads(as_json(body)))  # (through text, as every path reads it)
    url = "/v1/chat/completions" if route == "chat" else "/v1/completions"
    try:
        _, line_route, line_body, _ = parse_line(
            as_json({"custom_id": "a", "method": "POST", "url": url, "body": body}), "m"
        )
        parse(line_route, line_body)
    except InvalidRequest:
        pass
    try:
        msg = RequestMessage.parse(
            as_json({"id": "o1", "url": url, "body": body}), default_tenant="queue", reply_pattern="*-replies*"
        )
        parse(msg.route, msg.body)
    except InvalidRequest:
        pass
