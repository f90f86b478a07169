"""The dispatch function (WorkerTarget=sagemaker): it hands jobs to the asynchronous endpoint and
sweeps the jobs the endpoint will never finish (stratus.reaper), under moto."""

from __future__ import annotations

import json
import time

import boto3
import pytest

from stratus.contracts import Status
from stratus.jobstore import DISPATCHED_INDEX, JobStore
from stratus_local.template import ROOT, LambdaContext, load_handler, load_template

MODEL = "smollm2-135m-instruct-int4"
SCHEDULE = json.loads((ROOT / "events" / "dispatch_schedule.json").read_text())


class Endpoint:
    """What the dispatch function hands SageMaker (the endpoint itself is not under moto)."""

    def __init__(self):
        self.calls = []

    def invoke_endpoint_async(self, **kwargs):
        self.calls.append(kwargs)
        return {"InferenceId": str(len(self.calls))}


@pytest.fixture
def dispatch(stack, key, monkeypatch):
    """-> (dispatch a queued job's message, sweep, the endpoint's calls)."""
    handler, module = load_handler(load_template(), "DispatchFunction")
    endpoint = Endpoint()
    monkeypatch.setattr(module, "sagemaker", lambda: endpoint)

    def job(prompt: str = "hello") -> dict:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 4, "temperature": 0}
        assert stack.call("api_create_job.json", key=key, body=body)[0] == 202
        [message] = stack.queued()
        record = {"messageId": f"m-{time.monotonic_ns()}", "body": json.dumps(message), "attributes": {}}
        record.update(receiptHandle="r", eventSource="aws:sqs", awsRegion="us-east-1", md5OfBody="x")
        out = handler({"Records": [record]}, LambdaContext())
        assert out == {"batchItemFailures": []}
        return message

    def sweep() -> dict:
        return handler(SCHEDULE, LambdaContext())

    return job, sweep, endpoint


def marked(stack) -> set[str]:
    return {
        i["pk"]
        for shard in range(8)
        for i in stack.table.query(
            IndexName=DISPATCHED_INDEX,
            KeyConditionExpression="dispatched = :s",
            ExpressionAttributeValues={":s": str(shard)},
        )["Items"]
    }


def quiet_for(stack, job_id: str, seconds: float) -> None:
    stack.table.update_item(
        Key={"pk": job_id},
        UpdateExpression="SET updated_at = :t",
        ExpressionAttributeValues={":t": int(time.time() - seconds)},
    )


def test_each_job_handed_over_is_marked_with_its_deadline(stack, dispatch):
    job, _, endpoint = dispatch
    message = job()
    [call] = endpoint.calls
    assert call["InputLocation"].endswith(f"sagemaker/in/{message['job_id']}/{call['InputLocation'].rsplit('/', 1)[1]}")
    item = stack.table.get_item(Key={"pk": message["job_id"]})["Item"]
    assert item["dispatch_deadline"] == int(message["deadline"]) and marked(stack) == {message["job_id"]}


def test_a_job_whose_instance_died_fails_with_its_replies_and_leaves_the_index(stack, dispatch):
    job, sweep, _ = dispatch
    store = JobStore(stack.table)
    replies = stack.sqs.create_queue(QueueName="acme-replies")["QueueUrl"]
    # Given two jobs an instance started: one went quiet three heartbeats ago, one beats on
    lost, alive = job("lost")["job_id"], job("alive")["job_id"]
    for job_id in (lost, alive):
        assert store.transition(job_id, [Status.QUEUED], Status.RUNNING, worker="sm-1")
    assert store.watch(lost, {"queue_url": replies, "id": "req-1"})
    quiet_for(stack, lost, 95)
    # When the sweep runs
    assert sweep() == {"failed": 1, "expired": 0, "live": 1, "errors": 0}
    # Then the quiet one is FAILED, says why, and its reply is posted; the other is untouched
    failed = store.get(lost)
    assert failed.status == Status.FAILED and failed.error["code"] == "worker_lost" and failed.notified
    [reply] = stack.sqs.receive_message(QueueUrl=replies).get("Messages", [])
    assert json.loads(reply["Body"])["id"] == "req-1" and json.loads(reply["Body"])["error"]["code"] == "worker_lost"
    assert store.get(alive).status == Status.RUNNING
    # and only the live one is still marked, so a sweep reads only jobs in flight
    assert marked(stack) == {alive}
    assert sweep() == {"failed": 0, "expired": 0, "live": 1, "errors": 0}


def test_a_job_the_endpoint_dropped_expires_after_its_deadline(stack, dispatch):
    job, sweep, _ = dispatch
    dropped = job("dropped")["job_id"]
    assert sweep()["live"] == 1  # within its deadline: the endpoint's own queue may still hold it
    stack.table.update_item(
        Key={"pk": dropped}, UpdateExpression="SET dispatch_deadline = :d", ExpressionAttributeValues={":d": 1}
    )
    assert sweep()["expired"] == 1
    assert JobStore(stack.table).get(dropped).status == Status.EXPIRED and marked(stack) == set()


def test_a_job_that_beats_between_the_index_and_the_write_is_left_running(stack, dispatch, monkeypatch):
    from stratus import reaper

    job, sweep, _ = dispatch
    store = JobStore(stack.table)
    slow = job("slow")["job_id"]
    store.transition(slow, [Status.QUEUED], Status.RUNNING, worker="sm-1")
    quiet_for(stack, slow, 95)
    real = reaper.marked

    def heartbeat_lands_meanwhile(table, shard):
        for seen in real(table, shard):
            quiet_for(stack, slow, 0)
            yield seen

    monkeypatch.setattr(reaper, "marked", heartbeat_lands_meanwhile)
    assert sweep()["failed"] == 0 and store.get(slow).status == Status.RUNNING


def test_replies_a_sweep_could_not_post_are_posted_by_the_next(stack, dispatch, monkeypatch):
    from stratus import replies

    job, sweep, _ = dispatch
    store = JobStore(stack.table)
    queue = stack.sqs.create_queue(QueueName="acme-replies")["QueueUrl"]
    lost = job("lost")["job_id"]
    store.transition(lost, [Status.QUEUED], Status.RUNNING, worker="sm-1")
    store.watch(lost, {"queue_url": queue, "id": "req-2"})
    quiet_for(stack, lost, 95)
    real = replies.send

    def throttled(*args, **kwargs):
        from botocore.exceptions import ClientError

        raise ClientError({"Error": {"Code": "ThrottlingException", "Message": "slow down"}}, "SendMessage")

    monkeypatch.setattr(replies, "send", throttled)
    assert sweep()["failed"] == 1 and not store.get(lost).notified and marked(stack) == {lost}
    # (and the next sweep, its reply queue still throttled, counts it an error and goes on)
    assert sweep()["errors"] == 1 and marked(stack) == {lost}
    monkeypatch.setattr(replies, "send", real)
    sweep()
    assert store.get(lost).notified and marked(stack) == set()
    assert len(boto3.client("sqs").receive_message(QueueUrl=queue).get("Messages", [])) == 1
