"""The scheduled pass over open batches (the batch function's schedule event): finish what is
done, go on reading files an upload's run left, and release lines into the batch queue a few
steps of work at a time, fairly between tenants (stratus.release)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aws_lambda_powertools.metrics import MetricUnit

from stratus import release
from stratus.batches import cancelling, ingest, progress
from stratus.batches.model import Batch, BatchStatus
from stratus.batches.store import BatchStore
from stratus.observability import logger, metrics

if TYPE_CHECKING:
    from stratus.deps import Deps

# status -> the pass's work on a batch in it (True: its output is written, it is no longer open)
PASS_STEPS = {BatchStatus.IN_PROGRESS: progress.advance_step, BatchStatus.CANCELLING: cancelling.cancel_step}


def run_pass(deps: Deps) -> dict:
    """The scheduled pass: finish what is done, go on reading files an upload's run left (for up to
    BatchIngestSeconds), then release lines for BatchPassSeconds. The open batches are read once
    for the first two (the release steps read them afresh each step)."""
    batches = open_batches(deps)
    completed = advance(deps, batches)
    left = [b for b in batches if b.id not in completed]
    return {
        "completed": completed,
        "ingested": ingest_left(deps.clock() + deps.settings.batch_ingest_s, deps, left),
        "released": release_for(deps.settings.batch_pass_s, deps),
    }


def advance(deps: Deps, batches: list[Batch] | None = None) -> list[str]:
    """Count finished lines of every open batch; finish the batches with nothing pending (and the
    cancelling ones with nothing running). Returns the ids of the batches this pass finished."""
    completed = []
    for b in open_batches(deps) if batches is None else batches:
        step = PASS_STEPS.get(b.status)
        if step is None:
            continue  # still being ingested (validating)
        try:  # one batch that fails (a missing state file, a throttled read) never stops the others
            if step(b, deps):
                completed.append(b.id)
        except Exception:
            logger.exception("could not advance a batch", extra={"batch_id": b.id})
            _count_error()
    return completed


def ingest_left(until: float, deps: Deps, batches: list[Batch] | None = None) -> list[str]:
    """Go on reading the files of open batches with lines left and nobody reading them (an upload's
    run ran out of time, or died) -> their ids. (Each ingest takes the batch's lease: a stale view
    of it here only costs a refused lease.)"""
    went_on = []
    for b in open_batches(deps) if batches is None else batches:
        if went_on and deps.clock() >= until:
            break  # (one batch at least, a slice at least: a pass always makes progress)
        if b.ingest_until >= deps.clock():
            continue
        if not b.ingesting:
            if b.status == BatchStatus.VALIDATING and b.ingested:  # a run read it all but died before its last write
                BatchStore.of(deps).begin(b.id)
            continue
        went_on.append(b.id)
        try:
            ingest.ingest(b.id, deps, until)
        except Exception:
            logger.exception("could not go on reading a batch", extra={"batch_id": b.id})
            _count_error()
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
            _count_error()
            return sent
        sent += max(step_sent, 0)
        if step_sent < 0 or deps.clock() + deps.settings.batch_release_every_s > until:
            return sent
        deps.sleep(deps.settings.batch_release_every_s)


def release_step(meter: release.Meter, deps: Deps) -> int:
    """One release step over the open batches with lines left; -1 when there are none."""
    pending = [
        release.Pending(b.id, b.tenant, b.released, b.outbox, b.created_at, b.line_tokens)
        for b in open_batches(deps)
        if b.status == BatchStatus.IN_PROGRESS and b.released < b.outbox
    ]  # oldest first
    return release.step(pending, meter, deps) if pending else -1


def open_batches(deps: Deps) -> list[Batch]:
    """Every open batch as it stands, oldest first; none when they cannot be read (logged and
    counted: the next pass or step reads them again)."""
    store = BatchStore.of(deps)
    ids = store.open_ids()
    try:
        return store.open_batches(ids)
    except Exception:
        logger.exception("could not read the open batches")
        _count_error()
        return []


def _count_error() -> None:
    metrics.add_metric(name="BatchPassErrors", unit=MetricUnit.Count, value=1)
