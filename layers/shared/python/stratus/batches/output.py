"""Writing a finished batch's files: batches/output/<batch id>/output.jsonl, errors.jsonl and
manifest.json, a few lines at a time (multipart uploads: a few lines' jobs and one part of each file
in memory)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from stratus import release
from stratus.batches import bedrock
from stratus.batches import lines as batch_lines
from stratus.batches.bedrock import BedrockInputs
from stratus.batches.model import Batch, BatchStatus, Line
from stratus.batches.store import BatchStore
from stratus.contracts import Job, Status
from stratus.jobstore import load_result
from stratus.observability import logger
from stratus.responses import batch_body
from stratus.s3parts import PartWriter
from stratus.shapes import completion_body

if TYPE_CHECKING:
    from stratus.deps import Deps

CANCELLED_LINE = {"code": "batch_cancelled", "message": "the batch was cancelled before this line ran"}
GROUP = 8  # lines whose jobs are in memory at once: an item's result (≤ 400 KB of JSON) is ~2 MB as objects


def write_output(batch: Batch, slices: Iterable[list[Line]], deps: Deps, *, cancelled: bool = False) -> bool:
    """Write the output and error files GROUP lines at a time (their jobs, results loaded, and one
    part of each file in memory, whatever the results' size) and finish the batch -> True.
    False, and nothing written, when a line's job is running again (a no-cache request re-ran a job
    a settled line counted): the settled marks start over and the next pass counts every line afresh."""
    prefix = f"batches/output/{batch.id}/"
    answers, errors = prefix + "output.jsonl", prefix + "errors.jsonl"
    bucket = deps.settings.bucket
    answered_file = PartWriter(deps.s3, bucket, answers, "application/jsonl")
    error_file = PartWriter(deps.s3, bucket, errors, "application/jsonl")
    files = (answered_file, error_file)
    inputs, answered, refused = BedrockInputs(batch, deps), 0, 0
    try:
        for lines in (group for part in slices for group in batch_lines.slices(part, GROUP)):
            jobs = deps.store.get_many(sorted({l.job_id for l in lines if l.job_id}))
            if not cancelled and any(j.status in (Status.QUEUED, Status.RUNNING) for j in jobs.values()):
                logger.info("a finished line's job runs again: the batch waits for it", extra={"batch_id": batch.id})
                BatchStore.of(deps).unsettle(batch.id)
                for f in files:
                    f.abort()
                return False
            for l in lines:
                job = jobs.get(l.job_id) if l.job_id else None
                ok, row = output_row(l, job, inputs, cancelled, deps)
                (answered_file if ok else error_file).write((json.dumps(row) + "\n").encode())
                answered, refused = answered + ok, refused + (not ok)
                if job is not None and job.result_s3:
                    job.result = None  # a result from S3 (it may be MBs) is read again if another line shares it
        for f in files:
            f.close()
    except BaseException:
        for f in files:
            f.abort()
        raise
    finally:
        inputs.close()
    batch.output_file, batch.error_file = answers, errors
    if cancelled:
        batch.status, batch.cancelled_at = BatchStatus.CANCELLED, int(time.time())
    else:
        batch.status, batch.completed_at = BatchStatus.COMPLETED, int(time.time())
    batch.counts = {"total": answered + refused, "completed": answered, "failed": refused}
    manifest = {
        "batch_id": batch.id,
        "status": batch.status.value,
        "input_file": batch.input_file,
        "request_counts": batch.counts,
        "output_file": batch.output_file,
        "error_file": batch.error_file,
        "completed_at": batch.completed_at,
        "cancelled_at": batch.cancelled_at,
    }
    deps.s3.put_object(Bucket=bucket, Key=prefix + "manifest.json", Body=json.dumps(manifest, indent=2).encode())
    BatchStore.of(deps).save(batch)
    logger.info(f"batch {batch.status.value}", extra={"batch_id": batch.id, **batch.counts})
    try:  # no line will be released again: its copy of the prompts goes now, not in 30 days
        release.delete_outbox(batch.id, batch.outbox + deps.settings.batches.slice_lines, deps)  # (+ a dead slice's)
    except Exception:
        logger.exception("could not delete a finished batch's outbox", extra={"batch_id": batch.id})
    return True


def output_row(l: Line, job: Job | None, inputs: BedrockInputs, cancelled: bool, deps: Deps) -> tuple[bool, dict]:
    """A line's row -> (answered?, the row of the output file if so, else of the error file)."""
    if job is not None and job.status == Status.DONE:
        job = load_result(job, deps.s3)
        body = batch_body(job) if l.response else completion_body(job)
        return True, (
            bedrock.answered(l, inputs.get(l.n), body)
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
        bedrock.refused(l, inputs.get(l.n), error)
        if l.bedrock
        else {"id": f"batch_req_{l.n}", "custom_id": l.custom_id, "line": l.n, "response": None, "error": error}
    )
