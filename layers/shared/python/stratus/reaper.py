"""The SageMaker mode's reaper: jobs handed to the endpoint that nobody will finish.

With queue workers a job whose worker dies comes back with its message (the visibility timeout)
and the next worker takes it over. SageMaker's asynchronous endpoint redelivers nothing: an
instance that dies mid-invocation leaves its job RUNNING, and a request the endpoint drops (its
RequestTTL, its own queue) leaves it QUEUED, each for good, and identical cacheable requests
join it until the cache TTL. So the dispatch function marks every job it hands over
(`dispatched`), and a scheduled sweep (the same function, every minute) looks at the marked jobs:

  RUNNING, no heartbeat for STALE_HEARTBEATS x heartbeat_s  -> FAILED (worker_lost)
  QUEUED past its message's deadline                        -> EXPIRED (as a worker would)

and posts the replies each owes. A finished job leaves the index (JobStore.transition removes the
mark), so the sweep reads only jobs in flight on the endpoint, in SHARDS partitions of the sparse
index `dispatched-jobs` (one partition would take every dispatch's write).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from aws_lambda_powertools.metrics import MetricUnit
from boto3.dynamodb.conditions import Key
from botocore.exceptions import ClientError

from stratus.contracts import QueueMessage, Status
from stratus.jobstore import DISPATCHED_INDEX, FINISHED, JobStore
from stratus.observability import logger, metrics
from stratus.replies import post_replies

SHARDS = 8
STALE_HEARTBEATS = 3  # a RUNNING job is lost after this many missed heartbeats (the dlq function's rule)


def shard_of(job_id: str) -> str:
    return str(zlib.crc32(job_id.encode()) % SHARDS)


def mark_dispatched(table, msg: QueueMessage) -> bool:
    """Mark a job the dispatch function hands to the endpoint (with its message's deadline) -> False
    when it is finished already (nothing to watch)."""
    try:
        table.update_item(
            Key={"pk": msg.job_id},
            UpdateExpression="SET dispatched = :shard, dispatch_deadline = :deadline",
            ConditionExpression="#s IN (:q, :r)",
            ExpressionAttributeNames={"#s": "status"},
            ExpressionAttributeValues={
                ":shard": shard_of(msg.job_id),
                ":deadline": int(msg.deadline),
                ":q": Status.QUEUED.value,
                ":r": Status.RUNNING.value,
            },
        )
        return True
    except ClientError as exc:
        if exc.response["Error"]["Code"] != "ConditionalCheckFailedException":
            raise
        return False


@dataclass(frozen=True)
class Seen:
    """A marked job as the index shows it."""

    job_id: str
    status: Status
    updated_at: float
    deadline: float


def verdict(seen: Seen, now: float, heartbeat_s: float) -> tuple[Status, dict] | None:
    """What the sweep does with a marked job -> (the status it moves to, its error); None: leave it.
    verdict(Seen("j", Status.RUNNING, 0.0, 10**10), now=100.0, heartbeat_s=30.0)[0] == Status.FAILED"""
    if seen.status == Status.RUNNING and now - seen.updated_at > STALE_HEARTBEATS * heartbeat_s:
        return Status.FAILED, {
            "message": f"the worker running this job stopped answering ({now - seen.updated_at:.0f} s without a "
            "heartbeat); send the request again",
            "type": "server_error",
            "code": "worker_lost",
        }
    if seen.status == Status.QUEUED and now > seen.deadline:
        return Status.EXPIRED, {
            "message": "the job was not started before its deadline",
            "type": "server_error",
            "code": "expired",
        }
    return None


def marked(table, shard: str):
    """Every job marked in one shard (the index lags the items by moments)."""
    kwargs = {"IndexName": DISPATCHED_INDEX, "KeyConditionExpression": Key("dispatched").eq(shard)}
    while True:
        got = table.query(**kwargs)
        for item in got["Items"]:
            yield Seen(
                item["pk"],
                Status(item["status"]),
                float(item.get("updated_at", 0)),
                float(item.get("dispatch_deadline", 0)),
            )
        if "LastEvaluatedKey" not in got:
            return
        kwargs["ExclusiveStartKey"] = got["LastEvaluatedKey"]


def reap(store: JobStore, *, sqs, s3, now: float, heartbeat_s: float) -> dict[str, int]:
    """One sweep over the marked jobs -> how many it failed, expired and left, and the jobs it could
    not look after this time (logged; the next sweep sees them again)."""
    counts = {"failed": 0, "expired": 0, "live": 0, "errors": 0}
    for shard in map(str, range(SHARDS)):
        for seen in marked(store.table, shard):
            try:  # one job that cannot be handled (a throttled write, a reply queue) never stops the sweep
                outcome = sweep_one(store, seen, shard, sqs=sqs, s3=s3, now=now, heartbeat_s=heartbeat_s)
            except Exception:
                logger.exception("could not sweep a dispatched job", extra={"job_id": seen.job_id})
                outcome = "errors"
            if outcome:
                counts[outcome] += 1
    metrics.add_metric(name="JobsReaped", unit=MetricUnit.Count, value=counts["failed"] + counts["expired"])
    return counts


def sweep_one(store: JobStore, seen: Seen, shard: str, *, sqs, s3, now: float, heartbeat_s: float) -> str | None:
    """Look after one marked job -> what became of it ("failed", "expired", "live"; None: nothing
    to count)."""
    if seen.status.finished:  # replies a sweep could not post, or the index lagging a finish
        settle(store, seen.job_id, sqs=sqs, s3=s3)
        return None
    decided = verdict(seen, now, heartbeat_s)
    if decided is None:
        return "live"
    to, error = decided
    # conditional on what was seen: a heartbeat or a claim since keeps the job as it is
    quiet = {"quiet_since": now - STALE_HEARTBEATS * heartbeat_s} if to == Status.FAILED else {}
    job = store.transition(seen.job_id, [seen.status], to, error=error, **quiet)
    if job is None:
        return None
    logger.warning("reaped a job the endpoint left", extra={"job_id": job.job_id, "status": to.value})
    try:
        post_replies(job, sqs=sqs, s3=s3, store=store)
    except Exception:  # a passing failure: marked again, so the next sweep posts them
        logger.exception("could not post a reaped job's replies", extra={"job_id": job.job_id})
        store.table.update_item(
            Key={"pk": job.job_id}, UpdateExpression="SET dispatched = :s", ExpressionAttributeValues={":s": shard}
        )
    return "failed" if to == Status.FAILED else "expired"


def settle(store: JobStore, job_id: str, *, sqs, s3) -> None:
    """A finished job still marked: post the replies it owes (raises on a passing failure, leaving
    the mark for the next sweep), then take the mark away."""
    post_replies(store.get(job_id), sqs=sqs, s3=s3, store=store)
    store.table.update_item(
        Key={"pk": job_id},
        UpdateExpression="REMOVE dispatched, dispatch_deadline",
        ConditionExpression="#s IN (" + ", ".join(f":f{i}" for i in range(len(FINISHED))) + ")",
        ExpressionAttributeNames={"#s": "status"},
        ExpressionAttributeValues={f":f{i}": s for i, s in enumerate(FINISHED)},
    )
