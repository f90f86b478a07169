"""The batch item and a line's record: what a batch is, as stored and as the API shows it.

Batch item: pk "batch#<id>", with `batch_tenant` (always) and `open_batch` (until it completes or
fails) keying two sparse indexes of the jobs table, both sorted by created_at: a tenant's batches
(GET /v1/batches) and the open ones (the scheduled pass). No list or set item grows with the
number of batches, so none can reach DynamoDB's 400 KB item limit. (Indexes are eventually
consistent: a batch shows in them within moments of its creation.) Every write to it goes through
stratus.batches.store.BatchStore.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from enum import Enum, StrEnum

INPUT_PREFIX, FILES_PREFIX = "batches/input/", "batches/files/"
POSTED = "posted"  # batches/input/<tenant>/posted/<nonce>/<file>: copies made by POST /v1/batches
TENANT_INDEX, OPEN_INDEX = "tenant-batches", "open-batches"  # template.yaml: JobsTable's indexes
OPEN = "open"  # open_batch's one value
KEEP_S = 30 * 86400  # batch records outlive their jobs' cache TTL: the output files are what matter
BATCH_ID = re.compile(r"batch_[0-9a-f]{24}")  # ingest.batch_id_for_upload's shape


class BatchStatus(StrEnum):
    """validating -> in_progress -> completed | failed; validating | in_progress -> cancelling -> cancelled."""

    VALIDATING = "validating"  # recorded; its file is being counted and read
    IN_PROGRESS = "in_progress"  # lines are being released and answered (its file may still be read)
    CANCELLING = "cancelling"  # no more lines go; the pass waits for the running ones
    COMPLETED = "completed"
    FAILED = "failed"  # the file cannot be a batch (errors say why)
    CANCELLED = "cancelled"

    @property
    def open(self) -> bool:
        """The scheduled pass still has work on it (the open index lists it)."""
        return self in (BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS, BatchStatus.CANCELLING)


class LineOutcome(Enum):
    """A line's outcome as a pass counts it."""

    DONE = "done"
    PENDING = "pending"
    FAILED = "failed"


def batch_key(batch_id: str) -> dict:
    return {"pk": f"batch#{batch_id}"}


@dataclass
class Line:
    """One input line's fate: the job serving it, or why it was refused."""

    n: int  # 1-based line number in the input file
    custom_id: str | None
    job_id: str | None = None
    error: dict | None = None
    bedrock: bool = False  # a Bedrock record: its output line is Bedrock's shape
    response: bool = False  # a /v1/responses line: its output body is a response object
    outbox: int | None = None  # its message's place in the batch's outbox: the batch created its job


@dataclass
class Batch:
    id: str
    tenant: str
    input_file: str  # S3 key
    input_etag: str = ""  # the version the batch reads (its upload event's); another version fails it
    status: BatchStatus = BatchStatus.VALIDATING
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
    ingested: int = 0  # ... and how many have been read into jobs (slices of BatchLimits.slice_lines)
    ingest_until: int = 0  # an ingest step holds the batch until then (0: nobody)
    attempting: int | None = None  # `ingested` when the last step took the lease: equal, a slice began and never ended
    read_offset: int = 0  # where in the file (bytes) the next slice starts ...
    read_line: int = 0  # ... and the number of the line before it (blank lines count)
    settled: int = 0  # the first lines (file order) whose jobs have finished: the pass reads past them ...
    settled_done: int = 0  # ... and how many of those finished DONE
    settled_parts: dict = field(default_factory=dict)  # lines files past that mark whose every line has
    # finished -> how many DONE: not read again
    endpoint: str = "/v1/chat/completions"  # as posted (or set on the upload: upload_settings)
    metadata: dict = field(default_factory=dict)  # the caller's own pairs, shown back

    _OPTIONAL = ("completed_at", "output_file", "error_file", "cancelling_at", "cancelled_at", "lines_total")
    _INTS = (
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

    def to_item(self) -> dict:
        item = {
            **batch_key(self.id),
            "tenant": self.tenant,
            "input_file": self.input_file,
            "status": self.status.value,
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
            "endpoint": self.endpoint,
            "metadata": json.dumps(self.metadata),
        }
        if self.status.open:
            item["open_batch"] = OPEN
        for name in (*self._OPTIONAL, "input_etag"):
            if getattr(self, name) is not None:
                item[name] = getattr(self, name)
        return item

    @classmethod
    def from_item(cls, item: dict) -> Batch:
        ints = {k: int(item[k]) for k in cls._INTS if k in item}
        return cls(
            item["pk"].removeprefix("batch#"),
            item["tenant"],
            item["input_file"],
            item.get("input_etag", ""),
            BatchStatus(item["status"]),
            int(item["created_at"]),
            counts=json.loads(item["counts"]),
            output_file=item.get("output_file"),
            error_file=item.get("error_file"),
            errors=json.loads(item.get("errors", "[]")),
            settled_parts={int(p): int(d) for p, d in json.loads(item.get("settled_parts", "{}")).items()},
            endpoint=item.get("endpoint", "/v1/chat/completions"),
            metadata=json.loads(item.get("metadata", "{}")),
            **ints,
        )

    @property
    def line_tokens(self) -> float:
        """A line's estimated tokens, the mean over the outbox (one at least: a line is a forward pass)."""
        return max(self.outbox_tokens / self.outbox, 1.0) if self.outbox else 1.0

    @property
    def ingesting(self) -> bool:
        """Lines of its file are still to be read (or nobody has started)."""
        return self.status in (BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS) and (
            self.lines_total is None or self.ingested < self.lines_total
        )

    @property
    def unread(self) -> bool:
        """Its file was not read to the end (never counted, or lines left)."""
        return self.lines_total is None or self.ingested < self.lines_total

    def view(self, bucket: str) -> dict:
        """The OpenAI batch object; file ids work with GET /v1/files/{id}/content, and the
        *_uri fields say where the files are in S3."""
        s3 = lambda key: f"s3://{bucket}/{key}" if key else None  # noqa: E731
        posted = f"{INPUT_PREFIX}{self.tenant}/{POSTED}/" in self.input_file  # a copy made by POST /v1/batches
        input_id = self.input_file.rsplit("/", 1)[-1] if posted else s3(self.input_file)
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "input_file_id": input_id,
            "completion_window": "24h",
            "status": self.status.value,
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
            "metadata": self.metadata or None,
        }
