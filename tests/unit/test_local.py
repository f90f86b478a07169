"""Local mode's pure parts: what it reads from template.yaml and the event shapes it builds."""

import pytest

from stratus_local.gateway import http_routes, match, to_event
from stratus_local.sources import rate_seconds, subscriptions
from stratus_local.template import active, load_template, resolve


@pytest.fixture(scope="module")
def template():
    return load_template()


def test_routes_come_from_the_templates_http_api_events(template):
    routes = {r.key: r.function for r in http_routes(template)}
    assert routes["POST /v1/chat/completions"] == "ApiFunction"
    assert {"GET /v1/jobs/{id}", "DELETE /v1/jobs/{id}", "POST /v1/files", "GET /v1/files/{id}/content",
            "GET /v1/batches/{id}", "GET /health"} <= set(routes)
    route, params = match(http_routes(template), "GET", "/v1/files/file-abc/content")
    assert route.key == "GET /v1/files/{id}/content" and params == {"id": "file-abc"}
    assert match(http_routes(template), "PATCH", "/v1/jobs/x") is None
    assert match(http_routes(template), "GET", "/v1/jobs/a/b") is None


def test_a_request_becomes_a_payload_v2_event(template):
    route, params = match(http_routes(template), "GET", "/v1/jobs/j1")
    event = to_event(route, params, "GET", "/v1/jobs/j1?x=1", {"Authorization": "Bearer k"}, b"", "127.0.0.1")
    assert event["version"] == "2.0" and event["routeKey"] == "GET /v1/jobs/{id}"
    assert event["pathParameters"] == {"id": "j1"} and event["queryStringParameters"] == {"x": "1"}
    assert event["headers"] == {"authorization": "Bearer k"} and "body" not in event
    binary = to_event(route, params, "POST", "/v1/jobs/j1", {}, b"\xff\xfe", "127.0.0.1")
    assert binary["isBase64Encoded"] is True and binary["body"] == "//4="


def test_event_sources_follow_the_templates_conditions(template):
    by_default = {(s.function, s.kind) for s in subscriptions(active(template))}
    assert by_default == {("DlqFunction", "SQS"), ("TriggerFunction", "SQS"), ("BatchFunction", "EventBridgeRule"),
                          ("BatchFunction", "Schedule")}
    sagemaker = {(s.function, s.kind) for s in subscriptions(active(template, {"WorkerTarget": "sagemaker"}))}
    assert ("DispatchFunction", "SQS") in sagemaker


def test_schedules_and_references(template):
    assert rate_seconds("rate(1 minute)") == 60 and rate_seconds("rate(2 hours)") == 7200
    with pytest.raises(ValueError, match="unsupported schedule"):
        rate_seconds("cron(0 12 * * ? *)")
    refs = {"JobsTable": "t", ("JobsQueue", "Arn"): "arn:aws:sqs:us-east-1:0:q"}
    assert resolve({"A": {"Ref": "JobsTable"}, "B": [{"Fn::GetAtt": ["JobsQueue", "Arn"]}]}, refs) == {
        "A": "t", "B": ["arn:aws:sqs:us-east-1:0:q"]}


def test_the_cache_key_names_the_sampling_version(monkeypatch):
    from stratus import cache_key as ck
    from stratus.contracts import parse_request

    req = parse_request("chat", {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8},
                        max_messages=8, max_tokens_limit=64)
    before = ck.cache_key(req, model_digest="d", scope="t")
    monkeypatch.setattr(ck, "SAMPLING_VERSION", ck.SAMPLING_VERSION + 1)
    assert ck.cache_key(req, model_digest="d", scope="t") != before
