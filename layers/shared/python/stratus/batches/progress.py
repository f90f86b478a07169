"""Counting an in-progress batch's finished lines, and finishing it once none is pending.

Two marks keep a pass's reads to the lines in flight: `settled`, the finished lines that lead the
file (each counted once), and `settled_parts`, the lines files past it whose every line has
finished, so a line that stays pending holds back the reads of its own slice, not of the rest of
the batch. A 50,000-line batch near its end reads the statuses of the lines in flight.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aws_lambda_powertools.metrics import MetricUnit

from stratus import submission
from stratus.batches import lines, output
from stratus.batches.model import Batch, Line, LineOutcome
from stratus.batches.store import BatchStore
from stratus.contracts import Status
from stratus.keys import Tenant
from stratus.observability import logger, metrics

if TYPE_CHECKING:
    from stratus.deps import Deps

DONE, PENDING, FAILED = LineOutcome.DONE, LineOutcome.PENDING, LineOutcome.FAILED


def advance_step(batch: Batch, deps: Deps) -> bool:
    """The pass's work on an in-progress batch: count the lines, and once nothing is pending or
    unread write the output -> True once the batch is `completed`."""
    size = deps.settings.batches.slice_lines
    first, stop = batch.settled // size, lines.parts_count(batch, size)
    known = {p: d for p, d in batch.settled_parts.items() if first <= p < stop}
    tail = {
        p: lines.read_part(batch, p, deps)[batch.settled - p * size if p == first else 0 :]
        for p in range(first, stop)
        if p not in known
    }
    flat = [l for p in sorted(tail) for l in tail[p]]
    outcomes = iter(line_outcomes(flat, batch, deps))
    settled, settled_done, leading, parts = batch.settled, batch.settled_done, True, {}
    done, pending = batch.settled_done, 0
    for p in range(first, stop):
        if p in known:  # every line finished, known[p] of them DONE (a file's last part may be short)
            n = min(size, batch.ingested - p * size)
            o = [DONE] * known[p] + [FAILED] * (n - known[p])
        else:
            o = [next(outcomes) for _ in tail[p]]
        ended = o.index(PENDING) if PENDING in o else len(o)  # the finished lines that lead the part
        done, pending = done + o.count(DONE), pending + o.count(PENDING)
        if leading:  # the mark moves over the finished lines that lead the file
            settled, settled_done, leading = settled + ended, settled_done + o[:ended].count(DONE), ended == len(o)
        elif ended == len(o) and ((p + 1) * size <= batch.ingested or batch.ingested == batch.lines_total):
            parts[p] = o.count(DONE)  # a whole part (no more lines to come), every line finished
    batch.counts = {
        "total": batch.lines_total or batch.ingested,
        "completed": done,
        "failed": batch.ingested - done - pending,
    }
    unread = (batch.lines_total or 0) - batch.ingested  # lines an ingest has still to read
    if not pending and not unread:
        whole_tail = not batch.settled and not known
        slices = lines.slices(flat, size) if whole_tail else lines.read_parts(batch, deps)
        return output.write_output(batch, slices, deps)
    BatchStore.of(deps).record_progress(batch, settled, settled_done, parts)
    return False


def line_outcomes(read: list[Line], batch: Batch, deps: Deps) -> list[LineOutcome]:
    """Each line's outcome; a line whose message has not been released is pending without a read."""
    unsent = {l.job_id for l in read if l.outbox is not None and l.outbox >= batch.released}
    statuses = deps.store.statuses(sorted({l.job_id for l in read if l.job_id} - unsent))
    statuses.update(dict.fromkeys(unsent, Status.QUEUED))
    ended = ended_elsewhere(batch, deps)
    statuses.update(run_again(sorted({j for j, status in statuses.items() if status in ended}), ended, batch, deps))
    return [
        FAILED
        if not l.job_id
        else DONE
        if statuses.get(l.job_id) == Status.DONE
        else PENDING
        if statuses.get(l.job_id) in (Status.QUEUED, Status.RUNNING)
        else FAILED
        for l in read
    ]


def ended_elsewhere(batch: Batch, deps: Deps) -> set[Status]:
    """How an in-progress batch's line's job can end without an answer, not by this batch's doing:
    cancelled (another batch whose line made it was cancelled, or a DELETE /v1/jobs named a job an
    interactive request shared), or expired unstarted while this batch's window is still open (an
    older batch made it, or an older request)."""
    young = deps.clock() < batch.created_at + deps.settings.batch_window_s
    return {Status.CANCELLED, Status.EXPIRED} if young else {Status.CANCELLED}


def run_again(job_ids: list[str], ended: set[Status], batch: Batch, deps: Deps) -> dict[str, Status]:
    """Jobs of an in-progress batch's lines that ended elsewhere without an answer (`ended`, from
    ended_elsewhere): each is queued again for this batch (Job.batch: its cancel would cancel it)
    -> {job id: its status now}."""
    if not job_ids:
        return {}
    owner, how, out = Tenant.trusted(batch.tenant), submission.batch_line(deps.settings, batch.id), {}
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
