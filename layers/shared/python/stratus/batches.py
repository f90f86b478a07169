"""Batch files: a JSONL file of requests in, an output file (and an error file) out.

  batches/input/<tenant>/<name>.jsonl    uploading here creates a batch (S3 -> EventBridge -> batch fn)
  batches/files/<tenant>/<name>.jsonl    POST /v1/batches {"input_file_id": "<name>.jsonl"} copies it
                                         to the input prefix (ingested like an upload) and answers at once
  batches/output/<batch id>/             output.jsonl, errors.jsonl, manifest.json when every line is done
  batches/state/<batch id>/lines/        which job serves each line, a file per slice of SLICE lines
  batches/state/<batch id>/outbox/       the lines' queue messages, sent a few at a time (stratus.release)

A file is streamed, never held whole: counted once, then read SLICE lines at a time (each slice an
S3 range read from where the one before ended), over as many runs as it takes (ingest()).
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
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, suppress
from dataclasses import dataclass, field
from itertools import islice
from typing import TypeVar
from urllib.parse import quote

from aws_lambda_powertools.metrics import MetricUnit
from boto3.dynamodb.conditions import Key

from stratus import release, submission
from stratus.contracts import QueueMessage, Status
from stratus.deps import Deps
from stratus.errors import Conflict, InvalidRequest, NotFound, PayloadTooLarge, StratusError
from stratus.jobstore import load_result
from stratus.keys import Tenant, check_tenant
from stratus.observability import logger, metrics
from stratus.s3parts import PartWriter
from stratus.shapes import completion_body
from stratus.wire import ROUTE_PATHS, json_object, parse_request, require_unicode

INPUT_PREFIX, FILES_PREFIX = "batches/input/", "batches/files/"
POSTED = "posted"  # batches/input/<tenant>/posted/<nonce>/<file>: copies made by POST /v1/batches
TENANT_INDEX, OPEN_INDEX = "tenant-batches", "open-batches"  # template.yaml: JobsTable's indexes
OPEN = "open"  # open_batch's one value
OPEN_STATUSES = ("validating", "in_progress", "cancelling")  # the scheduled pass still has work on these
SLICE = 1000  # lines one ingest step reads into jobs and records (~10-20 s of DynamoDB calls)
LEASE_S = 120  # an ingest step holds its batch this long; a dead one's batch is taken over after
KEEP_S = 30 * 86400  # batch records outlive their jobs' cache TTL: the output files are what matter
MAX_PAGE = 100  # batches a GET /v1/batches page holds at most
MAX_LINES = 50_000  # lines in one file (OpenAI's limit); read SLICE at a time, over several invocations
MAX_FILE_BYTES = 200 * 1024 * 1024  # one file's size (OpenAI's limit); streamed, never held whole
READ_CHUNK = 1 << 20  # bytes a read of the file takes from S3 at a time
MAX_LINE_BYTES = 4 << 20  # one line: no request that fits a queue message (256 KiB) comes near it
AT_ONCE = 16  # lines whose DynamoDB calls run at once (ingest, cancel): each line's are independent


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
    input_etag: str = ""  # the version the batch reads (its upload event's); another version fails it
    status: str = "validating"  # validating -> in_progress -> completed | failed; cancelling -> cancelled
    created_at: int = field(default_factory=lambda: int(time.time()))
    completed_at: int | None = None
    counts: dict = field(default_factory=lambda: {"total": 0, "completed": 0, "failed": 0})
    output_file: str | None = None
    error_file: str | None = None
    errors: list = field(default_factory=list)  # file-level problems (unreadable input)
    outbox: int = 0  # queue messages to send (stratus.release) ...
    released: int = 0  # ... and how many have gone
    outbox_tokens: int = 0  # the outbox's requests' estimated tokens (a line's weight in a fair share)
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    lines_total: int | None = None  # the file's non-blank lines (known from the first slice on) ...
    ingested: int = 0  # ... and how many have been read into jobs (slices of SLICE)
    ingest_until: int = 0  # an ingest step holds the batch until then (0: nobody)
    attempting: int | None = None  # `ingested` when the last step took the lease: equal, a slice began and never ended
    read_offset: int = 0  # where in the file (bytes) the next slice starts ...
    read_line: int = 0  # ... and the number of the line before it (blank lines count)
    settled: int = 0  # the first lines (file order) whose jobs have finished: the pass reads past them ...
    settled_done: int = 0  # ... and how many of those finished DONE
    settled_parts: dict = field(default_factory=dict)  # lines files past that mark whose every line has
    # finished -> how many DONE: not read again

    def to_item(self) -> dict:
        item = {
            "pk": f"batch#{self.id}",
            "tenant": self.tenant,
            "input_file": self.input_file,
            "status": self.status,
            "created_at": self.created_at,
            "counts": json.dumps(self.counts),
            "errors": json.dumps(self.errors),
            "expires_at": self.created_at + KEEP_S,
            "batch_tenant": self.tenant,
            "outbox": self.outbox,
            "released": self.released,
            "outbox_tokens": self.outbox_tokens,
            "ingested": self.ingested,
            "settled": self.settled,
            "settled_done": self.settled_done,
            "read_offset": self.read_offset,
            "read_line": self.read_line,
            "settled_parts": json.dumps(self.settled_parts),
        }
        if self.status in OPEN_STATUSES:
            item["open_batch"] = OPEN
        for name in (
            "completed_at",
            "output_file",
            "error_file",
            "cancelling_at",
            "cancelled_at",
            "lines_total",
            "input_etag",
        ):
            if getattr(self, name) is not None:
                item[name] = getattr(self, name)
        return item

    @classmethod
    def from_item(cls, item: dict) -> Batch:
        ints = {
            k: int(item[k])
            for k in (
                "completed_at",
                "cancelling_at",
                "cancelled_at",
                "outbox",
                "released",
                "lines_total",
                "ingested",
                "ingest_until",
                "settled",
                "settled_done",
                "read_offset",
                "read_line",
                "outbox_tokens",
                "attempting",
            )
            if k in item
        }
        return cls(
            item["pk"].removeprefix("batch#"),
            item["tenant"],
            item["input_file"],
            item.get("input_etag", ""),
            item["status"],
            int(item["created_at"]),
            counts=json.loads(item["counts"]),
            output_file=item.get("output_file"),
            error_file=item.get("error_file"),
            errors=json.loads(item.get("errors", "[]")),
            settled_parts={int(p): int(d) for p, d in json.loads(item.get("settled_parts", "{}")).items()},
            **ints,
        )

    @property
    def line_tokens(self) -> float:
        """A line's estimated tokens, the mean over the outbox (one at least: a line is a forward pass)."""
        return max(self.outbox_tokens / self.outbox, 1.0) if self.outbox else 1.0

    @property
    def ingesting(self) -> bool:
        """Lines of its file are still to be read (or nobody has started)."""
        return self.status in ("validating", "in_progress") and (
            self.lines_total is None or self.ingested < self.lines_total
        )

    def view(self, bucket: str) -> dict:
        """The OpenAI batch object; file ids work with GET /v1/files/{id}/content, and the
        *_uri fields say where the files are in S3."""
        s3 = lambda key: f"s3://{bucket}/{key}" if key else None  # noqa: E731
        posted = f"{INPUT_PREFIX}{self.tenant}/{POSTED}/" in self.input_file  # a copy made by POST /v1/batches
        input_id = self.input_file.rsplit("/", 1)[-1] if posted else s3(self.input_file)
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": "/v1/chat/completions",
            "input_file_id": input_id,
            "completion_window": "24h",
            "status": self.status,
            "created_at": self.created_at,
            "completed_at": self.completed_at,
            "cancelling_at": self.cancelling_at,
            "cancelled_at": self.cancelled_at,
            "output_file_id": f"file-{self.id}-output" if self.output_file else None,
            "error_file_id": f"file-{self.id}-errors" if self.error_file else None,
            "input_file_uri": s3(self.input_file),
            "output_file_uri": s3(self.output_file),
            "error_file_uri": s3(self.error_file),
            "request_counts": self.counts,
            "errors": {"object": "list", "data": self.errors} if self.errors else None,
        }


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
    if d.get("url") not in ROUTE_PATHS:
        raise InvalidRequest(f"url must be one of {', '.join(ROUTE_PATHS)}, got {d.get('url')!r}", param="url")
    if not isinstance(d.get("body"), dict):
        raise InvalidRequest("body must be an object", param="body")
    return custom_id, ROUTE_PATHS[d["url"]], d["body"], False


def _error(exc: StratusError) -> dict:
    return {"code": exc.code or "invalid_request", "message": exc.message, "param": exc.param}


@dataclass(frozen=True)
class Row:
    """A non-blank line of a batch file."""

    n: int  # its number in the file, 1-based (blank lines count)
    raw: bytes  # its bytes, without the line end (the first MAX_LINE_BYTES + 1 of a longer line)
    end: int  # the byte offset just past it: where the next line starts
    too_long: bool = False  # longer than MAX_LINE_BYTES: an error line, never held whole


def _rows(batch: Batch, deps: Deps, *, offset: int = 0, line: int = 0) -> Iterator[Row]:
    """The file's non-blank lines from byte `offset` on (line `line` + 1 starts there), streamed a
    READ_CHUNK at a time: memory holds the lines a caller keeps, never the file. Lines end at "\n"
    (a "\r" before it is dropped), as JSONL says: a U+2028 inside a JSON string is not a line end.
    Always the version the batch was made for (IfMatch on its upload's ETag)."""
    get = {"Bucket": deps.settings.bucket, "Key": batch.input_file, **_its_version(batch)}
    if offset:
        get["Range"] = f"bytes={offset}-"
    with closing(deps.s3.get_object(**get)["Body"]) as body:
        parts, size, n, end = [], 0, line, offset  # size: the line's bytes so far, kept or not
        for chunk in body.iter_chunks(READ_CHUNK):
            *ended, rest = chunk.split(b"\n")
            for piece in ended:
                raw, size = b"".join([*parts, piece[: _room(size)]]), size + len(piece)
                n, end = n + 1, end + size + 1
                if raw.strip():
                    yield Row(n, raw.removesuffix(b"\r"), end, too_long=size > MAX_LINE_BYTES)
                parts, size = [], 0
            parts.append(rest[: _room(size)])  # (past MAX_LINE_BYTES, the rest of a line is only counted)
            size += len(rest)
        raw = b"".join(parts)
        if raw.strip():  # a last line without a line end
            yield Row(n + 1, raw.removesuffix(b"\r"), end + size, too_long=size > MAX_LINE_BYTES)


def _room(size: int) -> int:
    """How many more bytes a line of `size` bytes so far keeps: up to MAX_LINE_BYTES + 1 in all."""
    return max(0, MAX_LINE_BYTES + 1 - size)


def _its_version(batch: Batch) -> dict:
    """S3 read arguments for the version of the file the batch was made for (its upload's ETag)."""
    return {"IfMatch": f'"{batch.input_etag}"'} if batch.input_etag else {}


def _text(row: Row) -> str:
    if row.too_long:
        raise InvalidRequest(f"the line has more than {MAX_LINE_BYTES} bytes: no request that big can be queued")
    try:
        return row.raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"the line is not UTF-8 (a bad byte at {exc.start})") from None


class UnusableFile(InvalidRequest):
    """A file that cannot be a batch: the batch fails, saying why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _lines_in_file(batch: Batch, deps: Deps) -> int:
    """The file's non-blank lines, counted as they stream by; UnusableFile past the limits."""
    size = deps.s3.head_object(Bucket=deps.settings.bucket, Key=batch.input_file, **_its_version(batch))[
        "ContentLength"
    ]
    if size > MAX_FILE_BYTES:
        raise UnusableFile("file_too_large", f"the file has {size} bytes; at most {MAX_FILE_BYTES} per batch: split it")
    total = sum(1 for _ in _rows(batch, deps))
    if total > MAX_LINES:
        raise UnusableFile("too_many_lines", f"the file has {total} lines; at most {MAX_LINES} per batch: split it")
    return total


# ---- creating a batch -----------------------------------------------------------------------


def batch_id_for_upload(bucket: str, key: str, etag: str) -> str:
    """The same upload (a redelivered event) always maps to the same batch."""
    return "batch_" + hashlib.sha256(f"{bucket}/{key}/{etag}".encode()).hexdigest()[:24]


CHANGED = {"PreconditionFailed", "412"}  # the object is not the version a batch was made for
PERMANENT_S3 = {"NoSuchKey", "NoSuchBucket", "AccessDenied", "InvalidObjectState", "404", "403", *CHANGED}


def _code(exc: Exception) -> str:
    return getattr(exc, "response", {}).get("Error", {}).get("Code", "") or type(exc).__name__


def _permanent(exc: Exception) -> bool:
    """An input error that no retry can fix (a missing, forbidden or replaced object, bad content)."""
    return isinstance(exc, UnusableFile) or _code(exc) in PERMANENT_S3


def tenant_of_upload(key: str) -> str:
    rest = key.removeprefix(INPUT_PREFIX)
    if rest == key or "/" not in rest:
        raise InvalidRequest(f"batch files go under {INPUT_PREFIX}<tenant>/, got {key!r}")
    return check_tenant(rest.split("/", 1)[0])


def create(batch_id: str, tenant: str, key: str, deps: Deps, etag: str = "") -> Batch:
    """An uploaded file: record the batch (new, or announced by POST /v1/batches), then ingest it
    for up to BatchIngestSeconds; the scheduled pass goes on with what is left. A redelivered event
    finds the batch recorded and goes on with its ingest (or finds it done)."""
    batch = Batch(batch_id, tenant, key, etag.strip('"'))
    try:
        deps.table.put_item(
            Item=batch.to_item(),
            ConditionExpression="attribute_not_exists(pk) OR (pending = :t AND #s = :v)",
            ExpressionAttributeNames={"#s": "status"},
            ExpressionAttributeValues={":t": True, ":v": "validating"},
        )
    except deps.table.meta.client.exceptions.ConditionalCheckFailedException:
        logger.info("batch exists already (a redelivered event)", extra={"batch_id": batch_id})
    return ingest(batch_id, deps, deps.clock() + deps.settings.batch_ingest_s)


def ingest(batch_id: str, deps: Deps, until: float) -> Batch:
    """Read slices of a batch's file into jobs while time is left (one at least), each under a
    lease so that two runs never read the same batch at once -> the batch as it stands.

    Each slice: its lines' jobs are created (submission.submit, not sent), their messages appended
    to the outbox and the lines recorded (batches/state/<id>/lines/<slice>.json); then one
    conditional write moves the cursor. A run that died mid-slice leaves the cursor where it was:
    the next run redoes that slice, and puts the jobs it finds queued back in the outbox (their
    messages may never have gone). The batch is in_progress from its first slice on, so its lines
    are released while the rest is read."""
    me = uuid.uuid4().hex
    try:
        while (held := _lease(batch_id, me, deps)) is not None:
            batch, resumed = Batch.from_item(held), held.get("attempting") == held.get("ingested", 0)
            if batch.lines_total is None:  # the first slice: is the file one batch?
                batch.lines_total = _read_or_fail(batch, deps, lambda: _lines_in_file(batch, deps))  # noqa: B023 — called at once
            rows = (
                None
                if batch.lines_total is None
                else _read_or_fail(
                    batch,
                    deps,
                    lambda: list(islice(_rows(batch, deps, offset=batch.read_offset, line=batch.read_line), SLICE)),  # noqa: B023
                )
            )
            if rows is None:
                return get_any(batch_id, deps)  # failed: the file cannot be a batch
            if not _ingest_slice(batch, rows, resumed, me, deps) or deps.clock() >= until:
                break
    finally:
        _unlease(batch_id, me, deps)
    return get_any(batch_id, deps)


def _lease(batch_id: str, me: str, deps: Deps) -> dict | None:
    """Hold a batch that has lines to read and nobody else reading -> its item before (None: no)."""
    now = int(deps.clock())
    try:
        return deps.table.update_item(
            Key={"pk": f"batch#{batch_id}"},
            UpdateExpression="SET ingest_until = :until, ingester = :me, attempting = ingested REMOVE pending",
            ConditionExpression="#s IN (:v, :p) AND (attribute_not_exists(lines_total) OR ingested < lines_total) "
            "AND (attribute_not_exists(ingest_until) OR ingest_until < :now OR ingester = :me)",
            ExpressionAttributeNames={"#s": "status"},
            ExpressionAttributeValues={
                ":until": now + LEASE_S,
                ":me": me,
                ":now": now,
                ":v": "validating",
                ":p": "in_progress",
            },
            ReturnValues="ALL_OLD",
        )["Attributes"]
    except deps.table.meta.client.exceptions.ConditionalCheckFailedException:
        return None


def _unlease(batch_id: str, me: str, deps: Deps) -> None:
    try:
        deps.table.update_item(
            Key={"pk": f"batch#{batch_id}"},
            UpdateExpression="REMOVE ingest_until, ingester",
            ConditionExpression="ingester = :me",
            ExpressionAttributeValues={":me": me},
        )
    except deps.table.meta.client.exceptions.ConditionalCheckFailedException:
        pass  # not ours (never taken, or taken over)


T, U = TypeVar("T"), TypeVar("U")


def _read_or_fail(batch: Batch, deps: Deps, read: Callable[[], T]) -> T | None:
    """read() from the batch's file -> what it read; None when the file cannot be a batch (the batch
    is then failed, saying why). Raises for a transient error (the run is retried and resumes)."""
    try:
        return read()
    except Exception as exc:
        if not _permanent(exc):  # throttled, a 5xx, the network
            raise
        code, message = (
            (exc.code, exc.message)
            if isinstance(exc, UnusableFile)
            else (
                "input_changed",
                "the input file was replaced while it was read: upload the new one as a "
                "new batch (it is one: a new version is a new batch)",
            )
            if _code(exc) in CHANGED
            else ("input_unreadable", f"the input file cannot be read ({_code(exc)})")
        )
        batch.status, batch.errors = "failed", [{"code": code, "message": message}]
        deps.table.put_item(Item=batch.to_item())
        logger.info("batch failed", extra={"batch_id": batch.id, "code": code})
        _stand_down(batch, deps)
        return None


def _stand_down(batch: Batch, deps: Deps) -> None:
    """A batch failed after some of its lines became jobs: nobody will read their answers, so the
    jobs it made that have not started are cancelled and its outbox (their prompts) deleted; running
    ones finish (cached). Best effort: what is left expires (jobs) or goes by the lifecycle rule."""
    if not batch.ingested and batch.attempting is None:
        return
    try:
        lines = _read_lines(batch, deps)
        _cancel_queued(lines, deps.store.statuses(sorted({l.job_id for l in lines if l.job_id})), batch, deps)
        _cancel_dead_slice(batch, deps)
        release.delete_outbox(batch.id, batch.outbox + SLICE, deps)  # (+ a dead slice's part, if any)
    except Exception:
        logger.exception("could not cancel a failed batch's jobs", extra={"batch_id": batch.id})


def _cancel_dead_slice(batch: Batch, deps: Deps) -> None:
    """A run that died mid-slice may have made jobs that no lines file names (a redo of the slice
    finds them again; a cancel or failure first would leave them QUEUED for ever, with a request or
    another batch's line that joined one waiting on it). Each line names its job's id (its cache key,
    or one derived from the batch and the line): those this batch made are cancelled."""
    if batch.attempting != batch.ingested or batch.lines_total is None or batch.ingested >= batch.lines_total:
        return
    s, ids = deps.settings, []
    try:
        for row in islice(_rows(batch, deps, offset=batch.read_offset, line=batch.read_line), SLICE):
            try:
                _, route, body, _ = parse_line(_text(row), s.model_id)
                req = parse_request(route, body, max_messages=s.max_messages, max_tokens_limit=s.max_tokens)
            except InvalidRequest:
                continue  # (an error line made no job)
            ids.append(
                submission.job_id_for(
                    req,
                    batch.tenant,
                    s,
                    cacheable=req.params.deterministic,
                    origin=submission.line_origin(batch.id, row.n),
                )
            )
    except Exception:
        logger.exception("could not read the slice a run left unfinished", extra={"batch_id": batch.id})
        return
    cancelled = sum(1 for job in _at_once(lambda j: deps.store.cancel_batch_job(j, batch.id), ids) if job)
    logger.info("cancelled the jobs of a slice a run left unfinished", extra={"batch_id": batch.id, "jobs": cancelled})


def _cancel_queued(lines: list[Line], statuses: dict[str, Status], batch: Batch, deps: Deps) -> set[str]:
    """Cancel the lines' QUEUED jobs that this batch made (Job.batch; the condition refuses the
    others: another batch's, a request's, a promoted one) -> the ids cancelled."""
    queued = sorted({l.job_id for l in lines if statuses.get(l.job_id) == Status.QUEUED})
    return {
        j
        for j, job in zip(queued, _at_once(lambda j: deps.store.cancel_batch_job(j, batch.id), queued))
        if job is not None
    }


def _ingest_slice(batch: Batch, rows: list[Row], resumed: bool, me: str, deps: Deps) -> bool:
    """Make the slice at the batch's cursor (`rows`, its lines) into jobs -> True when more is left
    to read by this run."""
    s, start = deps.settings, batch.ingested
    if resumed:
        logger.info("redoing a slice an earlier run left unfinished", extra={"batch_id": batch.id, "start": start})
    owner = Tenant(batch.tenant, rpm=0, tpm=0)  # (the file was the charge)

    def job_of(row: Row) -> tuple[Line, QueueMessage | None]:
        """A line's job -> (the line, the message to send when this batch made the job)."""
        line = Line(row.n, None)
        try:
            line.custom_id, route, body, line.bedrock = parse_line(_text(row), s.model_id)
            sub = submission.submit(route, body, owner, deps, submission.batch_line(s, batch.id, row.n))
        except (InvalidRequest, NotFound, PayloadTooLarge) as exc:
            line.error = _error(exc)
            return line, None
        line.job_id = sub.job_id
        mine = sub.created or (
            resumed and sub.job is not None and sub.job.status == Status.QUEUED and sub.job.batch == batch.id
        )  # made by the run that died: may never have gone
        return line, sub.message if mine else None

    lines, outbox = [], []
    for line, message in _at_once(job_of, rows):
        if message is not None:
            line.outbox = batch.outbox + len(outbox)
            outbox.append(message)
        lines.append(line)
    logger.remove_keys(["job_id"])  # submit() tagged the log with each line's job in turn
    release.write_outbox(batch.id, outbox, deps, start=batch.outbox)
    deps.s3.put_object(
        Bucket=s.bucket, Key=_lines_key(batch.id, start // SLICE), Body=json.dumps([l.__dict__ for l in lines]).encode()
    )
    total = batch.lines_total
    failed = sum(1 for l in lines if l.error) + (batch.counts["failed"] if start else 0)
    counts = {"total": total, "completed": 0 if not start else batch.counts["completed"], "failed": failed}
    done = start + len(lines)
    end, last = (rows[-1].end, rows[-1].n) if rows else (batch.read_offset, batch.read_line)
    try:
        deps.table.update_item(
            Key={"pk": f"batch#{batch.id}"},
            UpdateExpression="SET ingested = :done, lines_total = :total, outbox = :o, counts = :c, "
            "read_offset = :end, read_line = :last, outbox_tokens = :ot",
            ConditionExpression="ingester = :me AND ingested = :start",
            ExpressionAttributeValues={
                ":done": done,
                ":total": total,
                ":o": batch.outbox + len(outbox),
                ":c": json.dumps(counts),
                ":me": me,
                ":start": start,
                ":end": end,
                ":last": last,
                ":ot": batch.outbox_tokens + sum(submission.estimated_tokens(m.request) for m in outbox),
            },
        )
    except deps.table.meta.client.exceptions.ConditionalCheckFailedException:
        logger.warning("another run took this batch's ingest over", extra={"batch_id": batch.id})
        return False
    _begin(batch.id, deps)  # its lines may go from now on
    metrics.add_metric(name="BatchLines", unit=MetricUnit.Count, value=len(lines))
    logger.info("batch lines read", extra={"batch_id": batch.id, "lines": done, "of": total, "queued": len(outbox)})
    try:  # the slice's first lines go now; if this step fails, the scheduled pass sends them
        release_step(release.Meter(), deps)
    except Exception:
        logger.exception("could not release the batch's lines")
    return done < total


def _begin(batch_id: str, deps: Deps) -> None:
    """validating -> in_progress: its lines may be released."""
    try:
        deps.table.update_item(
            Key={"pk": f"batch#{batch_id}"},
            UpdateExpression="SET #s = :p",
            ConditionExpression="#s = :v",
            ExpressionAttributeNames={"#s": "status"},
            ExpressionAttributeValues={":p": "in_progress", ":v": "validating"},
        )
    except deps.table.meta.client.exceptions.ConditionalCheckFailedException:
        pass  # in progress already, or cancelled meanwhile (it keeps the cancel)


def _at_once(fn: Callable[[T], U], items: list[T]) -> list[U]:
    """[fn(item) for item in items], AT_ONCE calls at a time (they wait on DynamoDB, not the CPU)."""
    if len(items) < 2:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(AT_ONCE) as pool:
        return list(pool.map(fn, items))


def _lines_key(batch_id: str, part: int) -> str:
    return f"batches/state/{batch_id}/lines/{part:05d}.json"


BATCH_ID = re.compile(r"batch_[0-9a-f]{24}")  # batch_id_for_upload's shape


def get(batch_id: str, tenant: str, deps: Deps) -> Batch:
    if not isinstance(batch_id, str) or not BATCH_ID.fullmatch(batch_id):
        raise NotFound("batch not found: batch ids are 'batch_' + 24 hexadecimal digits")
    item = deps.table.get_item(Key={"pk": f"batch#{batch_id}"}, ConsistentRead=True).get("Item")
    if item is None or item["tenant"] != tenant:
        raise NotFound(f"batch {batch_id!r} not found")
    return Batch.from_item(item)


def get_any(batch_id: str, deps: Deps) -> Batch:
    """A batch by id, whoever owns it (the batch function's own reads)."""
    return Batch.from_item(deps.table.get_item(Key={"pk": f"batch#{batch_id}"}, ConsistentRead=True)["Item"])


def list_recent(tenant: str, deps: Deps, limit: int = 20, after: str | None = None) -> tuple[list[Batch], bool]:
    """GET /v1/batches: the tenant's batches, newest first, `limit` a page from the one after batch
    `after` (one Query of the tenant index) -> (the page, whether more follow)."""
    kwargs = {
        "IndexName": TENANT_INDEX,
        "KeyConditionExpression": Key("batch_tenant").eq(tenant),
        "ScanIndexForward": False,
        "Limit": limit + 1,
    }  # one more says whether more follow
    if after is not None:
        start = get(after, tenant, deps)  # 404 for another tenant's or a malformed id
        kwargs["ExclusiveStartKey"] = {
            "pk": f"batch#{start.id}",
            "batch_tenant": tenant,
            "created_at": start.created_at,
        }
    items = deps.table.query(**kwargs).get("Items", [])
    return [Batch.from_item(i) for i in items[:limit]], len(items) > limit


def list_page(query: dict, tenant: str, deps: Deps) -> dict:
    """GET /v1/batches?limit=&after= -> the OpenAI list object."""
    raw = query.get("limit") or "20"
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_PAGE:  # ("²" is a digit to str.isdigit)
        raise InvalidRequest(f"limit must be an integer from 1 to {MAX_PAGE}", param="limit")
    page, more = list_recent(tenant, deps, int(raw), query.get("after"))
    data = [b.view(deps.settings.bucket) for b in page]
    return {
        "object": "list",
        "data": data,
        "has_more": more,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }


def cancel(batch_id: str, tenant: str, deps: Deps) -> Batch:
    """POST /v1/batches/{id}/cancel: stop releasing the batch's lines; the scheduled pass does the
    rest (module docstring). Cancelling a cancelling or cancelled batch answers it as it is."""
    batch = get(batch_id, tenant, deps)
    try:
        item = deps.table.update_item(
            Key={"pk": f"batch#{batch.id}"},
            UpdateExpression="SET #s = :c, cancelling_at = :now",
            ConditionExpression="#s IN (:v, :p)",
            ExpressionAttributeNames={"#s": "status"},
            ExpressionAttributeValues={
                ":c": "cancelling",
                ":now": int(deps.clock()),
                ":v": "validating",
                ":p": "in_progress",
            },
            ReturnValues="ALL_NEW",
        )["Attributes"]
    except deps.table.meta.client.exceptions.ConditionalCheckFailedException:
        batch = get(batch_id, tenant, deps)
        if batch.status in ("cancelling", "cancelled"):
            return batch
        raise Conflict(
            f"batch {batch_id} is already {batch.status}; only validating or in-progress batches can be cancelled"
        ) from None
    metrics.add_metric(name="BatchesCancelled", unit=MetricUnit.Count, value=1)
    logger.info("batch cancelling", extra={"batch_id": batch.id})
    return Batch.from_item(item)


def create_from_request(body: dict, tenant: str, deps: Deps) -> Batch:
    """POST /v1/batches: {"input_file_id": "<name under batches/files/<tenant>/>", "endpoint", ...}."""
    if not isinstance(body, dict) or not isinstance(body.get("input_file_id"), str) or not body["input_file_id"]:
        raise InvalidRequest(
            f"input_file_id is required: the name of a file under s3://{deps.settings.bucket}/{FILES_PREFIX}{tenant}/",
            param="input_file_id",
        )
    endpoint = body.get("endpoint", "/v1/chat/completions")
    if not isinstance(endpoint, str) or endpoint not in ROUTE_PATHS:
        raise InvalidRequest(f"endpoint must be one of {', '.join(ROUTE_PATHS)}", param="endpoint")
    bucket, name = deps.settings.bucket, body["input_file_id"]
    source = f"{FILES_PREFIX}{tenant}/{name}"
    try:
        deps.s3.head_object(Bucket=bucket, Key=source)
    except Exception as exc:
        raise NotFound(f"no file {name!r} under {FILES_PREFIX}{tenant}/", param="input_file_id") from exc
    # The copy under the input prefix is an upload like any other: the batch function ingests it.
    key = f"{INPUT_PREFIX}{tenant}/{POSTED}/{uuid.uuid4().hex[:12]}/{name.rsplit('/', 1)[-1]}"
    etag = deps.s3.copy_object(Bucket=bucket, Key=key, CopySource={"Bucket": bucket, "Key": source})[
        "CopyObjectResult"
    ]["ETag"]
    batch = Batch(batch_id_for_upload(bucket, key, etag.strip('"')), tenant, key, etag.strip('"'))
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
    try:
        message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
        fields = {part.get_param("name", header="content-disposition"): part for part in message.iter_parts()}
        purpose = _field_text(fields["purpose"]) if "purpose" in fields else None
        file = fields.get("file")
        filename, data = (
            (file.get_filename() or "upload.jsonl", file.get_payload(decode=True)) if file else (None, None)
        )
    except Exception as exc:
        raise InvalidRequest(f"the multipart body cannot be read ({type(exc).__name__})") from None
    if purpose != "batch":
        raise InvalidRequest(f"purpose must be 'batch', got {purpose!r}", param="purpose")
    if file is None:
        raise InvalidRequest("the file field is missing", param="file")
    if not isinstance(data, bytes):
        raise InvalidRequest("the file field must hold the file's bytes, not further parts", param="file")
    return filename, data


def _field_text(part) -> str | None:
    """A form field's value as text (whatever its content type says)."""
    raw = part.get_payload(decode=True)
    return raw.decode("utf-8", "replace").strip() if isinstance(raw, bytes) else None


def upload_file(filename: str, data: bytes, tenant: str, deps: Deps) -> dict:
    """POST /v1/files (purpose "batch"): keep the file under the tenant's files prefix."""
    file_id = "file-" + uuid.uuid4().hex[:24]
    deps.s3.put_object(
        Bucket=deps.settings.bucket,
        Key=f"{FILES_PREFIX}{tenant}/{file_id}",
        Body=data,
        ContentType="application/jsonl",
        Metadata={"filename": quote(filename[:200])},
    )  # (S3 metadata is ASCII: percent-encoded)
    return {
        "id": file_id,
        "object": "file",
        "bytes": len(data),
        "created_at": int(time.time()),
        "filename": filename,
        "purpose": "batch",
        "status": "processed",
    }


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
    except Exception as exc:
        raise NotFound(f"file {file_id!r} not found") from exc
    if size > MAX_CONTENT_BYTES:
        raise PayloadTooLarge(
            f"file {file_id!r} has {size} bytes, over the {MAX_CONTENT_BYTES} an API response "
            f"carries: read s3://{bucket}/{key}"
        )
    return deps.s3.get_object(Bucket=bucket, Key=key)["Body"].read()


# ---- progress, release and output ----------------------------------------------------------


def run_pass(deps: Deps) -> dict:
    """The scheduled pass: finish what is done, go on reading files an upload's run left (for up to
    BatchIngestSeconds), then release lines for BatchPassSeconds. The open batches are read once
    for the first two (the release steps read them afresh each step)."""
    batches = _open_batches(deps)
    completed = advance(deps, batches)
    left = [b for b in batches if b.id not in completed]
    return {
        "completed": completed,
        "ingested": ingest_left(deps.clock() + deps.settings.batch_ingest_s, deps, left),
        "released": release_for(deps.settings.batch_pass_s, deps),
    }


def ingest_left(until: float, deps: Deps, batches: list[Batch] | None = None) -> list[str]:
    """Go on reading the files of open batches with lines left and nobody reading them (an upload's
    run ran out of time, or died) -> their ids. (Each ingest takes the batch's lease: a stale view
    of it here only costs a refused lease.)"""
    went_on = []
    for b in _open_batches(deps) if batches is None else batches:
        if went_on and deps.clock() >= until:
            break  # (one batch at least, a slice at least: a pass always makes progress)
        if b.ingest_until >= deps.clock():
            continue
        if not b.ingesting:
            if b.status == "validating" and b.ingested:  # a run read it all but died before its last write
                _begin(b.id, deps)
            continue
        went_on.append(b.id)
        try:
            ingest(b.id, deps, until)
        except Exception:
            logger.exception("could not go on reading a batch", extra={"batch_id": b.id})
            metrics.add_metric(name="batch_pass_errors", unit=MetricUnit.Count, value=1)
    return went_on


def release_for(seconds: float, deps: Deps) -> int:
    """Release steps every batch_release_every_s for `seconds` (one at least), while any open batch
    has lines left to send; returns the lines sent."""
    meter, until, sent = release.Meter(), deps.clock() + seconds, 0
    while True:
        try:
            step_sent = release_step(meter, deps)
        except Exception:
            logger.exception("a release step failed")
            metrics.add_metric(name="batch_pass_errors", unit=MetricUnit.Count, value=1)
            return sent
        sent += max(step_sent, 0)
        if step_sent < 0 or deps.clock() + deps.settings.batch_release_every_s > until:
            return sent
        deps.sleep(deps.settings.batch_release_every_s)


def release_step(meter: release.Meter, deps: Deps) -> int:
    """One release step over the open batches with lines left; -1 when there are none."""
    pending = [
        release.Pending(b.id, b.tenant, b.released, b.outbox, b.created_at, b.line_tokens)
        for b in _open_batches(deps)
        if b.status == "in_progress" and b.released < b.outbox
    ]  # oldest first
    return release.step(pending, meter, deps) if pending else -1


def advance(deps: Deps, batches: list[Batch] | None = None) -> list[str]:
    """Count finished lines of every open batch; finish the batches with nothing pending (and the
    cancelling ones with nothing running). Returns the ids of the batches this pass finished."""
    completed = []
    for b in _open_batches(deps) if batches is None else batches:
        step = PASS_STEPS.get(b.status)
        if step is None:
            continue  # still being ingested (validating)
        try:  # one batch that fails (a missing state file, a throttled read) never stops the others
            if step(b, deps):  # its output written: no longer open
                completed.append(b.id)
        except Exception:
            logger.exception("could not advance a batch", extra={"batch_id": b.id})
            metrics.add_metric(name="batch_pass_errors", unit=MetricUnit.Count, value=1)
    return completed


def _open_batches(deps: Deps) -> list[Batch]:
    """Every open batch as it stands (strongly consistent reads, 100 a call), oldest first; none
    when they cannot be read (logged and counted: the next pass or step reads them again)."""
    ids = _open_batch_ids(deps)
    try:
        items = {i["pk"]: i for i in deps.store.items([f"batch#{b}" for b in ids])}
    except Exception:
        logger.exception("could not read the open batches")
        metrics.add_metric(name="batch_pass_errors", unit=MetricUnit.Count, value=1)
        return []
    # (the index lags behind the items: a batch just finished is still listed)
    return [
        Batch.from_item(item)
        for b in ids
        if (item := items.get(f"batch#{b}")) is not None and item.get("open_batch") == OPEN
    ]


def _open_batch_ids(deps: Deps) -> list[str]:
    """Every open batch, oldest first (the open index, all pages)."""
    ids, kwargs = [], {"IndexName": OPEN_INDEX, "KeyConditionExpression": Key("open_batch").eq(OPEN)}
    while True:
        got = deps.table.query(**kwargs)
        ids += [i["pk"].removeprefix("batch#") for i in got.get("Items", [])]
        if "LastEvaluatedKey" not in got:
            return ids
        kwargs["ExclusiveStartKey"] = got["LastEvaluatedKey"]


def _line_parts(batch: Batch, deps: Deps, first: int = 0) -> Iterator[list[Line]]:
    """The lines read so far, a lines file (a slice) at a time from part `first` on, in file order."""
    for part in range(first, -(-batch.ingested // SLICE)):
        yield _line_part(batch, part, deps)


def _line_part(batch: Batch, part: int, deps: Deps) -> list[Line]:
    raw = deps.s3.get_object(Bucket=deps.settings.bucket, Key=_lines_key(batch.id, part))["Body"].read()
    return [Line(**d) for d in json.loads(raw)]


def _read_lines(batch: Batch, deps: Deps, start: int = 0) -> list[Line]:
    """The lines read so far from line index `start` on, in file order."""
    return [l for part in _line_parts(batch, deps, start // SLICE) for l in part][start % SLICE :]


def _slices(lines: list[Line]) -> list[list[Line]]:
    return [lines[i : i + SLICE] for i in range(0, len(lines), SLICE)]


DONE, PENDING, FAILED = "done", "pending", "failed"  # a line's outcome as a pass counts it


def _outcomes(lines: list[Line], batch: Batch, deps: Deps) -> list[str]:
    """Each line's outcome; a line whose message has not been released is pending without a read."""
    unsent = {l.job_id for l in lines if l.outbox is not None and l.outbox >= batch.released}
    statuses = deps.store.statuses(sorted({l.job_id for l in lines if l.job_id} - unsent))
    statuses.update(dict.fromkeys(unsent, Status.QUEUED))
    ended = _ended_elsewhere(batch, deps)
    statuses.update(_run_again(sorted({j for j, status in statuses.items() if status in ended}), ended, batch, deps))
    return [
        FAILED
        if not l.job_id
        else DONE
        if statuses.get(l.job_id) == Status.DONE
        else PENDING
        if statuses.get(l.job_id) in (Status.QUEUED, Status.RUNNING)
        else FAILED
        for l in lines
    ]


def _ended_elsewhere(batch: Batch, deps: Deps) -> set[Status]:
    """How an in-progress batch's line's job can end without an answer, not by this batch's doing:
    cancelled (another batch whose line made it was cancelled, or a DELETE /v1/jobs named a job an
    interactive request shared), or expired unstarted while this batch's window is still open (an
    older batch made it, or an older request)."""
    young = deps.clock() < batch.created_at + deps.settings.batch_window_s
    return {Status.CANCELLED, Status.EXPIRED} if young else {Status.CANCELLED}


def _run_again(job_ids: list[str], ended: set[Status], batch: Batch, deps: Deps) -> dict[str, Status]:
    """Jobs of an in-progress batch's lines that ended elsewhere without an answer (`ended`, from
    _ended_elsewhere): each is queued again for this batch (Job.batch: its cancel would cancel it)
    -> {job id: its status now}."""
    if not job_ids:
        return {}
    owner, how, out = Tenant(batch.tenant, rpm=0, tpm=0), submission.batch_line(deps.settings, batch.id), {}
    for job in deps.store.get_many(job_ids).values():
        if job.status not in ended or not job.cacheable:
            continue  # queued again meanwhile (another batch's pass), or not cacheable: its finished job
            # kept no prompt to run again, and a new one would have another id
        sub = submission.enqueue(job.request, owner, deps, how)
        if sub.job_id != job.job_id:  # (made under another model digest)
            continue
        if sub.created:
            submission.send(sub.message, deps)
        out[job.job_id] = Status.DONE if sub.hit else sub.job.status
    logger.remove_keys(["job_id"])
    metrics.add_metric(name="BatchLinesRunAgain", unit=MetricUnit.Count, value=len(out))
    logger.info("lines whose jobs ended elsewhere run again", extra={"batch_id": batch.id, "jobs": len(out)})
    return out


def _advance_one(batch: Batch, deps: Deps) -> bool:
    """Count the lines, and once nothing is pending or unread write the output. Two marks keep a
    pass's reads to the lines in flight: `settled`, the finished lines that lead the file (each
    counted once), and `settled_parts`, the lines files past it whose every line has finished, so
    a line that stays pending holds back the reads of its own file of SLICE lines, not of the rest
    of the batch. A 50,000-line batch near its end reads the statuses of the lines in flight."""
    first, stop = batch.settled // SLICE, -(-batch.ingested // SLICE)
    known = {p: d for p, d in batch.settled_parts.items() if first <= p < stop}
    tail = {
        p: _line_part(batch, p, deps)[batch.settled - p * SLICE if p == first else 0 :]
        for p in range(first, stop)
        if p not in known
    }
    flat = [l for p in sorted(tail) for l in tail[p]]
    outcomes = iter(_outcomes(flat, batch, deps))
    settled, settled_done, leading, parts = batch.settled, batch.settled_done, True, {}
    done, pending = batch.settled_done, 0
    for p in range(first, stop):
        if p in known:  # every line finished, known[p] of them DONE (a file's last part may be short)
            n = min(SLICE, batch.ingested - p * SLICE)
            o = [DONE] * known[p] + [FAILED] * (n - known[p])
        else:
            o = [next(outcomes) for _ in tail[p]]
        ended = o.index(PENDING) if PENDING in o else len(o)  # the finished lines that lead the part
        done, pending = done + o.count(DONE), pending + o.count(PENDING)
        if leading:  # the mark moves over the finished lines that lead the file
            settled, settled_done, leading = settled + ended, settled_done + o[:ended].count(DONE), ended == len(o)
        elif ended == len(o) and ((p + 1) * SLICE <= batch.ingested or batch.ingested == batch.lines_total):
            parts[p] = o.count(DONE)  # a whole part (no more lines to come), every line finished
    batch.counts = {
        "total": batch.lines_total or batch.ingested,
        "completed": done,
        "failed": batch.ingested - done - pending,
    }
    unread = (batch.lines_total or 0) - batch.ingested  # lines an ingest has still to read
    if not pending and not unread:
        whole_tail = not batch.settled and not known
        return _write_output(batch, _slices(flat) if whole_tail else _line_parts(batch, deps), deps)
    _record_progress(batch, settled, settled_done, parts, deps)
    return False


def _record_progress(batch: Batch, settled: int, settled_done: int, parts: dict[int, int], deps: Deps) -> None:
    """Counts and the settled marks (the leading one only moves on, and only while the batch is in
    progress: a pass that ran beside a later one and lost, or one that finished it, keeps its hands off)."""
    with suppress(deps.table.meta.client.exceptions.ConditionalCheckFailedException):
        deps.table.update_item(
            Key={"pk": f"batch#{batch.id}"},
            UpdateExpression="SET counts = :c, settled = :s, settled_done = :d, settled_parts = :p",
            ConditionExpression="#st = :in AND (attribute_not_exists(settled) OR settled <= :s)",
            ExpressionAttributeNames={"#st": "status"},
            ExpressionAttributeValues={
                ":c": json.dumps(batch.counts),
                ":s": settled,
                ":d": settled_done,
                ":p": json.dumps(parts),
                ":in": "in_progress",
            },
        )


def _cancel_one(batch: Batch, deps: Deps) -> bool:
    """A cancelling batch: cancel the jobs it created that have not started, wait for its running
    lines, then write what finished -> True once the batch is `cancelled`. (The cancel stopped its
    ingest: lines not read by then never become jobs.)"""
    if batch.ingest_until >= deps.clock():
        return False  # an ingest step is finishing its slice
    lines = _read_lines(batch, deps)  # the lines never read are added when the output is written
    statuses = deps.store.statuses(sorted({l.job_id for l in lines if l.job_id}))
    cancelled = _cancel_queued(lines, statuses, batch, deps)
    for l in lines:
        if l.job_id in cancelled:
            statuses[l.job_id] = Status.CANCELLED
        elif l.outbox is not None and statuses.get(l.job_id) == Status.QUEUED:
            statuses[l.job_id] = Status.RUNNING  # ours, but a worker took it meanwhile or it was promoted
    running = sum(1 for l in lines if l.job_id and statuses.get(l.job_id) == Status.RUNNING)
    if running:  # in a worker's hands: their answers go in the output
        done = sum(1 for l in lines if l.job_id and statuses.get(l.job_id) == Status.DONE)
        total = max(batch.lines_total or 0, len(lines))  # (the file was counted before it was read)
        try:  # (only while it is cancelling: a pass that finished it meanwhile wrote the final counts)
            deps.table.update_item(
                Key={"pk": f"batch#{batch.id}"},
                UpdateExpression="SET counts = :c",
                ConditionExpression="#st = :cancelling",
                ExpressionAttributeNames={"#st": "status"},
                ExpressionAttributeValues={
                    ":c": json.dumps({"total": total, "completed": done, "failed": total - done - running}),
                    ":cancelling": "cancelling",
                },
            )
        except deps.table.meta.client.exceptions.ConditionalCheckFailedException:
            pass
        return False
    if batch.lines_total is None or batch.ingested < batch.lines_total:
        _cancel_dead_slice(batch, deps)  # (once, here: those jobs have no message, so none runs meanwhile)
        lines += _unread_lines(batch, deps)
    return _write_output(batch, _slices(lines), deps, cancelled=True)


def _unread_lines(batch: Batch, deps: Deps) -> list[Line]:
    """The lines of a cancelled batch's file that were never read, each a `batch_cancelled` error
    (so every line of the file is in its output or error file); those it could read if the file
    cannot be read to its end, and none if it was never counted and is past the limits."""
    out = []
    try:
        if batch.lines_total is None:  # never read: within the limits an ingest applies, or none is named
            _lines_in_file(batch, deps)
        for row in _rows(batch, deps, offset=batch.read_offset, line=batch.read_line):
            try:
                d = json.loads(row.raw)
            except ValueError:  # (not UTF-8 either)
                d = None
            d = d if isinstance(d, dict) else {}
            custom_id = d.get("custom_id", d.get("recordId"))
            out.append(
                Line(
                    row.n,
                    custom_id if isinstance(custom_id, str) else None,
                    error=CANCELLED_LINE,
                    bedrock="recordId" in d,
                )
            )
    except Exception:
        logger.exception("could not read a cancelled batch's file", extra={"batch_id": batch.id})
    return out


PASS_STEPS = {"in_progress": _advance_one, "cancelling": _cancel_one}  # status -> the pass's work on it


def _write_output(batch: Batch, slices: Iterable[list[Line]], deps: Deps, *, cancelled: bool = False) -> bool:
    """Write the output and error files a slice of lines at a time (one slice's jobs and one part of
    each file in memory) and finish the batch -> True. False, and nothing written, when a line's
    job is running again (a no-cache request re-ran a job a settled line counted): the settled marks
    start over and the next pass counts every line afresh."""
    prefix = f"batches/output/{batch.id}/"
    output, errors = prefix + "output.jsonl", prefix + "errors.jsonl"
    files = {
        True: PartWriter(deps.s3, deps.settings.bucket, output, "application/jsonl"),
        False: PartWriter(deps.s3, deps.settings.bucket, errors, "application/jsonl"),
    }
    inputs, counts = _BedrockInputs(batch, deps), {True: 0, False: 0}
    try:
        for lines in slices:
            jobs = deps.store.get_many(sorted({l.job_id for l in lines if l.job_id}))
            if not cancelled and any(j.status in (Status.QUEUED, Status.RUNNING) for j in jobs.values()):
                logger.info("a finished line's job runs again: the batch waits for it", extra={"batch_id": batch.id})
                deps.table.update_item(
                    Key={"pk": f"batch#{batch.id}"},
                    UpdateExpression="SET settled = :z, settled_done = :z, settled_parts = :none",
                    ExpressionAttributeValues={":z": 0, ":none": "{}"},
                )
                for f in files.values():
                    f.abort()
                return False
            for l in lines:
                ok, row = _output_row(l, jobs.get(l.job_id) if l.job_id else None, inputs, cancelled, deps)
                files[ok].write((json.dumps(row) + "\n").encode())
                counts[ok] += 1
        for f in files.values():
            f.close()
    except BaseException:
        for f in files.values():
            f.abort()
        raise
    finally:
        inputs.close()
    batch.output_file, batch.error_file = output, errors
    if cancelled:
        batch.status, batch.cancelled_at = "cancelled", int(time.time())
    else:
        batch.status, batch.completed_at = "completed", int(time.time())
    batch.counts = {"total": counts[True] + counts[False], "completed": counts[True], "failed": counts[False]}
    manifest = {
        "batch_id": batch.id,
        "status": batch.status,
        "input_file": batch.input_file,
        "request_counts": batch.counts,
        "output_file": batch.output_file,
        "error_file": batch.error_file,
        "completed_at": batch.completed_at,
        "cancelled_at": batch.cancelled_at,
    }
    deps.s3.put_object(
        Bucket=deps.settings.bucket, Key=prefix + "manifest.json", Body=json.dumps(manifest, indent=2).encode()
    )
    deps.table.put_item(Item=batch.to_item())
    logger.info(f"batch {batch.status}", extra={"batch_id": batch.id, **batch.counts})
    try:  # no line will be released again: its copy of the prompts goes now, not in 30 days
        release.delete_outbox(batch.id, batch.outbox + SLICE, deps)  # (+ a dead slice's part, if any)
    except Exception:
        logger.exception("could not delete a finished batch's outbox", extra={"batch_id": batch.id})
    return True


def _output_row(l: Line, job, inputs: _BedrockInputs, cancelled: bool, deps: Deps) -> tuple[bool, dict]:
    """A line's row -> (answered?, the row of the output file if so, else of the error file)."""
    if job is not None and job.status == Status.DONE:
        body = completion_body(load_result(job, deps.s3))
        return True, (
            {"recordId": l.custom_id, "modelInput": inputs.get(l.n), "modelOutput": body}
            if l.bedrock
            else {
                "id": f"batch_req_{l.n}",
                "custom_id": l.custom_id,
                "response": {"status_code": 200, "request_id": l.job_id, "body": body},
                "error": None,
            }
        )
    error = l.error or (
        job.error
        if job is not None and job.error
        else CANCELLED_LINE
        if cancelled
        else {
            "code": (job.status.value.lower() if job else "expired"),
            "message": "the line's job did not finish" if job else "the line's job expired",
        }
    )
    return False, (
        {"recordId": l.custom_id, "modelInput": inputs.get(l.n), "error": error}
        if l.bedrock
        else {"id": f"batch_req_{l.n}", "custom_id": l.custom_id, "line": l.n, "response": None, "error": error}
    )


CANCELLED_LINE = {"code": "batch_cancelled", "message": "the batch was cancelled before this line ran"}


class _BedrockInputs:
    """Bedrock output records repeat their modelInput: read back from the input file as the output
    reaches each Bedrock line (lines come in file order, so the file is streamed once, and only
    if a Bedrock line comes)."""

    END = Row(2**62, b"", 0)

    def __init__(self, batch: Batch, deps: Deps) -> None:
        self.batch, self.deps = batch, deps
        self._rows: Iterator[Row] | None = None
        self._row: Row | None = None

    def get(self, n: int) -> dict | None:
        if self._rows is None:
            self._rows = _rows(self.batch, self.deps)  # the version the batch read, never a newer file's
        while self._row is None or self._row.n < n:
            try:
                self._row = next(self._rows, self.END)
            except Exception as exc:
                if not _permanent(exc):
                    raise  # (the pass writes the output again)
                logger.warning(
                    "the batch's input file was replaced or deleted: its Bedrock records carry no modelInput",
                    extra={"batch_id": self.batch.id, "error": _code(exc)},
                )
                self._rows, self._row = (r for r in ()), self.END
        if self._row.n != n:
            return None
        try:
            d = json.loads(self._row.raw)
        except ValueError:
            return None
        return d.get("modelInput") if isinstance(d, dict) else None

    def close(self) -> None:
        if self._rows is not None:
            self._rows.close()
