"""The api function driven by events/*.json under moto (resources from template.yaml)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time

import boto3
import pytest

from stratus.contracts import Status
from stratus.errors import InvalidRequest
from stratus.jobstore import JobStore
from stratus.keys import create_key, revoke_key
from stratus_local.template import ROOT, LambdaContext, apply_environment, load_handler, load_template
from support.faults import aws_error, failing_first

MODEL = "smollm2-135m-instruct-int4"
CHAT = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "What is the capital of France?"}],
    "temperature": 0,
    "max_tokens": 32,
}


@pytest.fixture
def key(stack):
    return create_key(stack.table, "acme", rpm=1000, tpm=1_000_000)


def finish(stack, job_id: str, text: str = "Paris.") -> None:
    """Play the worker: QUEUED -> RUNNING -> DONE with conditional writes."""
    store = JobStore(stack.table)
    assert store.transition(job_id, [Status.QUEUED], Status.RUNNING, worker="w1")
    s3, bucket = boto3.client("s3"), stack.refs["ResultsBucket"]
    assert not store.complete(job_id, "w2", {"text": "x"}, s3=s3, bucket=bucket)
    assert store.complete(
        job_id,
        "w1",
        {"text": text, "finish_reason": "stop"},
        s3=s3,
        bucket=bucket,
        usage={"prompt_tokens": 20, "completion_tokens": 3, "total_tokens": 23},
    )
    assert not store.transition(job_id, [Status.QUEUED, Status.RUNNING], Status.DONE, result={"text": "again"})


def test_health_and_models(stack, key):
    assert stack.call("api_health.json")[0] == 200
    status, body, _ = stack.call("api_models.json", key=key)
    assert status == 200 and body["data"][0]["id"] == MODEL


def test_a_model_is_retrieved_by_its_id_and_any_other_is_an_openai_404(stack, key):
    status, body, _ = stack.call("api_get_model.json", key=key, job_id=MODEL)
    assert status == 200 and body == stack.call("api_models.json", key=key)[1]["data"][0]
    status, body, _ = stack.call("api_get_model.json", key=key, job_id="gpt-4o")
    assert status == 404 and body["error"]["param"] == "model" and "gpt-4o" in body["error"]["message"]
    assert stack.call("api_get_model.json", key="sk-stratus-wrong", job_id=MODEL)[0] == 401


def test_missing_or_bad_key_is_401(stack, key):
    status, body, _ = stack.call("api_models.json", key="sk-stratus-wrong")
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    event = stack.event("api_models.json")
    del event["headers"]["authorization"]
    out = stack.handler(event, LambdaContext())
    assert out["statusCode"] == 401
    revoke_key(stack.table, key)
    stack.module.get_deps().key_cache.clear()  # a warm instance honours revocation within 30 s
    assert stack.call("api_models.json", key=key)[0] == 401


def test_keys_are_stored_hashed(stack, key):
    items = stack.table.scan()["Items"]
    assert not any(key in json.dumps(item, default=str) for item in items)


def test_miss_queues_then_202_then_poll_then_hit(stack, key):
    # Given an empty cache, when a greedy chat request arrives and no worker answers in time,
    # then it is queued once and answered 202 with where to poll.
    status, body, headers = stack.call("api_chat_completion.json", key=key, body=CHAT)
    assert status == 202 and body["status"] == "QUEUED"
    assert headers["location"] == f"/v1/jobs/{body['id']}" and headers["retry-after"] == "2"
    [msg] = stack.queued()
    assert msg["job_id"] == body["id"] and msg["tenant"] == "acme" and msg["deadline"] > msg["enqueued_at"]
    assert msg["request"]["messages"] == CHAT["messages"]
    # polling shows the job; a worker finishes it; the same request is then a cache hit
    assert stack.call("api_get_job.json", key=key, job_id=body["id"])[1]["status"] == "QUEUED"
    finish(stack, body["id"])
    status, job, _ = stack.call("api_get_job.json", key=key, job_id=body["id"])
    assert job["status"] == "DONE" and job["response"]["choices"][0]["message"]["content"] == "Paris."
    status, reply, headers = stack.call("api_chat_completion.json", key=key, body=CHAT)
    assert status == 200 and headers["x-stratus-cache"] == "hit"
    assert reply["object"] == "chat.completion" and reply["choices"][0]["message"]["content"] == "Paris."
    assert reply["usage"]["total_tokens"] == 23
    assert stack.queued() == []


def test_polls_read_a_job_without_its_prompt(stack, key, monkeypatch):
    # Given a queued job with a long prompt
    long = {**CHAT, "messages": [{"role": "user", "content": "word " * 20_000}]}
    job_id = stack.call("api_create_job.json", key=key, body=long)[1]["id"]
    table = stack.module.get_deps().table
    read, real = [], table.get_item

    def get_item(**kwargs):
        got = real(**kwargs)
        read.append(got.get("Item", {}))
        return got

    monkeypatch.setattr(table, "get_item", get_item)
    # When it is polled, and a whole request waits on it
    assert stack.call("api_get_job.json", key=key, job_id=job_id)[1]["status"] == "QUEUED"
    assert stack.call("api_chat_completion.json", key=key, body=long)[0] == 202
    # Then no read of the job carried its prompt (~100 KB a read)
    job_reads = [item for item in read if item.get("pk") == job_id]
    assert job_reads and not any("prompt" in item for item in job_reads)


def test_a_tenant_has_at_most_max_in_flight_requests_queued_or_running(stack, key, monkeypatch):
    deps = stack.module.get_deps()
    monkeypatch.setattr(deps, "settings", dataclasses.replace(deps.settings, max_in_flight=2))
    ask = lambda q: {**CHAT, "messages": [{"role": "user", "content": q}]}
    # Given a tenant with two requests queued
    first, second = (stack.call("api_create_job.json", key=key, body=ask(q))[1]["id"] for q in ("one?", "two?"))
    # When it sends a third: a 429 with Retry-After, nothing queued for it
    status, body, headers = stack.call("api_create_job.json", key=key, body=ask("three?"))
    assert status == 429 and body["error"]["code"] == "too_many_requests_in_flight" and headers["retry-after"] == "2"
    assert len(stack.queued()) == 2
    # but the same question as a queued one joins it (no new work), and another tenant is not held back
    assert stack.call("api_create_job.json", key=key, body=ask("one?"))[1]["id"] == first
    other = create_key(stack.table, "initech", rpm=100, tpm=100_000)
    assert stack.call("api_create_job.json", key=other, body=ask("three?"))[0] == 202
    # Then once one of its requests finishes, the third goes
    finish(stack, second)
    assert stack.call("api_create_job.json", key=key, body=ask("three?"))[0] == 202


def test_each_job_message_names_its_tenant_for_sqs_fair_queues(stack, key):
    # SQS fair queues keep a quiet tenant's dwell time low while another builds a backlog, if each
    # message's MessageGroupId names its tenant
    stack.call("api_create_job.json", key=key, body=CHAT)
    got = stack.sqs.receive_message(QueueUrl=stack.refs["JobsQueue"], MessageSystemAttributeNames=["All"])
    [message] = got["Messages"]
    assert message["Attributes"]["MessageGroupId"] == "acme"


def test_completion_route_and_wait_for_result(stack, key, monkeypatch):
    # Given a worker that finishes the job while the request waits, the request answers 200 (miss).
    body = {"model": MODEL, "prompt": "Once upon a time", "temperature": 0, "max_tokens": 8}
    real_sleep = stack.module.get_deps().sleep

    def worker_finishes(seconds):
        for m in stack.queued():
            finish(stack, m["job_id"], " there was a cloud.")
        real_sleep(seconds)

    monkeypatch.setattr(stack.module.get_deps(), "sleep", worker_finishes)
    monkeypatch.setattr(stack.module.get_deps(), "waker", None)  # (no wake queue: it re-reads, sleeping between)
    status, reply, headers = stack.call("api_completion.json", key=key, body=body)
    assert status == 200 and headers["x-stratus-cache"] == "miss"
    assert reply["object"] == "text_completion" and reply["choices"][0]["text"] == " there was a cloud."


def test_no_cache_refreshes_and_no_store_does_not_keep(stack, key):
    _, first, _ = stack.call("api_chat_completion.json", key=key, body=CHAT)
    stack.queued()
    finish(stack, first["id"])
    status, again, _ = stack.call("api_chat_completion.json", key=key, body=CHAT, headers={"cache-control": "no-cache"})
    assert status == 202 and again["id"] == first["id"] and len(stack.queued()) == 1  # regenerated in place
    status, other, _ = stack.call("api_chat_completion.json", key=key, body=CHAT, headers={"cache-control": "no-store"})
    assert status == 202 and other["id"] != first["id"] and other["id"].startswith("j")


def test_a_short_cache_ttl_never_drops_a_job_before_its_deadline(stack, key, monkeypatch):
    import dataclasses

    deps = stack.module.get_deps()
    monkeypatch.setattr(deps, "settings", dataclasses.replace(deps.settings, cache_ttl_s=1))
    _, reply, _ = stack.call("api_chat_completion.json", key=key, body=CHAT)
    job = JobStore(stack.table).get(reply["id"])
    assert job.expires_at >= job.created_at + deps.settings.job_deadline_s + 3600 - 1  # still there to run and poll


def test_sampling_without_seed_is_not_cached(stack, key):
    body = {**CHAT, "temperature": 0.8}
    ids = {stack.call("api_chat_completion.json", key=key, body=body)[1]["id"] for _ in range(2)}
    assert len(ids) == 2 and len(stack.queued()) == 2


@pytest.mark.parametrize(
    "change",
    [
        {"temperature": 0.5, "seed": 1},
        {"seed": 2},
        {"top_p": 0.9},
        {"top_k": 5},
        {"max_tokens": 31},
        {"stop": ["\n"]},
        {"repetition_penalty": 1.1},
        {"messages": [{"role": "user", "content": "What is the capital of Spain?"}]},
        {"messages": [{"role": "system", "content": "Be brief."}, *CHAT["messages"]]},
    ],
)
def test_every_parameter_is_in_the_cache_key(stack, key, change):
    base = stack.call("api_chat_completion.json", key=key, body=CHAT)[1]["id"]
    changed = stack.call("api_chat_completion.json", key=key, body={**CHAT, **change})[1]["id"]
    assert changed != base


def test_tenants_are_isolated(stack, key):
    other = create_key(stack.table, "globex", rpm=1000, tpm=1_000_000)
    _, mine, _ = stack.call("api_chat_completion.json", key=key, body=CHAT)
    finish(stack, mine["id"])
    status, body, _ = stack.call("api_get_job.json", key=other, job_id=mine["id"])
    assert status == 404 and body["error"]["code"] == "not_found"
    status, theirs, _headers = stack.call("api_chat_completion.json", key=other, body=CHAT)
    assert status == 202 and theirs["id"] != mine["id"]  # same request, their own cache scope


def test_20_concurrent_identical_misses_queue_one_job(stack, key, monkeypatch):
    # 20 Lambda instances (each its own module, resolver and clients) get the same request at once.
    # In-process moto evaluates a write's condition and applies the write without a lock, so two
    # threads can both pass "attribute_not_exists" (and a rate-limit condition can see `requests`
    # without `tokens`): DynamoDB serializes writes to an item. Here each conditional write takes
    # its turn, as DynamoDB's would; the 20 handlers around them stay concurrent.
    import stratus.keys
    import stratus.submission

    turn, real_charge, real_create = threading.Lock(), stratus.keys.charge, JobStore.create

    def charge_in_turn(*args, **kwargs):
        with turn:
            return real_charge(*args, **kwargs)

    def create_in_turn(self, *args, **kwargs):
        with turn:
            return real_create(self, *args, **kwargs)

    monkeypatch.setattr(stratus.submission, "charge", charge_in_turn)
    monkeypatch.setattr(JobStore, "create", create_in_turn)
    results = []
    barrier = threading.Barrier(20)
    loaded = [load_handler(load_template(), "ApiFunction") for _ in range(20)]
    instances = [handler for handler, _ in loaded]

    def call(handler):
        event = stack.event("api_chat_completion.json", key=key, body=CHAT)
        barrier.wait()
        out = handler(event, LambdaContext())
        results.append((out["statusCode"], json.loads(out["body"]), out.get("headers", {})))

    threads = [threading.Thread(target=call, args=(h,)) for h in instances]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for _, module in loaded:
        module.shut_down()
    assert {status for status, _, _ in results} == {202}
    assert len({body["id"] for _, body, _ in results}) == 1
    assert len(stack.queued()) == 1


def test_cancel_a_queued_job(stack, key):
    _, job, _ = stack.call("api_create_job.json", key=key)
    status, body, _ = stack.call("api_cancel_job.json", key=key, job_id=job["id"])
    assert status == 200 and body["status"] == "CANCELLED"
    status, body, _ = stack.call("api_cancel_job.json", key=key, job_id=job["id"])
    assert status == 409 and "already CANCELLED" in body["error"]["message"]
    status, body, _ = stack.call("api_get_job.json", key=key, job_id=job["id"])
    assert body["status"] == "CANCELLED"


def test_jobs_route_is_always_async(stack, key):
    status, body, headers = stack.call("api_create_job.json", key=key)
    assert status == 202 and body["endpoint"] == "/v1/chat/completions" and "location" in headers


def within_one_minute(margin_s: float = 15.0) -> None:
    """Limits count per clock minute: start a rate-limit test early in one, so its requests
    are not split across two counters at a minute boundary."""
    if time.time() % 60 > 60 - margin_s:
        time.sleep(60 - time.time() % 60 + 0.1)


def test_rate_limit_is_429_with_retry_after(stack):
    within_one_minute()
    slow = create_key(stack.table, "tiny-tenant", rpm=2, tpm=1_000_000)
    for _ in range(2):
        assert stack.call("api_create_job.json", key=slow)[0] == 202
    status, body, headers = stack.call("api_create_job.json", key=slow)
    assert status == 429 and body["error"]["type"] == "rate_limit_error"
    assert 1 <= int(headers["retry-after"]) <= 60
    # and a key allowed no requests gets none, not even the first of each minute
    none = create_key(stack.table, "suspended", rpm=0, tpm=1_000_000)
    assert stack.call("api_create_job.json", key=none)[0] == 429


def test_cache_hits_are_not_charged_to_the_tenant(stack):
    # Given a tenant allowed 2 requests a minute whose first request has finished,
    # then repeating it (a hit) costs nothing, and the second miss still fits the limit.
    within_one_minute()
    slow = create_key(stack.table, "tiny-tenant", rpm=2, tpm=1_000_000)
    status, first, _ = stack.call("api_chat_completion.json", key=slow, body=CHAT)
    finish(stack, first["id"])
    for _ in range(5):
        status, _, headers = stack.call("api_chat_completion.json", key=slow, body=CHAT)
        assert status == 200 and headers["x-stratus-cache"] == "hit"
    assert stack.call("api_create_job.json", key=slow)[0] == 202
    assert stack.call("api_create_job.json", key=slow)[0] == 429


def test_refusals_are_counted_by_status_and_reason(stack, key, capsys):
    stack.call("api_chat_completion.json", key=key, body={**CHAT, "n": 99})
    stack.call("api_chat_completion.json", key="sk-wrong", body=CHAT)
    for i in (3, 17):  # a message's index is not a series of its own
        bad = [{"role": "user", "content": "hi"}] * i + [{"role": "user", "content": 5}]
        stack.call("api_chat_completion.json", key=key, body={**CHAT, "messages": bad})
    blobs = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"Refused"' in line]
    reasons = {
        (b["status"], b["reason"])
        for b in blobs
        if b["_aws"]["CloudWatchMetrics"][0]["Metrics"][0]["Name"] == "Refused"
    }
    assert reasons == {("400", "bad_n"), ("401", "invalid_api_key"), ("400", "bad_messages[].content")}
    assert all(b["_aws"]["CloudWatchMetrics"][0]["Namespace"] == "Stratus" for b in blobs)


@pytest.mark.parametrize(
    "change,status,message",
    [
        ({"n": 17}, 400, "n must be an integer in [1, 16], got 17"),
        ({"stream": "yes"}, 400, "stream must be true or false"),
        ({"tools": [{"type": "function"}]}, 400, 'tools[0] must be {"type": "function", "function"'),
        ({"temperature": 3}, 400, "temperature must be in [0.0, 2.0], got 3"),
        ({"top_p": 1.5}, 400, "top_p must be in (0.0, 1.0], got 1.5"),
        ({"max_tokens": 0}, 400, "max_tokens must be an integer in [1, 4096], got 0"),
        ({"max_tokens": 5000}, 400, "max_tokens must be an integer in [1, 4096], got 5000"),
        ({"model": None}, 400, "model is required"),
        ({"model": "gpt-4"}, 404, "model 'gpt-4' does not exist"),
        ({"messages": []}, 400, "messages must be a non-empty list"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role must be one of"),
        (
            {"messages": [{"role": "user", "content": "x"}] * 300},
            400,
            "messages must have at most 256 entries, got 300",
        ),
    ],
)
def test_validation_errors_name_the_field(stack, key, change, status, message):
    got, body, _ = stack.call("api_chat_completion.json", key=key, body={**CHAT, **change})
    assert got == status and message in body["error"]["message"]
    assert set(body["error"]) == {"message", "type", "param", "code"}


def test_bad_json_and_oversized_bodies(stack, key):
    status, body, _ = stack.call("api_chat_completion.json", key=key, body="{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    huge = {**CHAT, "messages": [{"role": "user", "content": "x" * 1_100_000}]}
    status, body, _ = stack.call("api_chat_completion.json", key=key, body=huge)
    assert status == 413 and body["error"]["code"] == "request_too_large"


@pytest.mark.parametrize("depth", [129, 5_000])  # past MAX_JSON_DEPTH; past Python's own recursion limit
def test_json_nested_too_deep_is_a_400(stack, key, depth):
    raw = '{"model": "m", "messages": ' + "[" * depth + "]" * depth + "}"
    for event in ("api_chat_completion.json", "api_create_job.json"):
        status, body, _ = stack.call(event, key=key, body=raw)
        assert status == 400 and "nests arrays and objects more than 128 deep" in body["error"]["message"]
    ok = '{"model": "m", "messages": ' + "[" * 100 + "]" * 100 + "}"  # deep but allowed: refused for its content
    status, body, _ = stack.call("api_chat_completion.json", key=key, body=ok)
    assert status in (400, 404) and "deep" not in body["error"]["message"]


def test_an_integer_too_long_to_read_is_a_400(stack, key):
    # (json.loads refuses integers past 4,300 digits with a ValueError, which must not become a 500)
    raw = '{"model": "m", "messages": [{"role": "user", "content": "hi"}], "seed": ' + "1" * 5000 + "}"
    for event in ("api_chat_completion.json", "api_create_job.json"):
        status, body, _ = stack.call(event, key=key, body=raw)
        assert status == 400 and "not valid JSON here" in body["error"]["message"]


@pytest.mark.parametrize("field", ["temperature", "top_p", "frequency_penalty"])
def test_a_number_past_float_range_is_a_400_naming_the_field(stack, key, field):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], field: 10**400}  # a valid JSON integer
    raw = json.dumps(body)
    for event in ("api_chat_completion.json", "api_create_job.json"):
        status, body, _ = stack.call(event, key=key, body=raw)
        assert status == 400 and body["error"]["param"] == field
        assert len(body["error"]["message"]) < 200  # the number is named, not echoed whole


def test_keys_cli_creates_a_working_key_and_revokes_it(stack, capsys):
    from stratus_cli.main import main as stratus

    assert stratus(["keys", "create", "--tenant", "initech", "--rpm", "5"]) == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith("sk-stratus-")
    assert stack.call("api_models.json", key=key)[0] == 200
    assert stratus(["keys", "revoke", key]) == 0
    stack.module.get_deps().key_cache.clear()
    assert stack.call("api_models.json", key=key)[0] == 401
    assert stratus(["keys", "revoke", key + "x"]) == 2
    # and --batch-tpm gives the tenant a batch budget of its own
    assert stratus(["keys", "create", "--tenant", "initech", "--batch-tpm", "5000"]) == 0
    assert stack.table.get_item(Key={"pk": "tenant#initech"})["Item"]["batch_tpm"] == 5000
    assert stratus(["keys", "create", "--tenant", "initech", "--batch-tpm", "0"]) == 2


def test_invoke_runs_a_handler_on_an_event_file(stack, key, tmp_path, capsys):
    # What `sam local invoke` does, without Docker: the same handler, an events/ file, the stack's env.
    from stratus_cli.main import main as stratus

    event = stack.event("api_models.json", key=key)
    path = tmp_path / "event.json"
    path.write_text(json.dumps(event))
    assert stratus(["invoke", "api", "--event", str(path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["statusCode"] == 200 and json.loads(out["body"])["data"][0]["id"] == MODEL
    # and a route that logs and publishes metrics still prints the response alone on stdout
    path.write_text(json.dumps(stack.event("api_create_job.json", key=key)))  # (queued: 202 at once)
    assert stratus(["invoke", "api", "--event", str(path)]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["statusCode"] == 202 and '"CloudWatchMetrics"' in captured.err
    assert stratus(["invoke", "nope", "--event", str(path)]) == 2


def test_key_lookups_are_cached_for_30_seconds(stack, key):
    from stratus.errors import Unauthorized
    from stratus.keys import authenticate

    cache: dict = {}
    assert authenticate(stack.table, f"Bearer {key}", cache, now=1000.0).name == "acme"
    revoke_key(stack.table, key)
    assert authenticate(stack.table, f"Bearer {key}", cache, now=1029.0).name == "acme"
    with pytest.raises(Unauthorized):
        authenticate(stack.table, f"Bearer {key}", cache, now=1031.0)


def test_a_prompt_that_cannot_fit_the_context_is_400(stack, key):
    # 300,000 bytes is at least 9,375 tokens: more than the 8,192-token context whatever the tokenizer does
    body = {**CHAT, "messages": [{"role": "user", "content": "word " * 60_000}]}
    status, reply, _ = stack.call("api_chat_completion.json", key=key, body=body)
    assert status == 400 and "exceeds the model's context length of 8192" in reply["error"]["message"]


def test_a_failed_job_answers_with_its_error(stack, key, monkeypatch):
    # Given a worker that rejects the prompt as too long while the request waits,
    # then the caller gets that 400 error body, and polling shows the same error.
    error = {
        "message": "prompt (9000 tokens) + max_tokens (32) exceeds the model's context length of 8192",
        "type": "invalid_request_error",
        "code": "context_length_exceeded",
    }
    real_sleep = stack.module.get_deps().sleep

    def worker_rejects(seconds):
        for m in stack.queued():
            JobStore(stack.table).transition(m["job_id"], [Status.QUEUED], Status.FAILED, error=error)
        real_sleep(seconds)

    monkeypatch.setattr(stack.module.get_deps(), "sleep", worker_rejects)
    monkeypatch.setattr(stack.module.get_deps(), "waker", None)  # (no wake queue: it re-reads, sleeping between)
    status, body, _ = stack.call("api_chat_completion.json", key=key, body=CHAT)
    assert status == 400 and body["error"] == {**error, "param": None}
    job_id = next(i["pk"] for i in stack.table.scan()["Items"] if i.get("status") == "FAILED")
    status, view, _ = stack.call("api_get_job.json", key=key, job_id=job_id)
    assert status == 200 and view["status"] == "FAILED" and view["error"] == error


def test_results_too_big_for_an_item_go_to_s3(stack, key):
    # Given a result over 300 KB, the item keeps an S3 pointer and callers still get the full text.
    _, job, _ = stack.call("api_chat_completion.json", key=key, body=CHAT)
    big = "cloud " * 80_000  # 480 KB
    finish(stack, job["id"], big)
    item = stack.table.get_item(Key={"pk": job["id"]})["Item"]
    assert "result" not in item and item["result_s3"] == f"s3://{stack.refs['ResultsBucket']}/results/{job['id']}.json"
    status, view, _ = stack.call("api_get_job.json", key=key, job_id=job["id"])
    assert status == 200 and view["response"]["choices"][0]["message"]["content"] == big
    status, reply, headers = stack.call("api_chat_completion.json", key=key, body=CHAT)
    assert headers["x-stratus-cache"] == "hit" and reply["choices"][0]["message"]["content"] == big


def test_shared_cache_lets_tenants_meet_on_one_job(stack, key, monkeypatch):
    # Given SharedCache=true, a second tenant's identical request coalesces on the first one's job,
    # reads its result, but cannot cancel it.
    monkeypatch.setenv("STRATUS_SHARED_CACHE", "true")
    apply_environment({})  # a new cold start reads the setting
    stack.module.get_deps.cache_clear()
    other = create_key(stack.table, "globex", rpm=1000, tpm=1_000_000)
    _, mine, _ = stack.call("api_chat_completion.json", key=key, body=CHAT)
    status, theirs, _ = stack.call("api_chat_completion.json", key=other, body=CHAT)
    assert status == 202 and theirs["id"] == mine["id"] and len(stack.queued()) == 1
    assert stack.call("api_cancel_job.json", key=other, job_id=mine["id"])[0] == 404
    finish(stack, mine["id"])
    status, _reply, headers = stack.call("api_chat_completion.json", key=other, body=CHAT)
    assert status == 200 and headers["x-stratus-cache"] == "hit"


def test_a_cancel_checked_against_one_tenants_job_never_cancels_anothers_made_since(stack, key, monkeypatch):
    # Given SharedCache=true and a job its tenant cancelled, which another tenant's identical request
    # then made again under the same id
    from stratus import service

    monkeypatch.setenv("STRATUS_SHARED_CACHE", "true")
    apply_environment({})
    stack.module.get_deps.cache_clear()
    other = create_key(stack.table, "globex", rpm=1000, tpm=1_000_000)
    _, mine, _ = stack.call("api_create_job.json", key=key, body=CHAT)
    assert stack.call("api_cancel_job.json", key=key, job_id=mine["id"])[0] == 200
    store, checked = JobStore(stack.table), service.get_job

    def made_again_after_the_check(job_id, tenant, deps, **kw):
        job = checked(job_id, tenant, deps, **kw)  # the first tenant's own (cancelled) job passes the check
        assert stack.call("api_create_job.json", key=other, body=CHAT)[1]["id"] == job_id
        monkeypatch.setattr(service, "get_job", checked)
        return job

    # When the first tenant's second DELETE is checked just before the other's request makes it again
    monkeypatch.setattr(service, "get_job", made_again_after_the_check)
    status, _, _ = stack.call("api_cancel_job.json", key=key, job_id=mine["id"])
    # Then the other tenant's job stays QUEUED, not cancelled by a tenant that no longer owns the id
    job = store.get(mine["id"])
    assert status in (404, 409) and job.status == Status.QUEUED and job.tenant == "globex"


@pytest.mark.parametrize(
    "change, where",
    [
        ({"messages": [{"role": "user", "content": "a\ud800b"}]}, "messages[0].content"),
        ({"stop": ["x\udfff"]}, "stop[0]"),
        ({"metadata": {"k\ud801": "v"}}, "metadata (a key)"),
    ],
)
def test_text_that_is_valid_json_but_not_unicode_is_a_400(stack, key, change, where):
    # json.dumps escapes a lone surrogate as \ud800: valid JSON that no UTF-8 encoder accepts
    status, body, _ = stack.call("api_chat_completion.json", key=key, body={**CHAT, **change})
    assert status == 400 and where in body["error"]["message"] and "lone UTF-16 surrogate" in body["error"]["message"]
    status, body, _ = stack.call("api_create_job.json", key=key, body={**CHAT, **change})
    assert status == 400


@pytest.mark.parametrize(
    "job_id",
    ["batch#batch_0123456789abcdef01234567", "key#" + "0" * 64, "c" + "0" * 63, "j" + "Z" * 32, "rl#acme#29000000"],
)
def test_ids_of_another_shape_are_404_without_a_read(stack, key, job_id, monkeypatch):
    reads = []
    deps = stack.module.get_deps()
    monkeypatch.setattr(deps.store, "get", lambda *a, **kw: reads.append(a) or None)
    for event in ("api_get_job.json", "api_cancel_job.json"):
        status, body, _ = stack.call(event, key=key, job_id=job_id)
        assert status == 404 and body["error"]["code"] == "not_found", body
    status, _, _ = stack.call("api_get_batch.json", key=key, job_id=job_id)
    assert status == 404 and reads == []


@pytest.mark.parametrize("content", ["é" * 50_000, "\U0001f600" * 25_000])  # stored as 6- and 12-byte escapes
def test_a_request_too_big_for_the_queue_or_the_item_is_a_413_before_anything_is_written(stack, key, content):
    body = {**CHAT, "messages": [{"role": "user", "content": content}], "max_tokens": 4}
    status, reply, _ = stack.call("api_chat_completion.json", key=key, body=body)
    assert status == 413 and reply["error"]["code"] == "request_too_large", reply
    assert "256 KiB" in reply["error"]["message"] or "400 KB" in reply["error"]["message"]
    assert stack.queued() == []
    items = [i for i in stack.table.scan()["Items"] if i["pk"].startswith(("c", "j"))]
    assert items == []  # no job item, no rate charge either (rl# items are not jobs)


def test_invoke_works_on_its_own_against_an_in_process_moto(tmp_path):
    # A newcomer's first command: no stack running, no env file, no credentials
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "STRATUS_"))}
    env["STRATUS_LOCAL_LOG_DIR"] = str(tmp_path / "logs")  # no running stack's state file there
    proc = subprocess.run(
        [sys.executable, "-m", "stratus_cli.main", "invoke", "api", "--event", str(ROOT / "events/api_models.json")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["statusCode"] == 200 and "in-process moto" in proc.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "stratus_cli.main", "invoke", "api", "--event", str(tmp_path / "none")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "cannot read the event" in bad.stderr


def test_a_warm_container_never_logs_a_request_under_the_last_ones_keys(stack, key):
    from stratus.observability import logger

    stack.call("api_create_job.json", key=key, body=CHAT)  # its log lines carry job_id and tenant
    assert {"job_id", "tenant"} <= set(logger.get_current_keys())
    stack.call("api_models.json", key="sk-wrong")  # the next invocation, refused before any job
    assert not {"job_id", "tenant"} & set(logger.get_current_keys())


def test_storage_that_cannot_be_reached_is_a_503_with_retry_after(stack, key, monkeypatch):
    from botocore.exceptions import ReadTimeoutError

    deps = stack.module.get_deps()

    def timeout(*_a, **_kw):
        raise ReadTimeoutError(endpoint_url="http://dynamodb")

    monkeypatch.setattr(deps.table, "get_item", timeout)
    status, body, headers = stack.call("api_chat_completion.json", key=key, body=CHAT)
    assert status == 503 and headers["retry-after"] == "2" and body["error"]["code"] == "service_unavailable"
    assert "dynamodb" not in body["error"]["message"]


def test_a_request_the_queue_could_not_take_costs_the_tenant_nothing(stack, monkeypatch):
    # Given a tenant allowed one request a minute, and a jobs queue that fails once
    within_one_minute()
    one = create_key(stack.table, "one-a-minute", rpm=1, tpm=1_000_000)
    deps = stack.module.get_deps()
    monkeypatch.setattr(
        deps.sqs,
        "send_message",
        failing_first(deps.sqs.send_message, aws_error("ServiceUnavailable", 503, "SendMessage"), []),
    )
    # When its request is a 503, then its retry is taken: the failed request did not use up the minute's one
    assert stack.call("api_create_job.json", key=one, body=CHAT)[0] == 503
    assert stack.call("api_create_job.json", key=one, body=CHAT)[0] == 202


def test_a_batch_tier_tenants_requests_wait_in_the_batch_queue_with_the_batch_window(stack):
    # Given a tenant whose key record puts it in the batch tier
    slow = create_key(stack.table, "nightly", rpm=100, tpm=1_000_000, tier="batch")
    status, _body, _ = stack.call("api_create_job.json", key=slow)
    # then its job waits in the batch tier's queue, expiring after a batch window, not the API deadline
    assert status == 202
    [msg] = stack.queued("BatchJobsQueue")
    assert stack.queued() == [] and msg["tier"] == "batch"
    assert msg["deadline"] - msg["enqueued_at"] == pytest.approx(86400)


def test_service_tier_flex_waits_in_the_batch_queue_and_says_so(stack, key):
    # Given an interactive tenant's request that asks for the flex tier
    status, body, _ = stack.call("api_create_job.json", key=key, body={**CHAT, "service_tier": "flex"})
    # then its job waits in the batch tier's queue, and the job shows the tier it runs in
    assert status == 202
    [msg] = stack.queued("BatchJobsQueue")
    assert stack.queued() == [] and msg["tier"] == "batch"
    assert JobStore(stack.table).get(body["id"]).tier == "batch"
    # while a tier OpenAI names but this server does not have is a 400, and "priority" is the key's own
    status, err, _ = stack.call("api_create_job.json", key=key, body={**CHAT, "service_tier": "turbo"})
    assert status == 400 and err["error"]["param"] == "service_tier"
    assert stack.call("api_create_job.json", key=key, body={**CHAT, "service_tier": "priority", "seed": 9})[0] == 202
    assert [m["tier"] for m in stack.queued()] == ["interactive"]


def test_a_key_tier_must_be_a_known_tier(stack):
    with pytest.raises(InvalidRequest, match="tier must be one of interactive, batch"):
        create_key(stack.table, "x", rpm=1, tpm=1, tier="urgent")


def test_an_interactive_request_joining_a_queued_batch_job_promotes_it(stack, key):
    from stratus import submission
    from stratus.deps import deps_from_env
    from stratus.keys import Tenant

    # Given a batch line's job waiting in the batch tier
    deps = deps_from_env()
    sub = submission.submit("chat", CHAT, Tenant("acme", 10**6, 10**9), deps, submission.batch_line(deps.settings))
    submission.send(sub.message, deps)
    assert JobStore(stack.table).get(sub.job_id).tier == "batch"
    # When the same request comes through the API (it coalesces on that job), twice
    for _ in range(2):
        status, body, _ = stack.call("api_create_job.json", key=key, body=CHAT)
        assert status == 202 and body["id"] == sub.job_id  # the live job it joined
    # Then one interactive message jumps the queue for it, and the job is interactive now
    [msg] = stack.queued()
    assert msg["job_id"] == sub.job_id and msg["tier"] == "interactive"
    assert JobStore(stack.table).get(sub.job_id).tier == "interactive"
    assert len(stack.queued("BatchJobsQueue")) == 1  # the batch message is dropped once the job has run
