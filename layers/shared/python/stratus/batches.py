"""Batch files: a JSONL file of requests in, an output file (and an error file) out.

  batches/input/<tenant>/<name>.jsonl    uploading here creates a batch (S3 -> EventBridge -> batch fn)
  batches/files/<tenant>/<name>.jsonl    POST /v1/batches {"input_file_id": "<name>.jsonl"} copies it
                                         to the input prefix (ingested like an upload) and answers at once
  batches/output/<batch id>/             output.jsonl, errors.jsonl, manifest.json when every line is done
  batches/state/<batch id>/lines.json    which job serves each line (written at ingest)
  batches/state/<batch id>/outbox/       the lines' queue messages, sent a few at a time (stratus.release)

Lines are OpenAI batch lines ({"custom_id", "method": "POST", "url", "body"}) or Bedrock batch
records ({"recordId", "modelInput"}). Each valid line becomes a job exactly like an API request
(same cache key, so identical lines and earlier requests reuse one result); the new jobs' messages
go to the batch's outbox, from which release steps send them to the batch tier's queue, sharing it
fairly between tenants (workers take batch work into spare slots only). Invalid lines go to the
error file with their line number.
The scheduled pass (run_pass) counts finished lines, writes the output once nothing is pending,
and keeps releasing lines for BatchPassSeconds.

Cancelling (POST /v1/batches/{id}/cancel): the batch becomes `cancelling` at once and no more of its
lines are released; the next pass cancels the jobs the batch created that have not started (a job an
interactive request joined is left to run), waits for its running lines, and writes the output of
the finished ones and an error line (`batch_cancelled`) for each of the rest: `cancelled`.

Batch item: pk "batch#<id>", with `batch_tenant` (always) and `open_batch` (until it completes or
fails) keying two sparse indexes of the jobs table, both sorted by created_at: a tenant's batches
(GET /v1/batches) and the open ones (the scheduled pass). No list or set item grows with the
number of batches, so none can reach DynamoDB's 400 KB item limit. (Indexes are eventually
consistent: a batch shows in them within moments of its creation.)
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from dataclasses import dataclass, field

from aws_lambda_powertools.metrics import MetricUnit
from boto3.dynamodb.conditions import Key

from stratus.contracts import ROUTE_PATHS, Status, json_object, require_unicode
from stratus.errors import Conflict, InvalidRequest, NotFound, PayloadTooLarge, StratusError
from stratus.keys import Tenant, check_tenant
from stratus.jobstore import load_result
from stratus.observability import logger, metrics
from stratus import release, submission
from stratus.deps import Deps
from stratus.shapes import completion_body

INPUT_PREFIX, FILES_PREFIX = "batches/input/", "batches/files/"
POSTED = "posted"  # batches/input/<tenant>/posted/<nonce>/<file>: copies made by POST /v1/batches
TENANT_INDEX, OPEN_INDEX = "tenant-batches", "open-batches"  # template.yaml: JobsTable's indexes
OPEN = "open"  # open_batch's one value
OPEN_STATUSES = ("validating", "in_progress", "cancelling")  # the scheduled pass still has work on these
INGEST_GRACE_S = 600  # an ingest (the batch function's 300 s) has surely ended this long after a cancel
ROUTES = ROUTE_PATHS
KEEP_S = 30 * 86400  # batch records outlive their jobs' cache TTL: the output files are what matter
MAX_LINES = 5000  # one ingest must fit the batch function's 5 minutes (a few DynamoDB calls a line)


@dataclass
class Line:
    """One input line's fate: the job serving it, or why it was refused."""

    n: int  # 1-based line number in the input file
    custom_id: str | None
    job_id: str | None = None
    error: dict | None = None
    bedrock: bool = False
    outbox: int | None = None  # its message's place in the batch's outbox: the batch created its job


@dataclass
class Batch:
    id: str
    tenant: str
    input_file: str  # S3 key
    status: str = "validating"  # validating -> in_progress -> completed | failed; cancelling -> cancelled
    created_at: int = field(default_factory=lambda: int(time.time()))
    completed_at: int | None = None
    counts: dict = field(default_factory=lambda: {"total": 0, "completed": 0, "failed": 0})
    output_file: str | None = None
    error_file: str | None = None
    errors: list = field(default_factory=list)  # file-level problems (unreadable input)
    outbox: int = 0  # queue messages to send (stratus.release) ...
    released: int = 0  # ... and how many have gone
    cancelling_at: int | None = None
    cancelled_at: int | None = None

    def to_item(self) -> dict:
        item = {"pk": f"batch#{self.id}", "tenant": self.tenant, "input_file": self.input_file, "status": self.status,
                "created_at": self.created_at, "counts": json.dumps(self.counts),
                "errors": json.dumps(self.errors), "expires_at": self.created_at + KEEP_S,
                "batch_tenant": self.tenant, "outbox": self.outbox, "released": self.released}
        if self.status in OPEN_STATUSES:
            item["open_batch"] = OPEN
        for name in ("completed_at", "output_file", "error_file", "cancelling_at", "cancelled_at"):
            if getattr(self, name) is not None:
                item[name] = getattr(self, name)
        return item

    @classmethod
    def from_item(cls, item: dict) -> Batch:
        return cls(item["pk"].removeprefix("batch#"), item["tenant"], item["input_file"], item["status"],
                   int(item["created_at"]), int(item["completed_at"]) if "completed_at" in item else None,
                   json.loads(item["counts"]), item.get("output_file"), item.get("error_file"),
                   json.loads(item.get("errors", "[]")), int(item.get("outbox", 0)), int(item.get("released", 0)),
                   *(int(item[k]) if k in item else None for k in ("cancelling_at", "cancelled_at")))

    def view(self, bucket: str) -> dict:
        """The OpenAI batch object; file ids work with GET /v1/files/{id}/content, and the
        *_uri fields say where the files are in S3."""
        s3 = lambda key: f"s3://{bucket}/{key}" if key else None  # noqa: E731
        posted = f"{INPUT_PREFIX}{self.tenant}/{POSTED}/" in self.input_file  # a copy made by POST /v1/batches
        input_id = self.input_file.rsplit("/", 1)[-1] if posted else s3(self.input_file)
        return {"id": self.id, "object": "batch", "endpoint": "/v1/chat/completions", "input_file_id": input_id,
                "completion_window": "24h", "status": self.status, "created_at": self.created_at,
                "completed_at": self.completed_at, "cancelling_at": self.cancelling_at,
                "cancelled_at": self.cancelled_at,
                "output_file_id": f"file-{self.id}-output" if self.output_file else None,
                "error_file_id": f"file-{self.id}-errors" if self.error_file else None,
                "input_file_uri": s3(self.input_file), "output_file_uri": s3(self.output_file),
                "error_file_uri": s3(self.error_file), "request_counts": self.counts,
                "errors": {"object": "list", "data": self.errors} if self.errors else None}


# ---- reading lines --------------------------------------------------------------------------

def parse_line(raw: str, default_model: str) -> tuple[str | None, str, dict, bool]:
    """A JSONL line -> (custom id, route, OpenAI body, is Bedrock); InvalidRequest names the problem."""
    d = json_object(raw, "the line")
    if "modelInput" in d:  # Bedrock batch inference record
        body = d["modelInput"]
        if not isinstance(body, dict):
            raise InvalidRequest("modelInput must be an object", param="modelInput")
        body = {"model": default_model, **body}
        if "max_gen_len" in body:
            body["max_tokens"] = body.pop("max_gen_len")
        require_unicode(d.get("recordId"), "recordId")
        return d.get("recordId"), "chat" if "messages" in body else "completion", body, True
    custom_id = d.get("custom_id")
    require_unicode(custom_id, "custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise InvalidRequest("custom_id is required (a non-empty string)", param="custom_id")
    if d.get("method", "POST") != "POST":
        raise InvalidRequest(f"method must be POST, got {d.get('method')!r}", param="method")
    if d.get("url") not in ROUTES:
        raise InvalidRequest(f"url must be one of {', '.join(ROUTES)}, got {d.get('url')!r}", param="url")
    if not isinstance(d.get("body"), dict):
        raise InvalidRequest("body must be an object", param="body")
    return custom_id, ROUTES[d["url"]], d["body"], False


def _error(exc: StratusError) -> dict:
    return {"code": exc.code or "invalid_request", "message": exc.message, "param": exc.param}


# ---- creating a batch -----------------------------------------------------------------------

def batch_id_for_upload(bucket: str, key: str, etag: str) -> str:
    """The same upload (a redelivered event) always maps to the same batch."""
    return "batch_" + hashlib.sha256(f"{bucket}/{key}/{etag}".encode()).hexdigest()[:24]


PERMANENT_S3 = {"NoSuchKey", "NoSuchBucket", "AccessDenied", "InvalidObjectState", "404", "403"}


def _code(exc: Exception) -> str:
    return getattr(exc, "response", {}).get("Error", {}).get("Code", "") or type(exc).__name__


def _permanent(exc: Exception) -> bool:
    """An input error that no retry can fix (a missing or forbidden object, bad content)."""
    return isinstance(exc, (InvalidRequest, UnicodeDecodeError)) or _code(exc) in PERMANENT_S3


def tenant_of_upload(key: str) -> str:
    rest = key.removeprefix(INPUT_PREFIX)
    if rest == key or "/" not in rest:
        raise InvalidRequest(f"batch files go under {INPUT_PREFIX}<tenant>/, got {key!r}")
    return check_tenant(rest.split("/", 1)[0])


def create(batch_id: str, tenant: str, key: str, deps: Deps) -> Batch:
    """Ingest one input file: validate every line, create and enqueue the jobs, record the batch.
    Runs in the batch function (up to 5 minutes), never in the API."""
    s = deps.settings
    batch = Batch(batch_id, tenant, key)
    try:  # new, announced by POST /v1/batches (pending), or left "validating" by a crash (resumed);
        # a redelivered event finds it in progress or done
        existing = deps.table.put_item(
            Item=batch.to_item(), ConditionExpression="attribute_not_exists(pk) OR #s = :v",  # (pending: validating)
            ExpressionAttributeNames={"#s": "status"}, ExpressionAttributeValues={":v": "validating"},
            ReturnValues="ALL_OLD").get("Attributes")
    except deps.table.meta.client.exceptions.ConditionalCheckFailedException:
        logger.info("batch exists already (a redelivered event)", extra={"batch_id": batch_id})
        return get(batch_id, tenant, deps)
    resumed = bool(existing) and existing.get("status") == "validating" and not existing.get("pending")
    if resumed:
        logger.info("resuming a batch an earlier run left validating", extra={"batch_id": batch_id})
    try:
        raw_lines = deps.s3.get_object(Bucket=s.bucket, Key=key)["Body"].read().decode("utf-8").splitlines()
        count = sum(1 for raw in raw_lines if raw.strip())
        if count > MAX_LINES:
            raise InvalidRequest(f"the file has {count} lines; at most {MAX_LINES} per batch: split it")
    except Exception as exc:
        if not _permanent(exc):  # throttled, a 5xx, the network: the event is retried and resumes
            raise
        code = "too_many_lines" if isinstance(exc, InvalidRequest) else "input_unreadable"
        message = exc.message if isinstance(exc, InvalidRequest) else f"the input file cannot be read ({_code(exc)})"
        batch.status, batch.errors = "failed", [{"code": code, "message": message}]
        deps.table.put_item(Item=batch.to_item())
        return batch
    lines, outbox = [], []
    owner, how = Tenant(tenant, rpm=0, tpm=0), submission.batch_line(s)  # the file was the charge
    for n, raw in enumerate(raw_lines, 1):
        if not raw.strip():
            continue
        line = Line(n, None)
        try:
            line.custom_id, route, body, line.bedrock = parse_line(raw, s.model_id)
            sub = submission.submit(route, body, owner, deps, how)
        except (InvalidRequest, NotFound, PayloadTooLarge) as exc:
            line.error = _error(exc)
            lines.append(line)
            continue
        line.job_id = sub.job_id
        if sub.created or (resumed and sub.job is not None and sub.job.status == Status.QUEUED):
            line.outbox = len(outbox)
            outbox.append(sub.message)  # new, or resumed: its message may never have gone
        lines.append(line)
    batch.outbox = release.write_outbox(batch_id, outbox, deps)
    state_key = f"batches/state/{batch_id}/lines.json"
    deps.s3.put_object(Bucket=s.bucket, Key=state_key, Body=json.dumps([l.__dict__ for l in lines]).encode())
    batch.status = "in_progress"
    batch.counts = {"total": len(lines), "completed": 0, "failed": sum(1 for l in lines if l.error)}
    try:
        deps.table.put_item(Item=batch.to_item(), ConditionExpression="#s = :v",
                            ExpressionAttributeNames={"#s": "status"}, ExpressionAttributeValues={":v": "validating"})
    except deps.table.meta.client.exceptions.ConditionalCheckFailedException:  # cancelled while ingesting
        deps.table.update_item(Key={"pk": f"batch#{batch_id}"}, UpdateExpression="SET outbox = :o, counts = :c",
                               ExpressionAttributeValues={":o": batch.outbox, ":c": json.dumps(batch.counts)})
        logger.info("batch cancelled while ingesting: nothing released", extra={"batch_id": batch_id})
        return get(batch_id, tenant, deps)
    metrics.add_metric(name="BatchLines", unit=MetricUnit.Count, value=len(lines))
    logger.info("batch created", extra={"batch_id": batch_id, "lines": len(lines), "queued": len(outbox)})
    try:  # its first lines go now; if this step fails, the scheduled pass sends them
        release_step(release.Meter(), deps)
    except Exception:  # noqa: BLE001 - logged; the batch exists and the next pass releases its lines
        logger.exception("could not release the new batch's lines")
    return batch


BATCH_ID = re.compile(r"batch_[0-9a-f]{24}")  # batch_id_for_upload's shape


def get(batch_id: str, tenant: str, deps: Deps) -> Batch:
    if not isinstance(batch_id, str) or not BATCH_ID.fullmatch(batch_id):
        raise NotFound("batch not found: batch ids are 'batch_' + 24 hexadecimal digits")
    item = deps.table.get_item(Key={"pk": f"batch#{batch_id}"}, ConsistentRead=True).get("Item")
    if item is None or item["tenant"] != tenant:
        raise NotFound(f"batch {batch_id!r} not found")
    return Batch.from_item(item)


def list_recent(tenant: str, deps: Deps, limit: int = 20) -> list[Batch]:
    """GET /v1/batches: the tenant's batches, newest first (one Query of the tenant index)."""
    got = deps.table.query(IndexName=TENANT_INDEX, KeyConditionExpression=Key("batch_tenant").eq(tenant),
                           ScanIndexForward=False, Limit=limit)
    return [Batch.from_item(i) for i in got.get("Items", [])]


def cancel(batch_id: str, tenant: str, deps: Deps) -> Batch:
    """POST /v1/batches/{id}/cancel: stop releasing the batch's lines; the scheduled pass does the
    rest (module docstring). Cancelling a cancelling or cancelled batch answers it as it is."""
    batch = get(batch_id, tenant, deps)
    try:
        item = deps.table.update_item(
            Key={"pk": f"batch#{batch.id}"}, UpdateExpression="SET #s = :c, cancelling_at = :now",
            ConditionExpression="#s IN (:v, :p)", ExpressionAttributeNames={"#s": "status"},
            ExpressionAttributeValues={":c": "cancelling", ":now": int(deps.clock()), ":v": "validating",
                                       ":p": "in_progress"}, ReturnValues="ALL_NEW")["Attributes"]
    except deps.table.meta.client.exceptions.ConditionalCheckFailedException:
        batch = get(batch_id, tenant, deps)
        if batch.status in ("cancelling", "cancelled"):
            return batch
        raise Conflict(f"batch {batch_id} is already {batch.status}; only validating or in-progress batches "
                       "can be cancelled") from None
    metrics.add_metric(name="BatchesCancelled", unit=MetricUnit.Count, value=1)
    logger.info("batch cancelling", extra={"batch_id": batch.id})
    return Batch.from_item(item)


def create_from_request(body: dict, tenant: str, deps: Deps) -> Batch:
    """POST /v1/batches: {"input_file_id": "<name under batches/files/<tenant>/>", "endpoint", ...}."""
    if not isinstance(body, dict) or not isinstance(body.get("input_file_id"), str) or not body["input_file_id"]:
        raise InvalidRequest("input_file_id is required: the name of a file under "
                             f"s3://{deps.settings.bucket}/{FILES_PREFIX}{tenant}/", param="input_file_id")
    endpoint = body.get("endpoint", "/v1/chat/completions")
    if not isinstance(endpoint, str) or endpoint not in ROUTES:
        raise InvalidRequest(f"endpoint must be one of {', '.join(ROUTES)}", param="endpoint")
    bucket, name = deps.settings.bucket, body["input_file_id"]
    source = f"{FILES_PREFIX}{tenant}/{name}"
    try:
        deps.s3.head_object(Bucket=bucket, Key=source)
    except Exception as exc:  # noqa: BLE001 - botocore's ClientError for a 404
        raise NotFound(f"no file {name!r} under {FILES_PREFIX}{tenant}/", param="input_file_id") from exc
    # The copy under the input prefix is an upload like any other: the batch function ingests it.
    key = f"{INPUT_PREFIX}{tenant}/{POSTED}/{uuid.uuid4().hex[:12]}/{name.rsplit('/', 1)[-1]}"
    etag = deps.s3.copy_object(Bucket=bucket, Key=key, CopySource={"Bucket": bucket, "Key": source})["CopyObjectResult"]["ETag"]
    batch = Batch(batch_id_for_upload(bucket, key, etag.strip('"')), tenant, key)
    try:  # visible to GET at once; the ingest replaces it (or got there first)
        deps.table.put_item(Item={**batch.to_item(), "pending": True}, ConditionExpression="attribute_not_exists(pk)")
    except deps.table.meta.client.exceptions.ConditionalCheckFailedException:
        return get(batch.id, tenant, deps)
    return batch


# ---- files (the OpenAI files API, for batch input and output) ----------------------------------

FILE_ID = re.compile(r"file-[0-9a-f]{24}")
BATCH_FILE_ID = re.compile(r"file-(batch_[0-9a-f]{24})-(output|errors)")
MAX_CONTENT_BYTES = 5_000_000  # a Lambda response stops at 6 MB; bigger files are read from S3


def read_upload(content_type: str, body: bytes, limit: int) -> tuple[str, bytes]:
    """A multipart/form-data POST /v1/files body -> (filename, data); checks purpose and size."""
    from email.parser import BytesParser
    from email.policy import HTTP

    if len(body) > limit:
        raise PayloadTooLarge(f"the upload must be at most {limit} bytes; put bigger files in S3 under {FILES_PREFIX}")
    if not content_type.startswith("multipart/form-data"):
        raise InvalidRequest(f"send multipart/form-data with fields purpose and file, got {content_type or 'none'!r}")
    message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    fields = {part.get_param("name", header="content-disposition"): part for part in message.iter_parts()}
    purpose = fields["purpose"].get_content().strip() if "purpose" in fields else None
    if purpose != "batch":
        raise InvalidRequest(f"purpose must be 'batch', got {purpose!r}", param="purpose")
    if "file" not in fields:
        raise InvalidRequest("the file field is missing", param="file")
    part = fields["file"]
    return part.get_filename() or "upload.jsonl", part.get_payload(decode=True) or b""


def upload_file(filename: str, data: bytes, tenant: str, deps: Deps) -> dict:
    """POST /v1/files (purpose "batch"): keep the file under the tenant's files prefix."""
    file_id = "file-" + uuid.uuid4().hex[:24]
    deps.s3.put_object(Bucket=deps.settings.bucket, Key=f"{FILES_PREFIX}{tenant}/{file_id}", Body=data,
                       ContentType="application/jsonl", Metadata={"filename": filename[:200]})
    return {"id": file_id, "object": "file", "bytes": len(data), "created_at": int(time.time()),
            "filename": filename, "purpose": "batch", "status": "processed"}


def file_content(file_id: str, tenant: str, deps: Deps) -> bytes:
    """GET /v1/files/{id}/content: an uploaded file, or a batch's output or error file."""
    if m := BATCH_FILE_ID.fullmatch(file_id):
        batch = get(m.group(1), tenant, deps)
        key = batch.output_file if m.group(2) == "output" else batch.error_file
        if key is None:
            raise NotFound(f"file {file_id!r} does not exist yet: batch {batch.id} is {batch.status}")
    elif FILE_ID.fullmatch(file_id):
        key = f"{FILES_PREFIX}{tenant}/{file_id}"
    else:
        raise NotFound(f"file {file_id!r} not found")
    bucket = deps.settings.bucket
    try:
        size = deps.s3.head_object(Bucket=bucket, Key=key)["ContentLength"]
    except Exception as exc:  # noqa: BLE001 - botocore's ClientError for a 404
        raise NotFound(f"file {file_id!r} not found") from exc
    if size > MAX_CONTENT_BYTES:
        raise PayloadTooLarge(f"file {file_id!r} has {size} bytes, over the {MAX_CONTENT_BYTES} an API response "
                              f"carries: read s3://{bucket}/{key}")
    return deps.s3.get_object(Bucket=bucket, Key=key)["Body"].read()


# ---- progress, release and output ----------------------------------------------------------

def run_pass(deps: Deps) -> dict:
    """The scheduled pass: finish what is done, then release lines for BatchPassSeconds."""
    return {"completed": advance(deps), "released": release_for(deps.settings.batch_pass_s, deps)}


def release_for(seconds: float, deps: Deps) -> int:
    """Release steps every batch_release_every_s for `seconds` (one at least), while any open batch
    has lines left to send; returns the lines sent."""
    meter, until, sent = release.Meter(), deps.clock() + seconds, 0
    while True:
        try:
            step_sent = release_step(meter, deps)
        except Exception:  # noqa: BLE001 - logged and counted; the next pass steps again
            logger.exception("a release step failed")
            metrics.add_metric(name="batch_pass_errors", unit=MetricUnit.Count, value=1)
            return sent
        sent += max(step_sent, 0)
        if step_sent < 0 or deps.clock() + deps.settings.batch_release_every_s > until:
            return sent
        deps.sleep(deps.settings.batch_release_every_s)


def release_step(meter: release.Meter, deps: Deps) -> int:
    """One release step over the open batches with lines left; -1 when there are none."""
    pending = []
    for batch_id in _open_batch_ids(deps):  # oldest first
        item = deps.table.get_item(Key={"pk": f"batch#{batch_id}"}, ConsistentRead=True).get("Item")
        b = Batch.from_item(item) if item else None
        if b and b.status == "in_progress" and b.released < b.outbox:
            pending.append(release.Pending(b.id, b.tenant, b.released, b.outbox, b.created_at))
    return release.step(pending, meter, deps) if pending else -1


def advance(deps: Deps) -> list[str]:
    """Count finished lines of every open batch; finish the batches with nothing pending (and the
    cancelling ones with nothing running). Returns the ids of the batches this pass finished."""
    completed = []
    for batch_id in _open_batch_ids(deps):
        try:  # one batch that fails (a missing state file, a throttled read) never stops the others
            item = deps.table.get_item(Key={"pk": f"batch#{batch_id}"}, ConsistentRead=True).get("Item")
            step = PASS_STEPS.get(item.get("status")) if item and item.get("open_batch") == OPEN else None
            if step is None:
                continue  # the index lags, or the batch is still being ingested
            if step(Batch.from_item(item), deps):  # its output written: no longer open
                completed.append(batch_id)
        except Exception:  # noqa: BLE001 - logged and counted; the next pass tries it again
            logger.exception("could not advance a batch", extra={"batch_id": batch_id})
            metrics.add_metric(name="batch_pass_errors", unit=MetricUnit.Count, value=1)
    return completed


def _open_batch_ids(deps: Deps) -> list[str]:
    """Every open batch, oldest first (the open index, all pages)."""
    ids, kwargs = [], {"IndexName": OPEN_INDEX, "KeyConditionExpression": Key("open_batch").eq(OPEN)}
    while True:
        got = deps.table.query(**kwargs)
        ids += [i["pk"].removeprefix("batch#") for i in got.get("Items", [])]
        if "LastEvaluatedKey" not in got:
            return ids
        kwargs["ExclusiveStartKey"] = got["LastEvaluatedKey"]


def _read_lines(batch: Batch, deps: Deps) -> list[Line]:
    raw = deps.s3.get_object(Bucket=deps.settings.bucket, Key=f"batches/state/{batch.id}/lines.json")["Body"].read()
    return [Line(**d) for d in json.loads(raw)]


def _advance_one(batch: Batch, deps: Deps) -> bool:
    lines = _read_lines(batch, deps)
    unsent = {l.job_id for l in lines if l.outbox is not None and l.outbox >= batch.released}  # queued: not read
    statuses = deps.store.statuses(sorted({l.job_id for l in lines if l.job_id} - unsent))
    statuses.update(dict.fromkeys(unsent, Status.QUEUED))
    done = sum(1 for l in lines if l.job_id and statuses.get(l.job_id) == Status.DONE)
    pending = sum(1 for l in lines if l.job_id and statuses.get(l.job_id) in (Status.QUEUED, Status.RUNNING))
    batch.counts = {"total": len(lines), "completed": done, "failed": len(lines) - done - pending}
    if pending:  # counts only: a release step may be moving the cursor
        deps.table.update_item(Key={"pk": f"batch#{batch.id}"}, UpdateExpression="SET counts = :c",
                               ExpressionAttributeValues={":c": json.dumps(batch.counts)})
        return False
    _write_output(batch, lines, deps)
    return True


def _cancel_one(batch: Batch, deps: Deps) -> bool:
    """A cancelling batch: cancel the jobs it created that have not started, wait for its running
    lines, then write what finished -> True once the batch is `cancelled`."""
    try:
        lines = _read_lines(batch, deps)
    except deps.s3.exceptions.NoSuchKey:  # cancelled before its ingest wrote the lines
        item = deps.table.get_item(Key={"pk": f"batch#{batch.id}"}, ConsistentRead=True).get("Item") or {}
        if not item.get("pending") and deps.clock() - (batch.cancelling_at or 0) < INGEST_GRACE_S:
            return False  # the ingest may still be running
        lines = []  # never ingested (or the ingest died): nothing ran
    statuses = deps.store.statuses(sorted({l.job_id for l in lines if l.job_id}))
    for l in lines:
        if l.outbox is not None and statuses.get(l.job_id) == Status.QUEUED:
            # not cancelled: a worker took it meanwhile, or it was promoted; counted as running this pass
            statuses[l.job_id] = Status.CANCELLED if deps.store.cancel_batch_job(l.job_id) else Status.RUNNING
    running = sum(1 for l in lines if l.job_id and statuses.get(l.job_id) == Status.RUNNING)
    if running:  # in a worker's hands: their answers go in the output
        done = sum(1 for l in lines if l.job_id and statuses.get(l.job_id) == Status.DONE)
        deps.table.update_item(Key={"pk": f"batch#{batch.id}"}, UpdateExpression="SET counts = :c",
                               ExpressionAttributeValues={":c": json.dumps(
                                   {"total": len(lines), "completed": done, "failed": len(lines) - done - running})})
        return False
    _write_output(batch, lines, deps, cancelled=True)
    return True


PASS_STEPS = {"in_progress": _advance_one, "cancelling": _cancel_one}  # status -> the pass's work on it


def _write_output(batch: Batch, lines: list[Line], deps: Deps, *, cancelled: bool = False) -> None:
    s, store = deps.settings, deps.store
    jobs = {j: store.get(j) for j in {l.job_id for l in lines if l.job_id}}
    inputs = _bedrock_inputs(batch, lines, deps)
    out, err = [], []
    for l in lines:
        job = jobs.get(l.job_id) if l.job_id else None
        if job is not None and job.status == Status.DONE:
            body = completion_body(load_result(job, deps.s3))
            out.append({"recordId": l.custom_id, "modelInput": inputs.get(l.n), "modelOutput": body} if l.bedrock else
                       {"id": f"batch_req_{l.n}", "custom_id": l.custom_id,
                        "response": {"status_code": 200, "request_id": l.job_id, "body": body}, "error": None})
            continue
        error = l.error or (job.error if job is not None and job.error else
                            CANCELLED_LINE if cancelled else
                            {"code": (job.status.value.lower() if job else "expired"),
                             "message": "the line's job did not finish" if job else "the line's job expired"})
        err.append({"recordId": l.custom_id, "modelInput": inputs.get(l.n), "error": error} if l.bedrock else
                   {"id": f"batch_req_{l.n}", "custom_id": l.custom_id, "line": l.n, "response": None, "error": error})
    prefix = f"batches/output/{batch.id}/"
    batch.output_file, batch.error_file = prefix + "output.jsonl", prefix + "errors.jsonl"
    for key, rows in ((batch.output_file, out), (batch.error_file, err)):
        deps.s3.put_object(Bucket=s.bucket, Key=key, Body="".join(json.dumps(r) + "\n" for r in rows).encode(),
                           ContentType="application/jsonl")
    if cancelled:
        batch.status, batch.cancelled_at = "cancelled", int(time.time())
    else:
        batch.status, batch.completed_at = "completed", int(time.time())
    batch.counts = {"total": len(lines), "completed": len(out), "failed": len(err)}
    manifest = {"batch_id": batch.id, "status": batch.status, "input_file": batch.input_file,
                "request_counts": batch.counts, "output_file": batch.output_file, "error_file": batch.error_file,
                "completed_at": batch.completed_at, "cancelled_at": batch.cancelled_at}
    deps.s3.put_object(Bucket=s.bucket, Key=prefix + "manifest.json", Body=json.dumps(manifest, indent=2).encode())
    deps.table.put_item(Item=batch.to_item())
    logger.info(f"batch {batch.status}", extra={"batch_id": batch.id, **batch.counts})


CANCELLED_LINE = {"code": "batch_cancelled", "message": "the batch was cancelled before this line ran"}


def _bedrock_inputs(batch: Batch, lines: list[Line], deps: Deps) -> dict[int, dict]:
    """Bedrock output records repeat their modelInput: read those lines back from the input file."""
    wanted = {l.n for l in lines if l.bedrock}
    if not wanted:
        return {}
    raw = deps.s3.get_object(Bucket=deps.settings.bucket, Key=batch.input_file)["Body"].read().decode()
    out = {}
    for n, text in enumerate(raw.splitlines(), 1):
        if n in wanted:
            try:
                out[n] = json.loads(text).get("modelInput")
            except ValueError:
                out[n] = None
    return out

