"""What the API does with a whole (not streamed) request, over injected dependencies (the handler
stays thin): submit (stratus.submission) -> a cache hit answers 200 at once; otherwise wait up to
sync_wait_s -> 200 with the result, or 202 with the job id, Location and Retry-After. Also the
job routes (GET, DELETE) and their access rule.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from aws_lambda_powertools.metrics import MetricUnit

from stratus import submission, timeline
from stratus.contracts import JOB_ID, Job, Status
from stratus.deps import Deps
from stratus.errors import Conflict, NotFound
from stratus.jobstore import load_result
from stratus.keys import Tenant
from stratus.observability import logger, metrics
from stratus.settings import Settings
from stratus.shapes import completion_body, job_view, model_object

RETRY_AFTER_S = 2
POLL_FRACTION, POLL_MAX_S = 0.1, 1.0  # a waiting request notices a finished job within ~10% of its wait
WOKEN_POLL_S = 0.5  # ... or, when its job will wake it (stratus.wake), re-reads it at most this often
# HTTP status for a job that finished without a result (FAILED with a server error -> 500)
FINISHED_STATUS = {Status.CANCELLED: 409, Status.EXPIRED: 503}


@dataclass(frozen=True)
class Reply:
    status: int
    body: dict
    headers: dict = field(default_factory=dict)


def submit(route: str, body: dict, tenant: Tenant, deps: Deps, *, cache_control: str = "", wait: bool = True) -> Reply:
    t_in = deps.clock()
    wake = wake_url(deps) if wait else None
    how = submission.api(deps.settings, cache_control, tier=submission.tier_of(body, tenant), wake=wake)
    sub = submission.submit(route, body, tenant, deps, how)
    if sub.hit is not None:
        return Reply(200, completion_body(sub.hit), {"x-stratus-cache": "hit"})
    if not wait:
        return accepted(sub.job)
    return wait_for(sub.job_id, tenant, deps, t_in=t_in, t_sent=deps.clock(), woken=sub.woken)


def wake_url(deps: Deps) -> str | None:
    """Where a job this instance waits for wakes it (stratus.wake), if anywhere."""
    return deps.waker.url() if deps.waker is not None else None


def wait_for(job_id: str, tenant: Tenant, deps: Deps, *, t_in: float, t_sent: float, woken: bool) -> Reply:
    """The finished job's reply with a Server-Timing header (t_in: the request's arrival, t_sent:
    its message sent; woken: its message carries this instance's wake queue), or 202 when
    sync_wait_s passes first."""
    job = wait_job(job_id, tenant, deps, woken=woken)
    if not job.status.finished:
        return accepted(job)
    t_seen = deps.clock()
    reply = finished_reply(job)
    spans = timeline.phases(job, t_in, t_sent, t_seen, deps.clock())
    logger.info("request timeline", extra={"job_id": job_id, "ms": {k: round(1000 * v, 1) for k, v in spans.items()}})
    return Reply(reply.status, reply.body, {**reply.headers, "server-timing": timeline.server_timing(spans)})


def wait_job(job_id: str, tenant: Tenant, deps: Deps, *, woken: bool = False) -> Job:
    """Re-read the job until it finishes (-> it, its result loaded) or sync_wait_s passes (-> as it
    is). The pause grows with the wait (POLL_FRACTION of it, from poll_interval_s up to POLL_MAX_S):
    a short job is seen finished within milliseconds, and a long wait costs tens of reads, not hundreds.
    A wake for the job (this instance's Waker) ends a pause at once; a job that will wake it
    (woken: this request just made it) is first read when it wakes, then at most every
    WOKEN_POLL_S, in case its wake is lost; the wake that says it finished carries it (no read)."""
    started = deps.clock()
    deadline = started + deps.settings.sync_wait_s
    floor = max(deps.settings.poll_interval_s, WOKEN_POLL_S if woken else 0.0)
    read_at = time.monotonic() if woken else None  # (a job just made is QUEUED: nothing to read yet)
    while True:
        if read_at is not None:
            now = deps.clock()
            pause = min(POLL_MAX_S, max(floor, POLL_FRACTION * (now - started)), deadline - now)
            deps.pause(job_id, read_at, max(0.0, pause))
        read_at = time.monotonic()
        job = carried(job_id, tenant, deps) or get_job(job_id, tenant, deps)
        if job.status.finished:
            return with_result(job, deps)
        if deps.clock() >= deadline:
            return job


def carried(job_id: str, tenant: Tenant, deps: Deps) -> Job | None:
    """The finished job as its wake carried it to this instance (stratus.wake), if one did: the
    tenant's own (only the request that made a job is woken)."""
    job = deps.waker.finished(job_id) if deps.waker is not None else None
    return job if job is not None and job.tenant == tenant.name else None


def with_result(job: Job, deps: Deps) -> Job:
    return load_result(job, deps.s3)


def finished_reply(job: Job) -> Reply:
    if job.status == Status.DONE:
        return Reply(200, completion_body(job), {"x-stratus-cache": "miss"})
    err = job.error or {
        "message": f"job {job.status.value.lower()}",
        "type": "server_error",
        "code": job.status.value.lower(),
    }
    status = 400 if err.get("type") == "invalid_request_error" else FINISHED_STATUS.get(job.status, 500)
    return Reply(status, {"error": {"param": None, **err}})


def accepted(job: Job) -> Reply:
    return Reply(202, job_view(job), {"location": f"/v1/jobs/{job.job_id}", "retry-after": str(RETRY_AFTER_S)})


def get_job(job_id: str, tenant: Tenant, deps: Deps, *, owner_only: bool = False) -> Job:
    """The job if this tenant may see it: its own, or a cached one when the operator shares the cache.
    Anything else looks exactly like a missing job (404); an id of another shape is not even read
    (the table holds keys, counters and batches beside jobs)."""
    if not isinstance(job_id, str) or not JOB_ID.fullmatch(job_id):
        raise NotFound("job not found: job ids are 'c' + 64 or 'j' + 32 hexadecimal digits")
    job = deps.store.get(job_id, now=deps.clock(), prompt=False)  # (a poll: the prompt is not shown)
    shared = deps.settings.shared_cache and job is not None and job.cacheable and not owner_only
    if job is None or (job.tenant != tenant.name and not shared):
        raise NotFound(f"job {job_id!r} not found")
    return job


def cancel_job(job_id: str, tenant: Tenant, deps: Deps) -> Reply:
    job = get_job(job_id, tenant, deps, owner_only=True)  # a shared job is cancelled only by its creator
    if not deps.store.cancel(job_id, tenant.name):
        job = get_job(job_id, tenant, deps)
        raise Conflict(f"job {job_id} is already {job.status.value}; only QUEUED or RUNNING jobs can be cancelled")
    metrics.add_metric(name="JobsCancelled", unit=MetricUnit.Count, value=1)
    return Reply(200, job_view(get_job(job_id, tenant, deps)))


def get_model(model_id: str, tenant: Tenant, settings: Settings) -> Reply:
    """GET /v1/models/{id} (the openai SDK's models.retrieve): the model object, a 404, or a 403 for
    a model the key may not use."""
    c = settings.catalogue
    model = c.find(model_id)
    tenant.check_model(model.id)
    return Reply(200, model_object(model, c))
