"""The trigger function (requests queue -> jobs) under moto, driven by events/trigger_request.json."""

from __future__ import annotations

import copy
import json

import boto3
import pytest

from stratus.contracts import Status
from stratus.jobstore import JobStore
from stratus_local.template import ROOT, LambdaContext, load_handler, load_template

EVENT = json.loads((ROOT / "events/trigger_request.json").read_text())


@pytest.fixture
def trigger(stack):
    handler, _ = load_handler(load_template(), "TriggerFunction")
    replies = stack.sqs.create_queue(QueueName="orders-replies")["QueueUrl"]

    def send(*messages: dict, receive_count: int = 1, ids: list[str] | None = None) -> dict:
        """Deliver messages (each with reply_to the test's reply queue unless it names one), their
        MessageIds m0, m1, ... (or `ids`), each delivered for the receive_count-th time."""
        event = copy.deepcopy(EVENT)
        template = event["Records"][0]
        event["Records"] = [
            {
                **template,
                "messageId": (ids or [f"m{i}" for i in range(len(messages))])[i],
                "attributes": {**template["attributes"], "ApproximateReceiveCount": str(receive_count)},
                "body": json.dumps({**m, "reply_to": replies} if "reply_to" not in m else m),
            }
            for i, m in enumerate(messages)
        ]
        return handler(event, LambdaContext())

    def replied() -> list[dict]:
        got = stack.sqs.receive_message(QueueUrl=replies, MaxNumberOfMessages=10).get("Messages", [])
        return [json.loads(m["Body"]) for m in got]

    return send, replied


def request(**body) -> dict:
    base = json.loads(EVENT["Records"][0]["body"])
    return {**base, "body": {**base["body"], **body}}


def test_a_request_message_becomes_a_watched_job(stack, trigger):
    send, replied = trigger
    assert send(request()) == {"batchItemFailures": []}
    [queued] = stack.queued()
    job = JobStore(stack.table).get(queued["job_id"])
    assert job.status == Status.QUEUED and job.tenant == "queue" and job.notify[0]["id"] == "order-42"
    assert replied() == []


def test_an_invalid_request_is_answered_with_an_error_and_not_retried(stack, trigger):
    send, replied = trigger
    assert send(request(max_tokens=0), {"id": "x", "url": "/v1/embeddings", "body": {}}) == {"batchItemFailures": []}
    # (each answered: a body refused, and, before the body was read, a message refused for its url)
    replies = {r["id"]: r for r in replied()}
    assert set(replies) == {"order-42", "x"} and {r["status"] for r in replies.values()} == {"FAILED"}
    assert "max_tokens" in replies["order-42"]["error"]["message"] and replies["x"]["error"]["param"] == "url"
    assert stack.queued() == []


def test_a_message_of_any_shape_is_answered_with_an_error_and_not_retried(stack, trigger):
    send, replied = trigger
    # Given messages with a list or an object for the url, and a number past float range in the body
    hot = request()
    hot["body"]["temperature"] = 10**400
    messages = [{**request(), "id": "list", "url": ["/v1/chat/completions"]}, {**request(), "id": "obj", "url": {}}]
    # Then each gets an error reply naming its field, and none is retried or queued
    assert send(*messages, {**hot, "id": "hot"}) == {"batchItemFailures": []}
    replies = {r["id"]: r["error"]["param"] for r in replied()}
    assert replies == {"list": "url", "obj": "url", "hot": "temperature"}
    assert stack.queued() == []


def test_a_refused_message_logs_no_request_value(stack, trigger, caplog):
    send, replied = trigger
    # Given a message whose bad field holds text of the request (error messages echo bad values)
    assert send(request(temperature="my secret plan")) == {"batchItemFailures": []}
    # Then its reply names the value, and the log does not
    assert "my secret plan" in replied()[0]["error"]["message"]
    refused = [r for r in caplog.records if r.getMessage() == "request message refused"]
    assert refused and not any("my secret plan" in str(vars(r)) for r in caplog.records)


def test_a_long_id_is_refused_and_a_job_keeps_a_bounded_list_of_replies(stack, trigger, monkeypatch):
    from stratus import jobstore

    send, replied = trigger
    # Given a message whose id is longer than any the job can keep
    assert send({**request(), "id": "x" * 257}) == {"batchItemFailures": []}
    assert stack.queued() == [] and replied()[0]["error"]["param"] == "id"  # (refused before any job)
    # and, with room for two reply addresses, three messages asking the same (greedy: one job)
    monkeypatch.setattr(jobstore, "MAX_REPLIES", 2)
    ids = [f"m{i}" for i in range(3)]
    assert send(*[{**request(temperature=0), "id": i} for i in ids], ids=ids) == {"batchItemFailures": []}
    # Then the first two wait for its result and the third is answered at once: send it again later
    [queued] = stack.queued()
    assert [r["id"] for r in JobStore(stack.table).get(queued["job_id"]).notify] == ["m0", "m1"]
    [refusal] = replied()
    assert refusal["id"] == "m2" and refusal["error"]["code"] == "rate_limit_exceeded"


def test_a_reply_queue_outside_the_allowed_pattern_is_refused(stack, trigger):
    send, _ = trigger
    assert send({**request(), "reply_to": "https://sqs.us-east-1.amazonaws.com/1/someone-elses-queue"}) == {
        "batchItemFailures": []
    }
    assert stack.queued() == []
    # and one that is not a string, whatever its text says (a list is refused, not read through str())
    assert send({**request(), "reply_to": ["https://sqs.us-east-1.amazonaws.com/1/x-replies"]}) == {
        "batchItemFailures": []
    }
    assert stack.queued() == []


def test_a_cached_result_is_replied_at_once(stack, trigger):
    send, replied = trigger
    send(request())
    [queued] = stack.queued()
    store = JobStore(stack.table)
    store.transition(queued["job_id"], [Status.QUEUED], Status.RUNNING, worker="w")
    store.complete(queued["job_id"], "w", {"text": "Shipped.", "finish_reason": "stop"})
    send({**request(), "id": "order-43"})
    [reply] = replied()
    assert reply["id"] == "order-43" and reply["response"]["choices"][0]["message"]["content"] == "Shipped."
    assert stack.queued() == []


def test_replies_survive_a_missing_queue_and_stay_under_the_sqs_limit(stack, trigger):
    from stratus.replies import post_replies

    send, replied = trigger
    send(request())
    [queued] = stack.queued()
    store = JobStore(stack.table)
    store.watch(queued["job_id"], {"queue_url": stack.refs["JobsQueue"] + "-gone", "id": "lost"})
    store.transition(queued["job_id"], [Status.QUEUED], Status.RUNNING, worker="w")
    done = store.complete(
        queued["job_id"],
        "w",
        {"text": "x" * 400_000, "finish_reason": "length"},
        s3=boto3.client("s3"),
        bucket=stack.refs["ResultsBucket"],
    )
    assert post_replies(done, sqs=stack.sqs, s3=boto3.client("s3"), store=store) == 1
    [reply] = replied()
    assert reply["status"] == "DONE" and "response" not in reply
    assert reply["response_omitted"].endswith(f"GET /v1/jobs/{queued['job_id']}")
    assert store.get(queued["job_id"]).notified


def test_a_message_with_a_lone_surrogate_gets_an_error_reply(stack, trigger):
    send, replied = trigger
    assert send(request(messages=[{"role": "user", "content": "a\ud800b"}])) == {"batchItemFailures": []}
    [reply] = replied()
    assert reply["status"] == "FAILED" and "lone UTF-16 surrogate" in reply["error"]["message"]
    assert stack.queued() == []


def test_a_message_too_big_to_queue_gets_a_413_reply(stack, trigger):
    send, replied = trigger
    assert send(request(messages=[{"role": "user", "content": "é" * 50_000}])) == {"batchItemFailures": []}
    [reply] = replied()
    assert reply["status"] == "FAILED" and reply["error"]["code"] == "request_too_large"
    assert stack.queued() == []


def test_a_requests_queue_serves_one_tenant(stack, trigger):
    # anyone who may send to this queue acts as its tenant (TriggerTenant), never as another
    send, replied = trigger
    assert send({**request(), "tenant": "acme"}) == {"batchItemFailures": []}
    assert stack.queued() == [] and replied() == []  # refused, and logged (no reply: the message was not trusted)
    assert send({**request(), "tenant": "queue"}) == {"batchItemFailures": []}
    [queued] = stack.queued()
    assert queued["tenant"] == "queue"


def test_a_message_takes_the_same_openai_fields_as_the_api(stack, trigger):
    # logprobs, n and response_format reach the job (and its cache key) exactly as through the API
    send, _ = trigger
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "object"}}}
    assert send(request(logprobs=True, top_logprobs=3, n=2, response_format=fmt, seed=1)) == {"batchItemFailures": []}
    assert send(request(seed=1)) == {"batchItemFailures": []}
    first, plain = stack.queued()
    p = JobStore(stack.table).get(first["job_id"]).request.params
    assert (p.logprobs, p.n, p.json_schema) == (3, 2, '{"type":"object"}')
    assert first["job_id"] != plain["job_id"]  # a different cache key


@pytest.mark.parametrize("sampled", [False, True], ids=["cacheable", "sampled"])
def test_a_redelivered_request_message_makes_one_job_and_one_reply(stack, trigger, sampled):
    # Given one request message delivered twice (SQS delivers at least once; same MessageId), the
    # first time in a batch with the second delivery failing at its watch, say
    send, replied = trigger
    msg = request(**({"temperature": 0.7} if sampled else {}))
    assert send(msg) == {"batchItemFailures": []}
    assert send(msg, receive_count=2) == {"batchItemFailures": []}
    messages = stack.queued()  # (the redelivery sent the QUEUED job's message again: workers run it once)
    assert len(messages) == 2 and len({m["job_id"] for m in messages}) == 1
    # Then one job was made, sampled or not, and it is watched once
    queued = messages[0]
    store = JobStore(stack.table)
    assert len(store.get(queued["job_id"]).notify) == 1
    # and its end posts one reply, not one per delivery
    store.transition(queued["job_id"], [Status.QUEUED], Status.RUNNING, worker="w")
    from stratus.replies import post_replies

    post_replies(
        store.complete(queued["job_id"], "w", {"text": "Shipped.", "finish_reason": "stop"}),
        sqs=stack.sqs,
        s3=boto3.client("s3"),
        store=store,
    )
    assert [r["id"] for r in replied()] == ["order-42"]


def test_a_reply_that_fails_for_a_passing_reason_is_posted_when_its_message_comes_back(stack, trigger, monkeypatch):
    from botocore.exceptions import ClientError

    from stratus.replies import post_replies
    from support.faults import aws_error, failing_first

    send, replied = trigger
    send(request())
    [queued] = stack.queued()
    store = JobStore(stack.table)
    store.transition(queued["job_id"], [Status.QUEUED], Status.RUNNING, worker="w")
    done = store.complete(queued["job_id"], "w", {"text": "Shipped.", "finish_reason": "stop"})
    # Given a reply queue that throttles once
    monkeypatch.setattr(
        stack.sqs,
        "send_message",
        failing_first(stack.sqs.send_message, aws_error("ThrottlingException", 400, "SendMessage"), []),
    )
    # When the job's replies are posted: the failure is raised and the job is not marked notified
    with pytest.raises(ClientError):
        post_replies(done, sqs=stack.sqs, s3=boto3.client("s3"), store=store)
    assert not store.get(queued["job_id"]).notified
    # Then the next try (its message came back) posts it: the reply is not lost
    assert post_replies(store.get(queued["job_id"]), sqs=stack.sqs, s3=boto3.client("s3"), store=store) == 1
    assert [r["id"] for r in replied()] == ["order-42"]


@pytest.mark.parametrize("how", ["queue unavailable", "died before sending"])
def test_a_redelivery_after_a_first_delivery_that_failed_to_queue_its_job_queues_it(stack, trigger, monkeypatch, how):
    from stratus import submission

    send, replied = trigger
    msg = request(temperature=0.7)  # not cacheable: its job id comes from the message
    real = submission.send
    if how == "queue unavailable":  # the job FAILED (enqueue_failed), the message comes back

        def once(message, deps):
            monkeypatch.setattr(submission, "send", real)
            deps.sqs.send_message = lambda **kw: (_ for _ in ()).throw(RuntimeError("SQS is down"))
            try:
                return real(message, deps)
            finally:
                del deps.sqs.send_message

        monkeypatch.setattr(submission, "send", once)
        with pytest.raises(Exception, match="All records failed"):  # (Powertools: the whole batch failed)
            send(msg)
    else:  # the invocation died between making the job and sending its message

        def dies(message, deps):
            monkeypatch.setattr(submission, "send", real)
            raise SystemExit("the function timed out")

        monkeypatch.setattr(submission, "send", dies)
        with pytest.raises(SystemExit):
            send(msg)
    assert stack.queued() == []
    # When the message comes back: its job is queued, with a message (not FAILED for good)
    assert send(msg, receive_count=2) == {"batchItemFailures": []}
    [queued] = stack.queued()
    assert JobStore(stack.table).get(queued["job_id"]).status == Status.QUEUED and replied() == []


def test_two_messages_asking_the_same_thing_of_one_reply_queue_get_two_replies(stack, trigger):
    from stratus.replies import post_replies

    send, replied = trigger
    ask = {k: v for k, v in request().items() if k != "id"}  # (no id: the sender tells them apart by order)
    assert send(ask, ask) == {"batchItemFailures": []}
    [queued] = stack.queued()
    store = JobStore(stack.table)
    store.transition(queued["job_id"], [Status.QUEUED], Status.RUNNING, worker="w")
    post_replies(
        store.complete(queued["job_id"], "w", {"text": "Shipped.", "finish_reason": "stop"}),
        sqs=stack.sqs,
        s3=boto3.client("s3"),
        store=store,
    )
    assert len(replied()) == 2
