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
    assert {
        "GET /v1/jobs/{id}",
        "DELETE /v1/jobs/{id}",
        "POST /v1/files",
        "GET /v1/files/{id}/content",
        "GET /v1/batches/{id}",
        "GET /health",
    } <= set(routes)
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
    assert by_default == {
        ("DlqFunction", "SQS"),
        ("TriggerFunction", "SQS"),
        ("BatchFunction", "EventBridgeRule"),
        ("BatchFunction", "Schedule"),
    }
    sagemaker = {(s.function, s.kind) for s in subscriptions(active(template, {"WorkerTarget": "sagemaker"}))}
    assert ("DispatchFunction", "SQS") in sagemaker


def test_schedules_and_references(template):
    assert rate_seconds("rate(1 minute)") == 60 and rate_seconds("rate(2 hours)") == 7200
    with pytest.raises(ValueError, match="unsupported schedule"):
        rate_seconds("cron(0 12 * * ? *)")
    refs = {"JobsTable": "t", ("JobsQueue", "Arn"): "arn:aws:sqs:us-east-1:0:q"}
    assert resolve({"A": {"Ref": "JobsTable"}, "B": [{"Fn::GetAtt": ["JobsQueue", "Arn"]}]}, refs) == {
        "A": "t",
        "B": ["arn:aws:sqs:us-east-1:0:q"],
    }


def test_the_cache_key_names_the_sampling_version(monkeypatch):
    from stratus import cache_key as ck
    from stratus.wire import parse_request

    req = parse_request(
        "chat",
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8},
        max_messages=8,
        max_tokens_limit=64,
    )
    before = ck.cache_key(req, model_digest="d", scope="t")
    monkeypatch.setattr(ck, "SAMPLING_VERSION", ck.SAMPLING_VERSION + 1)
    assert ck.cache_key(req, model_digest="d", scope="t") != before


def _touch_racing_a_result(monkeypatch) -> str:
    """A worker's touch (RUNNING -> RUNNING if ours) passes its condition, then stalls inside moto
    while the same worker's result (RUNNING -> DONE if ours) is written -> the status at the end."""
    import threading
    import time

    import boto3
    from moto import mock_aws
    from moto.dynamodb.parsing.executors import UpdateExpressionExecutor

    from stratus.contracts import Job, Status
    from stratus.jobstore import JobStore
    from stratus.wire import parse_request

    execute = UpdateExpressionExecutor.execute

    def stall_the_touch(self, node=None):
        if node is None and threading.current_thread().name == "touch":
            time.sleep(0.2)  # past its condition check, before its update
        return execute(self, node)

    monkeypatch.setattr(UpdateExpressionExecutor, "execute", stall_the_touch)
    for k, v in {"AWS_DEFAULT_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "t", "AWS_SECRET_ACCESS_KEY": "t"}.items():
        monkeypatch.setenv(k, v)
    with mock_aws():
        table = boto3.resource("dynamodb").create_table(
            TableName="jobs",
            KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
            BillingMode="PAY_PER_REQUEST",
        )
        req = parse_request(
            "chat", {"model": "m", "messages": [{"role": "user", "content": "hi"}]}, max_messages=8, max_tokens_limit=64
        )
        table.put_item(
            Item=Job("c1", "acme", Status.RUNNING, req, True, created_at=0, expires_at=2**40, worker="w0").to_item()
        )
        store = JobStore(table)
        touched = []
        touch = threading.Thread(
            name="touch",
            target=lambda: touched.append(store.transition("c1", [Status.RUNNING], Status.RUNNING, owner="w0")),
        )
        touch.start()
        time.sleep(0.05)
        assert store.transition("c1", [Status.RUNNING], Status.DONE, owner="w0", result={"text": "hi"})
        touch.join()
        assert touched[0] is not None  # both writes passed their conditions
        return table.get_item(Key={"pk": "c1"})["Item"]["status"]


def test_moto_applies_each_dynamodb_write_atomically_as_dynamodb_does(monkeypatch):
    from moto.dynamodb.responses import DynamoHandler

    from stratus_local.moto_server import serialize_dynamodb

    serialize_dynamodb()  # what local mode's moto server and the test suite run under
    # Given a touch that stalls between its condition and its update, When the result is written
    # meanwhile, Then the result stays: the touch ran wholly before it
    assert _touch_racing_a_result(monkeypatch) == "DONE"
    # (moto alone lets the stalled touch overwrite it: the race the lock closes)
    monkeypatch.setattr(DynamoHandler, "call_action", DynamoHandler.call_action.__wrapped__)
    assert _touch_racing_a_result(monkeypatch) == "RUNNING"


@pytest.mark.parametrize("length", ["-1", "abc", "1e3"])
def test_the_gateway_answers_a_bad_content_length_with_a_400_at_once(template, length):
    import socket
    import threading

    from stratus_local.gateway import make_server

    # Given the local gateway (its function never reached)
    server = make_server("127.0.0.1", 0, http_routes(template), lambda fn, event: {"statusCode": 200, "body": "{}"})
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        # When a request says its body has a length that is not one
        with socket.create_connection(server.server_address, timeout=5) as s:
            s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n{{}}".encode())
            reply = s.recv(4096).decode()  # (a hang ends the test at the socket's timeout)
        # Then it is a 400 at once
        assert reply.startswith("HTTP/1.1 400 ")
    finally:
        server.shutdown()
        server.server_close()


def test_no_job_outlives_the_result_it_points_at(template):
    from stratus.submission import BATCH_KEEP_S, KEEP_AFTER_DEADLINE_S

    # A job is kept for the longest of its cache TTL and its deadline plus a margin; a result too big
    # for its item is under results/, which the bucket's lifecycle rule expires
    params = template["Parameters"]
    [rule] = [
        r
        for r in template["Resources"]["ResultsBucket"]["Properties"]["LifecycleConfiguration"]["Rules"]
        if r.get("Prefix") == "results/"
    ]
    kept = max(
        params["CacheTtlSeconds"]["MaxValue"],
        params["JobDeadlineSeconds"]["MaxValue"] + KEEP_AFTER_DEADLINE_S,
        params["BatchWindowSeconds"]["MaxValue"] + BATCH_KEEP_S,
    )
    assert kept < rule["ExpirationInDays"] * 86400


def test_an_ingest_lease_outlasts_the_batch_function(template):
    from stratus.settings import BatchLimits

    # A run holds a batch's lease for lease_s from each slice it starts; the function that runs it
    # stops at its timeout, so a live run's lease never lapses under it
    timeout = template["Resources"]["BatchFunction"]["Properties"]["Timeout"]
    assert BatchLimits().lease_s >= timeout


def test_an_interrupt_while_a_child_starts_is_raised_once_the_child_is_recorded():
    import os
    import signal
    import time

    from stratus_local.serve import _interrupt, _interrupts_held

    before = signal.signal(signal.SIGTERM, _interrupt)  # (as `stratus serve` sets it while starting)
    recorded = []
    try:
        with pytest.raises(KeyboardInterrupt), _interrupts_held():
            os.kill(os.getpid(), signal.SIGTERM)  # (between the fork and the record, say)
            time.sleep(0.05)
            recorded.append("worker-0")
        assert recorded == ["worker-0"] and signal.getsignal(signal.SIGTERM) is _interrupt
    finally:
        signal.signal(signal.SIGTERM, before)
