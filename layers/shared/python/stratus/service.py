"""What the API does, as plain functions over injected dependencies (the handler stays thin).

submit:  validate -> cache key -> hit? 200 : rate limit -> conditional put QUEUED (+ SendMessage
         if we created it; identical concurrent misses coalesce on one item) -> wait up to
         sync_wait_s -> 200 with the result, or 202 with the job id, Location and Retry-After.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import boto3  # imported at init, as the handlers' cold start should pay it
from botocore.config import Config
from aws_lambda_powertools.metrics import MetricUnit

from stratus.cache_key import cache_key
from stratus.contracts import InferenceRequest, Job, QueueMessage, Status, parse_request
from stratus.errors import Conflict, InvalidRequest, NotFound, StratusError, Unavailable
from stratus.jobstore import JobStore, check_sizes, load_result
from stratus.keys import Tenant, charge
from stratus.observability import logger, metrics
from stratus.settings import Settings, get_settings

RETRY_AFTER_S = 2
# Requests wait seconds, not botocore's defaults (60 s to connect, 60 to read): a storage outage
# becomes a 503 with Retry-After while the caller is still there.
CLIENT_CONFIG = Config(connect_timeout=1, read_timeout=2, retries={"max_attempts": 2, "mode": "standard"})
POLL_FRACTION, POLL_MAX_S = 0.1, 1.0  # a waiting request notices a finished job within ~10% of its wait
MAX_BYTES_PER_TOKEN = 32  # no token of a byte-level BPE vocabulary we serve is longer; workers check exactly
# HTTP status for a job that finished without a result (FAILED with a server error -> 500)
FINISHED_STATUS = {Status.CANCELLED: 409, Status.EXPIRED: 503}


@dataclass
class Deps:
    settings: Settings
    table: object  # boto3 DynamoDB Table
    sqs: object  # boto3 SQS client
    s3: object  # boto3 S3 client (results too big for an item)
    stream_table: object = None  # boto3 DynamoDB Table of streamed chunks (stratus.chunks); None: no streaming
    clock: Callable[[], float] = time.time
    sleep: Callable[[float], None] = time.sleep
    store: JobStore = field(init=False)
    key_cache: dict = field(default_factory=dict)  # see stratus.keys.authenticate

    def __post_init__(self) -> None:
        self.store = JobStore(self.table)


def deps_from_env() -> Deps:
    """Deps for a function: settings from its environment, boto3 clients (AWS_ENDPOINT_URL honoured).
    Handlers cache this once per container: `get_deps = functools.cache(service.deps_from_env)`."""
    settings = get_settings()
    ddb = boto3.resource("dynamodb", config=CLIENT_CONFIG)
    return Deps(settings, ddb.Table(settings.table), boto3.client("sqs", config=CLIENT_CONFIG),
                boto3.client("s3", config=CLIENT_CONFIG),
                ddb.Table(settings.stream_table) if settings.stream_table else None)


@dataclass(frozen=True)
class Reply:
    status: int
    body: dict
    headers: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Admission:
    """A request that passed validation: its job id, and the cached job when it is a hit."""
    req: InferenceRequest
    job_id: str
    cacheable: bool
    refresh: bool  # Cache-Control: no-cache
    hit: Job | None  # a DONE job with its result loaded


def submit(route: str, body: dict, tenant: Tenant, deps: Deps, *, cache_control: str = "", wait: bool = True) -> Reply:
    a = admit(route, body, tenant, deps, cache_control=cache_control)
    if a.hit is not None:
        return Reply(200, completion_body(a.hit), {"x-stratus-cache": "hit"})
    job, _ = charge_and_enqueue(a, tenant, deps)
    if not wait:
        return accepted(job)
    return wait_for(job.job_id, tenant, deps)


def admit(route: str, body: dict, tenant: Tenant, deps: Deps, *, cache_control: str = "",
          streaming: bool = False) -> Admission:
    """Validate, name the job (its cache key when cacheable) and look for a cached result."""
    s = deps.settings
    req = parse_request(route, body, max_messages=s.max_messages, max_tokens_limit=s.max_tokens, streaming=streaming)
    if req.model != s.model_id:
        raise NotFound(f"model {req.model!r} does not exist; this deployment serves {s.model_id!r}", param="model")
    min_tokens = req.text_bytes // MAX_BYTES_PER_TOKEN  # the API has no tokenizer: a sure lower bound
    if min_tokens + req.params.max_tokens > s.context_length:
        raise InvalidRequest(f"the prompt ({req.text_bytes} bytes, at least {min_tokens} tokens) + max_tokens "
                             f"({req.params.max_tokens}) exceeds the model's context length of {s.context_length}",
                             param="messages" if route == "chat" else "prompt")
    directives = {d.strip().lower() for d in cache_control.split(",") if d.strip()}
    no_store, refresh = "no-store" in directives, "no-cache" in directives
    cacheable = req.params.deterministic and not no_store
    job_id = job_id_for(req, tenant.name, s, cacheable)
    logger.append_keys(job_id=job_id, tenant=tenant.name)

    if cacheable and not refresh:
        hit = deps.store.get(job_id, now=deps.clock())
        if hit is not None and hit.status == Status.DONE:
            metrics.add_metric(name="CacheHits", unit=MetricUnit.Count, value=1)
            logger.info("cache hit")
            return Admission(req, job_id, cacheable, refresh, with_result(hit, deps))
    return Admission(req, job_id, cacheable, refresh, None)


def charge_and_enqueue(a: Admission, tenant: Tenant, deps: Deps, *, stream: bool = False) -> tuple[Job, bool]:
    """Limits guard GPU time, so only work that may reach a worker is charged; a hit costs one read.
    (The API stage throttle bounds the raw request rate, hits included.) -> (job, created?)"""
    prepared = prepare(a.req, tenant, a.job_id, a.cacheable, deps, stream=stream)  # a 413 is not charged
    charge(deps.table, tenant, a.req.text_bytes // 4 + a.req.params.max_tokens, now=deps.clock())
    return enqueue(a.req, tenant, a.job_id, a.cacheable, deps, refresh=a.refresh, prepared=prepared)


def job_id_for(req: InferenceRequest, tenant: str, s: Settings, cacheable: bool) -> str:
    """Cacheable requests meet on their cache key ("c" + SHA-256); others get a random id ("j" + uuid)."""
    if cacheable:
        return "c" + cache_key(req, model_digest=s.model_digest, scope="*" if s.shared_cache else tenant)
    return "j" + uuid.uuid4().hex


def prepare(req: InferenceRequest, tenant: Tenant, job_id: str, cacheable: bool, deps: Deps, *,
            stream: bool = False) -> tuple[Job, QueueMessage]:
    """The job item and queue message for a request, checked against DynamoDB's and SQS's size
    limits before anything is written (PayloadTooLarge, 413)."""
    s, now = deps.settings, deps.clock()
    ttl = s.cache_ttl_s if cacheable else s.job_deadline_s + 3600
    job = Job(job_id, tenant.name, Status.QUEUED, req, cacheable, created_at=now, expires_at=int(now + ttl))
    message = QueueMessage(job_id, tenant.name, req, enqueued_at=now, deadline=now + s.job_deadline_s, stream=stream)
    check_sizes(job, message.to_body())
    return job, message


def enqueue(req: InferenceRequest, tenant: Tenant, job_id: str, cacheable: bool, deps: Deps, *,
            refresh: bool = False, stream: bool = False, prepared: tuple[Job, QueueMessage] | None = None
            ) -> tuple[Job, bool]:
    """Create the job and send its message; identical live jobs coalesce -> (the job, created?)."""
    s = deps.settings
    job, message = prepared or prepare(req, tenant, job_id, cacheable, deps, stream=stream)
    held, created = deps.store.create(job, refresh=refresh)
    if not created:
        metrics.add_metric(name="CacheCoalesced", unit=MetricUnit.Count, value=1)
        logger.info("coalesced on a live job", extra={"status": held.status.value})
        return held, False
    try:
        deps.sqs.send_message(QueueUrl=s.queue_url, MessageBody=message.to_body())
    except Exception as exc:  # botocore raises many types; the job must not stay QUEUED forever
        deps.store.transition(job_id, [Status.QUEUED], Status.FAILED,
                              error={"message": "could not enqueue the job", "type": "server_error", "code": "enqueue_failed"})
        raise Unavailable("the jobs queue is unavailable; retry later") from exc
    metrics.add_metric(name="CacheMisses", unit=MetricUnit.Count, value=1)
    metrics.add_metric(name="JobsQueued", unit=MetricUnit.Count, value=1)
    logger.info("queued")
    return job, True


def wait_for(job_id: str, tenant: Tenant, deps: Deps) -> Reply:
    """Re-read the job until it finishes or sync_wait_s passes. The pause grows with the wait
    (POLL_FRACTION of it, from poll_interval_s up to POLL_MAX_S): a short job is seen finished
    within milliseconds, and a long wait costs tens of reads, not hundreds."""
    started = deps.clock()
    deadline = started + deps.settings.sync_wait_s
    while True:
        job = get_job(job_id, tenant, deps)
        if job.status.finished:
            return finished_reply(with_result(job, deps))
        now = deps.clock()
        if now >= deadline:
            return accepted(job)
        pause = min(POLL_MAX_S, max(deps.settings.poll_interval_s, POLL_FRACTION * (now - started)))
        deps.sleep(min(pause, deadline - now))


def with_result(job: Job, deps: Deps) -> Job:
    return load_result(job, deps.s3)


def finished_reply(job: Job) -> Reply:
    if job.status == Status.DONE:
        return Reply(200, completion_body(job), {"x-stratus-cache": "miss"})
    err = job.error or {"message": f"job {job.status.value.lower()}", "type": "server_error", "code": job.status.value.lower()}
    status = 400 if err.get("type") == "invalid_request_error" else FINISHED_STATUS.get(job.status, 500)
    return Reply(status, {"error": {"param": None, **err}})


def accepted(job: Job) -> Reply:
    return Reply(202, job_view(job), {"location": f"/v1/jobs/{job.job_id}", "retry-after": str(RETRY_AFTER_S)})


JOB_ID = re.compile(r"c[0-9a-f]{64}|j[0-9a-f]{32}")  # job_id_for's two shapes


def get_job(job_id: str, tenant: Tenant, deps: Deps, *, owner_only: bool = False) -> Job:
    """The job if this tenant may see it: its own, or a cached one when the operator shares the cache.
    Anything else looks exactly like a missing job (404); an id of another shape is not even read
    (the table holds keys, counters and batches beside jobs)."""
    if not isinstance(job_id, str) or not JOB_ID.fullmatch(job_id):
        raise NotFound("job not found: job ids are 'c' + 64 or 'j' + 32 hexadecimal digits")
    job = deps.store.get(job_id, now=deps.clock())
    shared = deps.settings.shared_cache and job is not None and job.cacheable and not owner_only
    if job is None or (job.tenant != tenant.name and not shared):
        raise NotFound(f"job {job_id!r} not found")
    return job


def cancel_job(job_id: str, tenant: Tenant, deps: Deps) -> Reply:
    job = get_job(job_id, tenant, deps, owner_only=True)  # a shared job is cancelled only by its creator
    if not deps.store.cancel(job_id):
        job = get_job(job_id, tenant, deps)
        raise Conflict(f"job {job_id} is already {job.status.value}; only QUEUED or RUNNING jobs can be cancelled")
    metrics.add_metric(name="JobsCancelled", unit=MetricUnit.Count, value=1)
    return Reply(200, job_view(get_job(job_id, tenant, deps)))


def job_view(job: Job) -> dict:
    view = {"id": job.job_id, "object": "job", "status": job.status.value, "created_at": int(job.created_at),
            "model": job.request.model, "endpoint": {"chat": "/v1/chat/completions", "completion": "/v1/completions"}[job.request.route]}
    if job.status == Status.DONE:
        view["response"] = completion_body(job)
    for name in ("usage", "timings", "error"):
        if getattr(job, name) is not None:
            view[name] = getattr(job, name)
    return view


def completion_body(job: Job) -> dict:
    """The OpenAI response body for a DONE job."""
    result, req = job.result or {}, job.request
    common = {"created": int(job.created_at), "model": req.model,
              "usage": job.usage or {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}
    if req.route == "chat":
        return {"id": f"chatcmpl-{job.job_id}", "object": "chat.completion", **common,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.get("text", "")},
                             "finish_reason": result.get("finish_reason", "stop"), "logprobs": None}]}
    return {"id": f"cmpl-{job.job_id}", "object": "text_completion", **common,
            "choices": [{"index": 0, "text": result.get("text", ""), "finish_reason": result.get("finish_reason", "stop"),
                         "logprobs": None}]}


def models_body(settings: Settings) -> dict:
    return {"object": "list", "data": [{"id": settings.model_id, "object": "model", "created": 0,
                                        "owned_by": "stratus", "digest": settings.model_digest,
                                        "context_length": settings.context_length}]}


def error_body(exc: StratusError) -> dict:
    return {"error": {"message": exc.message, "type": exc.error_type, "param": exc.param, "code": exc.code}}
