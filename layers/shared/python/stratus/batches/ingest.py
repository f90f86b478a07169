"""Creating a batch and reading its file into jobs.

An upload (S3 -> EventBridge -> batch function) or POST /v1/batches records a batch; ingest() then
reads its file a slice at a time, under a lease, over as many runs as it takes. Each valid line
becomes a job exactly like an API request (stratus.submission: same cache key, so identical lines
and earlier requests reuse one result); the new jobs' messages go to the batch's outbox, from which
release steps send them to the batch tier's queue (stratus.release). Invalid lines go to the error
file with their line number.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable
from itertools import islice
from typing import TYPE_CHECKING, TypeVar

from aws_lambda_powertools.metrics import MetricUnit

from stratus import release, submission
from stratus.batches import cancelling, lines
from stratus.batches.api import get, get_any
from stratus.batches.lines import CHANGED, Row, UnusableFile, error_code, permanent
from stratus.batches.model import FILES_PREFIX, INPUT_PREFIX, POSTED, Batch, BatchStatus, Line
from stratus.batches.store import BatchStore, at_once
from stratus.contracts import QueueMessage, Status
from stratus.errors import InvalidRequest, NotFound, PayloadTooLarge, RateLimited
from stratus.keys import Tenant, check_tenant
from stratus.observability import logger, metrics
from stratus.wire import metadata_field

if TYPE_CHECKING:
    from stratus.deps import Deps

T = TypeVar("T")


def batch_id_for_upload(bucket: str, key: str, etag: str) -> str:
    """The same upload (a redelivered event) always maps to the same batch."""
    return "batch_" + hashlib.sha256(f"{bucket}/{key}/{etag}".encode()).hexdigest()[:24]


# S3 user metadata of a batch file (x-amz-meta-*): POST /v1/batches sets them on its copy; an upload
# may set them too. S3 keeps 2 KB of user metadata an object.
ENDPOINT_META, METADATA_META = "stratus-endpoint", "stratus-metadata"
MAX_METADATA_CHARS = 1536


def upload_settings(head: dict) -> tuple[str, dict]:
    """A batch file's HeadObject -> (its endpoint, its metadata) from its user metadata; anything
    unreadable there is the default (the chat endpoint, no metadata): the lines say their own url."""
    meta = head.get("Metadata") or {}
    endpoint = meta.get(ENDPOINT_META, "/v1/chat/completions")
    try:
        pairs = json.loads(meta.get(METADATA_META, "{}"))
    except ValueError:
        pairs = {}
    ok = isinstance(pairs, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in pairs.items())
    return (endpoint if endpoint in lines.URLS else "/v1/chat/completions"), (pairs if ok else {})


def tenant_of_upload(key: str) -> str:
    rest = key.removeprefix(INPUT_PREFIX)
    if rest == key or "/" not in rest:
        raise InvalidRequest(f"batch files go under {INPUT_PREFIX}<tenant>/, got {key!r}")
    return check_tenant(rest.split("/", 1)[0])


def create(batch_id: str, tenant: str, key: str, deps: Deps, etag: str = "") -> Batch:
    """An uploaded file: record the batch (new, or announced by POST /v1/batches), then ingest it
    for up to BatchIngestSeconds; the scheduled pass goes on with what is left. A redelivered event
    finds the batch recorded and goes on with its ingest (or finds it done)."""
    store, batch = BatchStore.of(deps), Batch(batch_id, tenant, key, etag.strip('"'))
    batch.endpoint, batch.metadata = upload_settings(deps.s3.head_object(Bucket=deps.settings.bucket, Key=key))
    if not store.put_new(batch):
        logger.info("batch exists already (a redelivered event)", extra={"batch_id": batch_id})
    elif (error := too_many_open(tenant, batch_id, deps)) is not None:
        batch.status, batch.errors = BatchStatus.FAILED, [{"code": error.code, "message": error.message}]
        store.save(batch)  # (before a line is read: nothing to cancel)
        logger.info("batch refused", extra={"batch_id": batch_id, "code": error.code})
        return batch
    return ingest(batch_id, deps, deps.clock() + deps.settings.batch_ingest_s)


class TooManyOpenBatches(RateLimited):
    code = "too_many_open_batches"


def too_many_open(tenant: str, batch_id: str, deps: Deps) -> TooManyOpenBatches | None:
    """The error for a tenant's batch past MaxOpenBatches others open (None: within it)."""
    cap = deps.settings.max_open_batches
    others = BatchStore.of(deps).open_count(tenant, besides=batch_id)
    if others < cap:
        return None
    return TooManyOpenBatches(
        f"tenant {tenant} has {others} batches open, at most {cap} at once (MaxOpenBatches): "
        "send this one when one of them finishes",
        retry_after_s=60,
    )


def create_from_request(body: dict, tenant: str, deps: Deps) -> Batch:
    """POST /v1/batches: {"input_file_id": "<name under batches/files/<tenant>/>", "endpoint", ...}."""
    if not isinstance(body, dict) or not isinstance(body.get("input_file_id"), str) or not body["input_file_id"]:
        raise InvalidRequest(
            f"input_file_id is required: the name of a file under s3://{deps.settings.bucket}/{FILES_PREFIX}{tenant}/",
            param="input_file_id",
        )
    endpoint = body.get("endpoint", "/v1/chat/completions")
    if not isinstance(endpoint, str) or endpoint not in lines.URLS:
        raise InvalidRequest(f"endpoint must be one of {', '.join(lines.URLS)}", param="endpoint")
    metadata = metadata_field(body.get("metadata"))
    text = json.dumps(metadata, separators=(",", ":"), ensure_ascii=True)
    if len(text) > MAX_METADATA_CHARS:
        raise InvalidRequest(
            f"metadata holds at most {MAX_METADATA_CHARS} characters as JSON in all (S3 object metadata)",
            param="metadata",
        )
    if (error := too_many_open(tenant, "", deps)) is not None:
        raise error
    bucket, name = deps.settings.bucket, body["input_file_id"]
    source = f"{FILES_PREFIX}{tenant}/{name}"
    try:
        deps.s3.head_object(Bucket=bucket, Key=source)
    except Exception as exc:
        raise NotFound(f"no file {name!r} under {FILES_PREFIX}{tenant}/", param="input_file_id") from exc
    # The copy under the input prefix is an upload like any other: the batch function ingests it.
    key = f"{INPUT_PREFIX}{tenant}/{POSTED}/{uuid.uuid4().hex[:12]}/{name.rsplit('/', 1)[-1]}"
    settings = {ENDPOINT_META: endpoint, METADATA_META: text}  # what the upload's batch reads (upload_settings)
    etag = deps.s3.copy_object(
        Bucket=bucket,
        Key=key,
        CopySource={"Bucket": bucket, "Key": source},
        Metadata=settings,
        MetadataDirective="REPLACE",
    )["CopyObjectResult"]["ETag"]
    batch = Batch(batch_id_for_upload(bucket, key, etag.strip('"')), tenant, key, etag.strip('"'))
    batch.endpoint, batch.metadata = endpoint, metadata
    if not BatchStore.of(deps).announce(batch):  # visible to GET at once; the ingest replaces it
        return get(batch.id, tenant, deps)  # (or got there first)
    return batch


def ingest(batch_id: str, deps: Deps, until: float) -> Batch:
    """Read slices of a batch's file into jobs while time is left (one at least), each under a
    lease so that two runs never read the same batch at once -> the batch as it stands.

    Each slice: its lines' jobs are created (submission.submit, not sent), their messages appended
    to the outbox and the lines recorded (batches/state/<id>/lines/<slice>.json); then one
    conditional write moves the cursor. A run that died mid-slice leaves the cursor where it was:
    the next run redoes that slice, and puts the jobs it finds queued back in the outbox (their
    messages may never have gone). The batch is in_progress from its first slice on, so its lines
    are released while the rest is read."""
    me, store, limits = uuid.uuid4().hex, BatchStore.of(deps), deps.settings.batches
    try:
        while (held := store.lease(batch_id, me, leased_at := int(deps.clock()), limits.lease_s)) is not None:
            batch, resumed = Batch.from_item(held), held.get("attempting") == held.get("ingested", 0)
            if batch.lines_total is None:  # the first slice: is the file one batch?
                batch.lines_total = read_or_fail(batch, deps, lambda b=batch: lines.lines_in_file(b, deps))
            if batch.lines_total is None:
                return get_any(batch_id, deps)  # failed: the file cannot be a batch
            rows = read_or_fail(batch, deps, lambda b=batch: _next_slice(b, deps))
            if rows is None:
                return get_any(batch_id, deps)
            lease_until = leased_at + limits.lease_s
            if not _ingest_slice(batch, rows, resumed, me, lease_until, deps) or deps.clock() >= until:
                break
    finally:
        store.unlease(batch_id, me)
    return get_any(batch_id, deps)


def _next_slice(batch: Batch, deps: Deps) -> list[Row]:
    """The rows of the slice at the batch's cursor."""
    rows = lines.rows(batch, deps, offset=batch.read_offset, line=batch.read_line)
    return list(islice(rows, deps.settings.batches.slice_lines))


def read_or_fail(batch: Batch, deps: Deps, read: Callable[[], T]) -> T | None:
    """read() from the batch's file -> what it read; None when the file cannot be a batch (the batch
    is then failed, saying why). Raises for a transient error (the run is retried and resumes)."""
    try:
        return read()
    except Exception as exc:
        if not permanent(exc):  # throttled, a 5xx, the network
            raise
        code, message = (
            (exc.code, exc.message)
            if isinstance(exc, UnusableFile)
            else (
                "input_changed",
                "the input file was replaced while it was read: upload the new one as a "
                "new batch (it is one: a new version is a new batch)",
            )
            if error_code(exc) in CHANGED
            else ("input_unreadable", f"the input file cannot be read ({error_code(exc)})")
        )
        batch.status, batch.errors = BatchStatus.FAILED, [{"code": code, "message": message}]
        BatchStore.of(deps).save(batch)
        logger.info("batch failed", extra={"batch_id": batch.id, "code": code})
        cancelling.stand_down(batch, deps)
        return None


def _ingest_slice(batch: Batch, rows: list[Row], resumed: bool, me: str, lease_until: int, deps: Deps) -> bool:
    """Make the slice at the batch's cursor (`rows`, its lines) into jobs -> True when more is left
    to read by this run. Its objects are written only while the lease has write_margin_s left: a
    run past its lease (a second run may be redoing the slice) writes nothing and stops."""
    s, start = deps.settings, batch.ingested
    if resumed:
        logger.info("redoing a slice an earlier run left unfinished", extra={"batch_id": batch.id, "start": start})
    owner = Tenant.trusted(batch.tenant)  # (the file was the charge)

    def job_of(row: Row) -> tuple[Line, QueueMessage | None]:
        """A line's job -> (the line, the message to send when this batch made the job)."""
        line = Line(row.n, None)
        try:
            parsed = lines.parse_line(lines.text(row, s.batches.max_line_bytes), s.catalogue.default.id)
            line.custom_id, line.bedrock, line.response = (
                parsed.custom_id,
                parsed.form == "bedrock",
                parsed.form == "response",
            )
            how = submission.batch_line(s, batch.id, row.n)
            sub = submission.submit(parsed.route, parsed.request_body(), owner, deps, how)
        except (InvalidRequest, NotFound, PayloadTooLarge) as exc:
            line.error = lines.line_error(exc)
            return line, None
        line.job_id = sub.job_id
        mine = sub.created or (
            resumed and sub.job is not None and sub.job.status == Status.QUEUED and sub.job.batch == batch.id
        )  # made by the run that died: may never have gone
        return line, sub.message if mine else None

    made, outbox = [], []
    for line, message in at_once(job_of, rows):
        if message is not None:
            line.outbox = batch.outbox + len(outbox)
            outbox.append(message)
        made.append(line)
    logger.remove_keys(["job_id"])  # submit() tagged the log with each line's job in turn
    if deps.clock() > lease_until - s.batches.write_margin_s:
        logger.warning("a slice outlasted its lease: left to the next run", extra={"batch_id": batch.id})
        return False
    release.write_outbox(batch.id, outbox, deps, start=batch.outbox)
    lines.write_part(batch, start, made, deps)
    total = batch.lines_total
    failed = sum(1 for l in made if l.error) + (batch.counts["failed"] if start else 0)
    done = start + len(made)
    end, last = (rows[-1].end, rows[-1].n) if rows else (batch.read_offset, batch.read_line)
    cursor = {
        "ingested": done,
        "lines_total": total,
        "outbox": batch.outbox + len(outbox),
        "counts": {"total": total, "completed": 0 if not start else batch.counts["completed"], "failed": failed},
        "read_offset": end,
        "read_line": last,
        "outbox_tokens": batch.outbox_tokens + sum(submission.estimated_tokens(m.request) for m in outbox),
    }
    store = BatchStore.of(deps)
    if not store.record_slice(batch, me, start=start, cursor=cursor):
        logger.warning("another run took this batch's ingest over", extra={"batch_id": batch.id})
        return False
    store.begin(batch.id)  # its lines may go from now on
    metrics.add_metric(name="BatchLines", unit=MetricUnit.Count, value=len(made))
    logger.info("batch lines read", extra={"batch_id": batch.id, "lines": done, "of": total, "queued": len(outbox)})
    from stratus.batches.schedule import release_step  # (the scheduled pass imports this module)

    try:  # the slice's first lines go now; if this step fails, the scheduled pass sends them
        release_step(release.Meter(), deps)
    except Exception:
        logger.exception("could not release the batch's lines")
    return done < total
