"""The API under a property-based fuzzer: schemathesis generates requests from GET /openapi.json's
document (stratus.openapi) and sends them to the api function's web app (asgi.py under uvicorn,
as the Lambda Web Adapter runs it) over moto. No worker runs: whole requests answer 202 after a
short wait, streams end with an in-band timeout. Every response must be below 500 and match the
document. Hypothesis is derandomized (a fixed seed), with a bounded number of examples per route.
"""

from __future__ import annotations

import json
import sys
import threading
import time

import boto3
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.specs.openapi.checks import positive_data_acceptance, unsupported_method

from stratus import tokenizer
from stratus.keys import create_key
from stratus.openapi import spec
from stratus.settings import Settings
from stratus_engine.artifact import publish
from stratus_local.serve import free_port
from stratus_local.template import ROOT, function_environment, load_template, parameter_defaults

EXAMPLES = 12  # per route


def _settings() -> Settings:
    template = load_template()
    refs = {**{n: "x" for n in template["Resources"]}, **parameter_defaults(template)}
    refs.update({(n, a): "x" for n in template["Resources"] for a in ("Arn", "QueueName")})
    return Settings.from_env(function_environment(template, "ApiFunction", refs))


schema = schemathesis.openapi.from_dict(spec(_settings()))
# A schema-violating body may be refused as too large (413) before its fields are read
schema.config.checks.negative_data_rejection.expected_statuses.append("413")


@pytest.fixture
def web_app(stack, tiny, monkeypatch):
    """asgi.py under uvicorn on loopback, against the stack's moto; short waits (no workers)."""
    import uvicorn

    model = tiny.dirs["int4"]  # the tokenizer routes read the published model's tokenizer files
    uri = publish(model, boto3.client("s3"), stack.refs["ResultsBucket"], only=tokenizer.FILES)
    for k, v in {
        "STRATUS_SYNC_WAIT_S": "0.2",
        "STRATUS_STREAM_MAX_S": "0.3",
        "STRATUS_POLL_INTERVAL_S": "0.05",
        "STRATUS_MODEL_URI": uri,
        "STRATUS_MODEL_DIGEST": json.loads((model / "manifest.json").read_text())["digest"],
    }.items():
        monkeypatch.setenv(k, v)
    from stratus.settings import get_settings

    get_settings.cache_clear()
    monkeypatch.syspath_prepend(str(ROOT / "functions/api"))
    for name in ("app", "asgi"):
        sys.modules.pop(name, None)
    import asgi

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(asgi.app, host="127.0.0.1", port=port, lifespan="on", log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    key = create_key(stack.table, "fuzz", rpm=1_000_000, tpm=1_000_000_000)
    yield f"http://127.0.0.1:{port}", key
    server.should_exit = True
    thread.join(timeout=10)
    for name in ("app", "asgi"):
        sys.modules.pop(name, None)


@schema.parametrize()
@settings(max_examples=EXAMPLES, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_input_gets_a_5xx_or_a_response_outside_the_document(case, web_app):
    base_url, key = web_app
    # Method routing is API Gateway's (a REST API answers an undeclared method itself, before the
    # function), so the function is not held to 405 for methods outside the document.
    # An upload's part is any binary to the document; that it must be UTF-8 JSON lines of batch
    # requests cannot be said there, so a PNG the fuzzer sends is rightly a 400.
    # Token ids must name tokens of the model's vocabulary, whose size the document (built from the
    # settings) does not know: an id past it is rightly a 400.
    # A limit on several fields together (a result's choices x max_tokens x (1 + logprobs), a named
    # tool_choice among the tools, unique function names, min_tokens <= max_tokens) cannot be said
    # there either: a 400 naming it is right.
    refused_by_content = ("POST /v1/files", "POST /detokenize")
    response = case.call(base_url=base_url, headers={"Authorization": f"Bearer {key}"})
    joint = response.status_code == 400 and any(
        limit in response.text
        for limit in (
            "a result holds at most",
            "tool_choice",
            "a second function named",
            "min_tokens must be",
            "cannot be combined with tools",
            "must be stored (store: true)",
            "characters as JSON in all",
        )
    )
    excluded = [unsupported_method]
    if case.operation.label in refused_by_content or joint:
        excluded.append(positive_data_acceptance)
    case.validate_response(response, excluded_checks=excluded)


def test_a_streamed_body_python_cannot_read_is_refused_not_a_500(web_app):
    # (the web app reads `stream` before anything else: an integer past 4,300 digits raised there)
    import urllib.error
    import urllib.request

    base_url, key = web_app
    raw = (
        '{"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}], "seed": ' + "1" * 5000 + "}"
    ).encode()
    for auth, expected in ((None, 401), (f"Bearer {key}", 400)):
        req = urllib.request.Request(
            f"{base_url}/v1/chat/completions",
            data=raw,
            method="POST",
            headers={"content-type": "application/json", **({"authorization": auth} if auth else {})},
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(req, timeout=10)
        assert refused.value.code == expected


def test_a_stream_flag_spelled_with_escapes_streams(web_app):
    import urllib.request

    from stratus.settings import get_settings

    base, key = web_app
    # Given a body whose "stream" key is spelled with a JSON escape (the same key to any JSON parser)
    model = get_settings().model_id
    raw = b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "\\u0073tream": true}' % model.encode()
    assert json.loads(raw)["stream"] is True
    request = urllib.request.Request(
        f"{base}/v1/chat/completions", raw, {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    )
    # Then it is streamed as "stream": true is (not answered whole: its events held until the end)
    with urllib.request.urlopen(request, timeout=30) as reply:
        assert reply.headers["content-type"].startswith("text/event-stream")
        assert reply.headers["transfer-encoding"] == "chunked" and reply.headers["content-length"] is None


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
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["role", "content", "x"]), inner, max_size=3)
    ),
    max_leaves=6,
)
EXTRA = ["stream", "n", "stop", "logprobs", "top_logprobs", "logit_bias", "response_format", "seed", "echo"]


def bodies(model: str) -> dict[str, dict]:
    """A valid body for every route that takes JSON."""
    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    return {
        "/v1/chat/completions": chat,
        "/v1/completions": {"model": model, "prompt": "hi", "max_tokens": 2},
        "/v1/jobs": chat,
        "/v1/batches": {"input_file_id": "q.jsonl", "endpoint": "/v1/chat/completions", "completion_window": "24h"},
        "/tokenize": {"model": model, "prompt": "hi"},
        "/detokenize": {"model": model, "tokens": [1, 2]},
    }


@pytest.fixture
def batch_file(stack, web_app):
    """A batch file of the fuzz tenant's, so POST /v1/batches gets past finding it."""
    from stratus.settings import get_settings

    line = {"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": bodies(get_settings().model_id)}
    boto3.client("s3").put_object(
        Bucket=stack.refs["ResultsBucket"], Key="batches/files/fuzz/q.jsonl", Body=json.dumps(line).encode()
    )


@settings(max_examples=150, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_any_json_value_in_any_field_of_any_route_is_never_a_5xx(web_app, batch_file, data):
    import urllib.error
    import urllib.request

    from stratus.settings import get_settings

    base_url, key = web_app
    routes = bodies(get_settings().model_id)
    path = data.draw(st.sampled_from(sorted(routes)), label="route")
    body = json.loads(json.dumps(routes[path]))
    body[data.draw(st.sampled_from(sorted(body) + EXTRA), label="field")] = data.draw(JSON, label="value")
    raw = json.dumps(body, allow_nan=True).encode()
    request = urllib.request.Request(
        f"{base_url}{path}", raw, {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            status, text = reply.status, reply.read().decode()
    except urllib.error.HTTPError as refused:
        status, text = refused.code, refused.read().decode()
    assert status < 500, (path, raw[:300], status, text[:300])
    if status >= 400:
        assert json.loads(text)["error"]["message"], text
