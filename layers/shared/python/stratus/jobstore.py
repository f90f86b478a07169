"""The DynamoDB job store. Every status transition is a conditional write, so a duplicate
delivery, a retry or a second worker can never overwrite a finished job.

One table, partition key `pk`:
  <job id>                 jobs (= cache entries when the id is a cache key)
  key#<sha256 of API key>  API keys -> tenant and limits
  rl#<tenant>#<minute>     rate-limit counters (expire after two minutes)
  brl#<tenant>#<minute>    batch-budget counters (the same)
  tenant#<tenant>          a tenant's own settings (its batch budget)
  batch#<batch id>         batches (stratus.batches.store)
"""

from __future__ import annotations

import json
import time
from decimal import Decimal

from boto3.dynamodb.conditions import Key
from botocore.exceptions import ClientError

from stratus.contracts import UNCACHED_PREFIX, Job, Status
from stratus.errors import PayloadTooLarge, RateLimited

FINISHED = [s.value for s in Status if s.finished]
ITEM_LIMIT_BYTES = 400 * 1024  # DynamoDB's item size limit (attribute names and values)
JOB_ITEM_BUDGET = 360_000  # a job item as created, and later with its inline result; the rest is for
# usage, timings, an error and reply addresses
SQS_LIMIT_BYTES = 256 * 1024  # SQS's message size limit
LIVE_INDEX = "tenant-live-jobs"  # template.yaml: JobsTable's index of live interactive jobs by tenant
DISPATCHED_INDEX = "dispatched-jobs"  # ... and of jobs handed to the SageMaker endpoint (stratus.reaper)
MAX_REPLIES = 50  # reply addresses one job keeps (~450 bytes each, within the item's room beside the budget)
INLINE_RESULT_BYTES = 300_000  # a result over this (or over what the item has room for) goes to S3
RETRYABLE = [Status.FAILED.value, Status.CANCELLED.value, Status.EXPIRED.value]
UNPROCESSED_TRIES = 6  # BatchGetItem rounds for throttled keys, 50 ms doubling to 1 s between them


def item_bytes(item: dict) -> int:
    """An upper bound of DynamoDB's size of `item`: names and values (UTF-8 strings, numbers at
    their 21-byte maximum, sets and lists with their overhead)."""

    def size(v) -> int:
        if isinstance(v, str):
            return len(v.encode())
        if isinstance(v, bool) or v is None:
            return 1
        if isinstance(v, (int, float)) or type(v).__name__ == "Decimal":
            return 21
        if isinstance(v, dict):
            return 3 + sum(len(k.encode()) + 1 + size(x) for k, x in v.items())
        if isinstance(v, (list, set, tuple)):
            return 3 + sum(1 + size(x) for x in v)
        return len(str(v).encode())

    return sum(len(k.encode()) + size(v) for k, v in item.items())


# A job item's attributes but its prompt (Job.to_item), each by a placeholder (some are reserved words)
_READ = (
    "pk", "tenant", "status", "cacheable", "created_at", "updated_at", "expires_at", "attempts", "request",
    "result", "result_s3", "usage", "timings", "error", "worker", "last_error", "notify", "notified", "tier",
    "batch_id", "run",
)  # fmt: skip
WITHOUT_PROMPT = {
    "ProjectionExpression": ", ".join(f"#a{i}" for i in range(len(_READ))),
    "ExpressionAttributeNames": {f"#a{i}": name for i, name in enumerate(_READ)},
}


def check_sizes(job: Job, message_body: str) -> None:
    """Before anything is written: the job's queue message and item must fit SQS and DynamoDB
    (json.dumps writes non-ASCII text as 6-byte escapes, so a prompt's stored size is not its own).
    Raises PayloadTooLarge (413) naming the limit; such a request could never succeed."""
    body = len(message_body.encode())
    if body > SQS_LIMIT_BYTES:
        raise PayloadTooLarge(
            f"the request needs a {body}-byte queue message; SQS carries at most {SQS_LIMIT_BYTES} "
            f"bytes (256 KiB, non-ASCII text counts 6 bytes a character): shorten the prompt"
        )
    item = item_bytes(job.to_item())
    if item > JOB_ITEM_BUDGET:
        raise PayloadTooLarge(
            f"the request needs a {item}-byte job item; the job store keeps at most {JOB_ITEM_BUDGET} "
            f"bytes of it (DynamoDB items stop at 400 KB): shorten the prompt"
        )


def _conditional_failed(exc: ClientError) -> bool:
    return exc.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException"


class JobStore:
    def __init__(self, table) -> None:  # a boto3 DynamoDB Table resource
        self.table = table

    def get(self, job_id: str, *, now: float | None = None, prompt: bool = True) -> Job | None:
        """The job, or None when absent or past its expiry (the TTL sweeper may lag by days).
        prompt=False: read without its prompt (a poll of its status or result: the prompt may be
        hundreds of KB, and the read costs its size)."""
        projection = {} if prompt else WITHOUT_PROMPT
        item = self.table.get_item(Key={"pk": job_id}, ConsistentRead=True, **projection).get("Item")
        if item is None or "status" not in item:
            return None
        job = Job.from_item(item)
        if job.expires_at < (now or time.time()):
            return None
        return job

    def live_count(self, tenant: str, at_most: int) -> int:
        """How many of the tenant's interactive jobs are QUEUED or RUNNING, counted up to `at_most`
        (the tenant-live-jobs index, which lags the items by moments)."""
        kwargs = {"IndexName": LIVE_INDEX, "KeyConditionExpression": Key("live_tenant").eq(tenant), "Select": "COUNT"}
        count = 0
        while count < at_most:
            got = self.table.query(**kwargs, Limit=at_most - count)
            count += got["Count"]
            if "LastEvaluatedKey" not in got:
                break
            kwargs["ExclusiveStartKey"] = got["LastEvaluatedKey"]
        return count

    def statuses(self, job_ids: list[str]) -> dict[str, Status]:
        """Current status of each existing job (batch files poll their lines)."""
        return {j: status for j, (status, _) in self.states(job_ids).items()}

    def states(self, job_ids: list[str]) -> dict[str, tuple[Status, bool]]:
        """(status, streamed?) of each existing job (workers poll for cancels, and for streaming
        requests that joined a job)."""
        return {
            i["pk"]: (Status(i["status"]), bool(i.get("streamed", False)))
            for i in self.items(job_ids, "pk, #s, streamed")
        }

    def get_many(self, job_ids: list[str], *, now: float | None = None) -> dict[str, Job]:
        """Each existing, unexpired job (get() for many: a batch's output reads its lines' jobs)."""
        now = now or time.time()
        jobs = (Job.from_item(i) for i in self.items(job_ids) if "status" in i)
        return {j.job_id: j for j in jobs if j.expires_at >= now}

    def items(self, pks: list[str], projection: str | None = None) -> list[dict]:
        """The table's items with these keys (jobs, batches), strongly consistent, in no order: 100 keys
        per BatchGetItem; unprocessed keys asked again after a back-off."""
        out: list[dict] = []
        client, name = self.table.meta.client, self.table.name
        for i in range(0, len(pks), 100):
            keys = {"Keys": [{"pk": j} for j in pks[i : i + 100]], "ConsistentRead": True}
            if projection:
                keys.update(ProjectionExpression=projection, ExpressionAttributeNames={"#s": "status"})
            request = {name: keys}
            for attempt in range(UNPROCESSED_TRIES):
                got = client.batch_get_item(RequestItems=request)
                out += got["Responses"].get(name, [])  # the resource's client deserializes
                request = got.get("UnprocessedKeys") or None
                if not request:
                    break
                time.sleep(min(1.0, 0.05 * 2**attempt))  # throttled: back off before asking again
            else:
                raise RuntimeError(f"BatchGetItem left keys unprocessed after {UNPROCESSED_TRIES} tries")
        return out

    def mark_streamed(self, job_id: str) -> bool:
        """A streaming request waits on this live job: its worker writes chunks from now on.
        False when the job already finished (the caller reads its result instead)."""
        try:
            self.table.update_item(
                Key={"pk": job_id},
                UpdateExpression="SET streamed = :t",
                ConditionExpression="#s IN (:q, :r)",
                ExpressionAttributeNames={"#s": "status"},
                ExpressionAttributeValues={":t": True, ":q": Status.QUEUED.value, ":r": Status.RUNNING.value},
            )
            return True
        except ClientError as exc:
            if _conditional_failed(exc):
                return False
            raise

    def create(self, job: Job, *, refresh: bool = False, once: bool = False) -> tuple[Job, bool]:
        """Put `job` unless a live one holds the id: returns (the job that holds it, created?).

        Replaces an absent, expired, failed, cancelled or expired item; with refresh (no-cache)
        also a DONE one. A QUEUED/RUNNING job is never replaced: identical requests coalesce on it.
        once: only where no item holds the id (a batch line's own id: its job is made once, and a
        run that lags behind the one that took its batch over never makes a finished one again).
        """
        replaceable = {f":s{i}": s for i, s in enumerate(FINISHED if refresh else RETRYABLE)}
        condition = (
            {"ConditionExpression": "attribute_not_exists(pk)"}
            if once
            else {
                "ConditionExpression": f"attribute_not_exists(pk) OR expires_at < :now OR #s IN ({', '.join(replaceable)})",
                "ExpressionAttributeNames": {"#s": "status"},
                "ExpressionAttributeValues": {":now": int(time.time()), **replaceable},
            }
        )
        try:
            self.table.put_item(Item=job.to_item(), ReturnValuesOnConditionCheckFailure="ALL_OLD", **condition)
            return job, True
        except ClientError as exc:
            if not _conditional_failed(exc):
                raise
            return self._held(exc, job.job_id) or job, False

    def _held(self, exc: ClientError, job_id: str) -> Job | None:
        """The job whose item failed a write's condition (ReturnValuesOnConditionCheckFailure=ALL_OLD;
        read again where an older DynamoDB implementation does not return it)."""
        old = exc.response.get("Item")
        if old is None:
            return self.get(job_id)
        from boto3.dynamodb.types import TypeDeserializer

        d = TypeDeserializer()
        return Job.from_item({k: d.deserialize(v) for k, v in old.items()})

    def keep(self, job_id: str, until: int) -> None:
        """Keep a job (its item and TTL) at least until `until`, epoch seconds."""
        try:
            self.table.update_item(
                Key={"pk": job_id},
                UpdateExpression="SET expires_at = :u",
                ConditionExpression="attribute_exists(pk) AND expires_at < :u",
                ExpressionAttributeValues={":u": until},
            )
        except ClientError as exc:
            if not _conditional_failed(exc):
                raise

    def adopt(self, job_id: str) -> bool:
        """A QUEUED job a batch file's line made, joined by a request of the batch tier: it no
        longer belongs to the batch (whose cancel would cancel it under the request) -> True for
        the one caller that wins, who then queues a message for it."""
        try:
            self.table.update_item(
                Key={"pk": job_id},
                UpdateExpression="REMOVE batch_id",
                ConditionExpression="#s = :q AND attribute_exists(batch_id)",
                ExpressionAttributeNames={"#s": "status"},
                ExpressionAttributeValues={":q": Status.QUEUED.value},
            )
            return True
        except ClientError as exc:
            if _conditional_failed(exc):
                return False
            raise

    def promote(self, job_id: str) -> bool:
        """A QUEUED batch-tier job becomes interactive (an interactive request joined it): True for
        the one caller that wins, who then queues an interactive message for it."""
        try:
            self.table.update_item(
                Key={"pk": job_id},
                UpdateExpression="SET tier = :i, live_tenant = tenant",  # (an interactive job: counted live)
                ConditionExpression="#s = :q AND tier = :b",
                ExpressionAttributeNames={"#s": "status"},
                ExpressionAttributeValues={":i": "interactive", ":q": Status.QUEUED.value, ":b": "batch"},
            )
            return True
        except ClientError as exc:
            if _conditional_failed(exc):
                return False
            raise

    def transition(
        self,
        job_id: str,
        allowed_from: list[Status],
        to: Status,
        *,
        owner: str | None = None,
        tier: str | None = None,
        batch: str | None = None,
        tenant: str | None = None,
        quiet_since: float | None = None,
        **fields,
    ) -> Job | None:
        """Conditionally move a job to `to`: the job as written, or None when its status (or its
        owning worker, its tier, the batch that made it, its tenant, or its last write: before
        `quiet_since`) did not match.

        Extra fields are set too (worker=... claims the job); dicts (result, usage, timings, error)
        are stored as JSON.
        """
        names = {"#s": "status"}
        values = {":to": to.value, ":now": _seconds(time.time())}
        values.update({f":f{i}": s.value for i, s in enumerate(allowed_from)})
        sets = ["#s = :to", "updated_at = :now"]
        forget = to.finished and job_id.startswith(UNCACHED_PREFIX)  # nobody can ask for this prompt again
        for i, (name, value) in enumerate(fields.items()):
            names[f"#a{i}"] = name
            values[f":a{i}"] = json.dumps(value, separators=(",", ":")) if isinstance(value, dict) else value
            sets.append(f"#a{i} = :a{i}")
        cond = f"#s IN ({', '.join(f':f{i}' for i in range(len(allowed_from)))})"
        if owner is not None:
            cond += " AND worker = :owner"
            values[":owner"] = owner
        if tier is not None:
            cond += " AND tier = :tier"
            values[":tier"] = tier
        if batch is not None:
            cond += " AND #batch = :batch"
            names["#batch"], values[":batch"] = "batch_id", batch
        if tenant is not None:
            cond += " AND tenant = :tenant"
            values[":tenant"] = tenant
        if quiet_since is not None:
            cond += " AND updated_at < :quiet"
            values[":quiet"] = _seconds(quiet_since)
        try:
            # a finished job leaves the live and dispatched indexes
            gone = ["live_tenant", "dispatched", "dispatch_deadline"] * to.finished + ["prompt"] * forget
            update = "SET " + ", ".join(sets) + (" REMOVE " + ", ".join(gone) if gone else "")
            item = self.table.update_item(
                Key={"pk": job_id},
                UpdateExpression=update,
                ConditionExpression=cond,
                ExpressionAttributeNames=names,
                ExpressionAttributeValues=values,
                ReturnValues="ALL_NEW",
            )["Attributes"]
            return Job.from_item(item)
        except ClientError as exc:
            if _conditional_failed(exc):
                return None
            raise

    def watch(self, job_id: str, reply: dict) -> bool:
        """Ask for `reply` ({"queue_url", "id"}) to be posted when the job finishes; False when it
        already has (then the caller replies itself). Conditional, so no finish slips between; a
        reply already asked for (a redelivered request message) is not added twice."""
        one = json.dumps(reply, separators=(",", ":"))
        try:
            self.table.update_item(
                Key={"pk": job_id},
                UpdateExpression="SET notify = list_append(if_not_exists(notify, :empty), :r)",
                ConditionExpression="#s IN (:q, :r0) AND (attribute_not_exists(notify) OR "
                "(NOT contains(notify, :one) AND size(notify) < :most))",
                ExpressionAttributeNames={"#s": "status"},
                ExpressionAttributeValues={
                    ":empty": [],
                    ":r": [one],
                    ":one": one,
                    ":most": MAX_REPLIES,
                    ":q": Status.QUEUED.value,
                    ":r0": Status.RUNNING.value,
                },
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            )
            return True
        except ClientError as exc:
            if not _conditional_failed(exc):
                raise
            job = self._held(exc, job_id)
            if job is None or job.status not in (Status.QUEUED, Status.RUNNING):
                return False  # finished
            if reply not in job.notify and len(job.notify) >= MAX_REPLIES:
                raise RateLimited(
                    f"{MAX_REPLIES} requests already wait for this job's result; send this one again later",
                    retry_after_s=30,
                ) from None
            return True  # live: asked for already

    def mark_notified(self, job_id: str) -> None:
        self.table.update_item(
            Key={"pk": job_id}, UpdateExpression="SET notified = :t", ExpressionAttributeValues={":t": True}
        )

    def complete(
        self,
        job_id: str,
        owner: str,
        result: dict,
        *,
        s3=None,
        bucket: str | None = None,
        request_bytes: int = 0,
        **fields,
    ) -> Job | None:
        """RUNNING (owned by `owner`) -> DONE with the result; a result too big for the item (beside
        a request of `request_bytes` stored bytes) goes to S3 first (s3://bucket/results/<job id>.json)
        and the item keeps the pointer."""
        blob = json.dumps(result, separators=(",", ":"))
        room = min(INLINE_RESULT_BYTES, JOB_ITEM_BUDGET - request_bytes)
        if len(blob.encode()) <= room:
            return self.transition(job_id, [Status.RUNNING], Status.DONE, owner=owner, result=result, **fields)
        if s3 is None or not bucket:
            raise ValueError(f"result of {len(blob)} bytes needs S3 (pass s3= and bucket=)")
        key = f"results/{job_id}.json"
        s3.put_object(Bucket=bucket, Key=key, Body=blob.encode(), ContentType="application/json")
        return self.transition(
            job_id, [Status.RUNNING], Status.DONE, owner=owner, result_s3=f"s3://{bucket}/{key}", **fields
        )

    def cancel(self, job_id: str, tenant: str | None = None) -> Job | None:
        """QUEUED or RUNNING -> CANCELLED; with `tenant`, only that tenant's job (the one the caller
        checked: with a shared cache, another tenant may have made the id's job again since)."""
        return self.transition(job_id, [Status.QUEUED, Status.RUNNING], Status.CANCELLED, tenant=tenant)

    def cancel_batch_job(self, job_id: str, batch_id: str) -> Job | None:
        """A job the cancelled batch's line created, that has not started and that no interactive
        request joined (promote() makes those interactive) -> CANCELLED; None otherwise."""
        return self.transition(job_id, [Status.QUEUED], Status.CANCELLED, tier="batch", batch=batch_id)


def _seconds(t: float) -> Decimal:
    """An epoch time as the table stores it (a Decimal, to the microsecond)."""
    return Decimal(str(round(t, 6)))


def load_result(job: Job, s3) -> Job:
    """Fill in a result stored in S3 (s3://bucket/key) so a response can carry it."""
    if job.result is None and job.result_s3:
        bucket, key = job.result_s3[len("s3://") :].split("/", 1)
        job.result = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    return job
