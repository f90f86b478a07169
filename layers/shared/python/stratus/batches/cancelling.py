"""Cancelling a batch, and cancelling the jobs of one that failed.

POST /v1/batches/{id}/cancel: the batch becomes `cancelling` at once and no more of its lines are
released; the next pass cancels the jobs the batch created that have not started (a job an
interactive request joined is left to run), waits for its running lines, and writes the output of
the finished ones and an error line (`batch_cancelled`) for each of the rest: `cancelled`.
"""

from __future__ import annotations

import json
from itertools import islice
from typing import TYPE_CHECKING

from aws_lambda_powertools.metrics import MetricUnit

from stratus import release, submission
from stratus.batches import lines, output
from stratus.batches.api import get
from stratus.batches.lines import parse_line
from stratus.batches.model import Batch, BatchStatus, Line
from stratus.batches.store import BatchStore, at_once
from stratus.contracts import Status
from stratus.errors import Conflict, InvalidRequest, NotFound
from stratus.observability import logger, metrics
from stratus.wire import parse_request

if TYPE_CHECKING:
    from stratus.deps import Deps


def cancel(batch_id: str, tenant: str, deps: Deps) -> Batch:
    """POST /v1/batches/{id}/cancel: stop releasing the batch's lines; the scheduled pass does the
    rest (cancel_step). Cancelling a cancelling or cancelled batch answers it as it is."""
    batch = get(batch_id, tenant, deps)
    cancelling = BatchStore.of(deps).start_cancel(batch.id, int(deps.clock()))
    if cancelling is None:
        batch = get(batch_id, tenant, deps)
        if batch.status in (BatchStatus.CANCELLING, BatchStatus.CANCELLED):
            return batch
        raise Conflict(
            f"batch {batch_id} is already {batch.status.value}; only validating or in-progress batches can be cancelled"
        )
    metrics.add_metric(name="BatchesCancelled", unit=MetricUnit.Count, value=1)
    logger.info("batch cancelling", extra={"batch_id": batch.id})
    return cancelling


def cancel_step(batch: Batch, deps: Deps) -> bool:
    """The pass's work on a cancelling batch: cancel the jobs it created that have not started, wait
    for its running lines, then write what finished -> True once the batch is `cancelled`. (The
    cancel stopped its ingest: lines not read by then never become jobs.)"""
    if batch.ingest_until >= deps.clock():
        return False  # an ingest step is finishing its slice
    read = lines.read_lines(batch, deps)  # the lines never read are added when the output is written
    statuses = deps.store.statuses(sorted({l.job_id for l in read if l.job_id}))
    cancelled = cancel_queued(read, statuses, batch, deps)
    for l in read:
        if l.job_id in cancelled:
            statuses[l.job_id] = Status.CANCELLED
        elif l.outbox is not None and statuses.get(l.job_id) == Status.QUEUED:
            statuses[l.job_id] = Status.RUNNING  # ours, but a worker took it meanwhile or it was promoted
    running = sum(1 for l in read if l.job_id and statuses.get(l.job_id) == Status.RUNNING)
    if running:  # in a worker's hands: their answers go in the output
        done = sum(1 for l in read if l.job_id and statuses.get(l.job_id) == Status.DONE)
        total = max(batch.lines_total or 0, len(read))  # (the file was counted before it was read)
        counts = {"total": total, "completed": done, "failed": total - done - running}
        BatchStore.of(deps).record_cancel_counts(batch.id, counts)
        return False
    if batch.unread:
        cancel_dead_slice(batch, deps)  # (once, here: those jobs have no message, so none runs meanwhile)
        read += unread_lines(batch, deps)
    return output.write_output(batch, lines.slices(read, deps.settings.batches.slice_lines), deps, cancelled=True)


def cancel_queued(read: list[Line], statuses: dict[str, Status], batch: Batch, deps: Deps) -> set[str]:
    """Cancel the lines' QUEUED jobs that this batch made (Job.batch; the condition refuses the
    others: another batch's, a request's, a promoted one) -> the ids cancelled."""
    queued = sorted({l.job_id for l in read if statuses.get(l.job_id) == Status.QUEUED})
    return {
        j
        for j, job in zip(queued, at_once(lambda j: deps.store.cancel_batch_job(j, batch.id), queued))
        if job is not None
    }


def stand_down(batch: Batch, deps: Deps) -> None:
    """A batch failed after some of its lines became jobs: nobody will read their answers, so the
    jobs it made that have not started are cancelled and its outbox (their prompts) deleted; running
    ones finish (cached). Best effort: what is left expires (jobs) or goes by the lifecycle rule."""
    if not batch.ingested and batch.attempting is None:
        return
    try:
        read = lines.read_lines(batch, deps)
        cancel_queued(read, deps.store.statuses(sorted({l.job_id for l in read if l.job_id})), batch, deps)
        cancel_dead_slice(batch, deps)
        release.delete_outbox(batch.id, batch.outbox + deps.settings.batches.slice_lines, deps)  # (+ a dead slice's)
    except Exception:
        logger.exception("could not cancel a failed batch's jobs", extra={"batch_id": batch.id})


def cancel_dead_slice(batch: Batch, deps: Deps) -> None:
    """A run that died mid-slice may have made jobs that no lines file names (a redo of the slice
    finds them again; a cancel or failure first would leave them QUEUED for ever, with a request or
    another batch's line that joined one waiting on it). Each line names its job's id (its cache key,
    or one derived from the batch and the line): those this batch made are cancelled."""
    if batch.attempting != batch.ingested or batch.lines_total is None or batch.ingested >= batch.lines_total:
        return
    s, ids = deps.settings, []
    try:
        for row in islice(
            lines.rows(batch, deps, offset=batch.read_offset, line=batch.read_line), s.batches.slice_lines
        ):
            try:
                line = parse_line(lines.text(row, s.batches.max_line_bytes), s.catalogue.default.id)
                body = line.request_body()
                req = parse_request(line.route, body, max_messages=s.max_messages, max_tokens_limit=s.max_tokens)
                req, _ = submission.resolve(req, s)
            except (InvalidRequest, NotFound):
                continue  # (an error line made no job)
            origin = submission.line_origin(batch.id, row.n)
            ids.append(submission.job_id_for(req, batch.tenant, s, cacheable=req.params.deterministic, origin=origin))
    except Exception:
        logger.exception("could not read the slice a run left unfinished", extra={"batch_id": batch.id})
        return
    cancelled = sum(1 for job in at_once(lambda j: deps.store.cancel_batch_job(j, batch.id), ids) if job)
    logger.info("cancelled the jobs of a slice a run left unfinished", extra={"batch_id": batch.id, "jobs": cancelled})


def unread_lines(batch: Batch, deps: Deps) -> list[Line]:
    """The lines of a cancelled batch's file that were never read, each a `batch_cancelled` error
    (so every line of the file is in its output or error file); those it could read if the file
    cannot be read to its end, and none if it was never counted and is past the limits."""
    out = []
    try:
        if batch.lines_total is None:  # never read: within the limits an ingest applies, or none is named
            lines.lines_in_file(batch, deps)
        for row in lines.rows(batch, deps, offset=batch.read_offset, line=batch.read_line):
            try:
                d = json.loads(row.raw)
            except ValueError:  # (not UTF-8 either)
                d = None
            d = d if isinstance(d, dict) else {}
            custom_id = d.get("custom_id", d.get("recordId"))
            custom_id = custom_id if isinstance(custom_id, str) else None
            out.append(Line(row.n, custom_id, error=output.CANCELLED_LINE, bedrock="recordId" in d))
    except Exception:
        logger.exception("could not read a cancelled batch's file", extra={"batch_id": batch.id})
    return out
