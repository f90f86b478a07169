"""One way a request becomes a job, for the API (whole or streamed), batch lines and
requests-queue messages.

  submit(route, body, tenant, deps, how) -> Submission
    validate (fields, the model, a sure lower bound of the prompt's tokens vs the context length)
    -> enqueue(request, ...): job id (the cache key when cacheable) -> a cached result? (Submission.hit: nothing written)
    -> the job item and queue message, checked against DynamoDB's and SQS's sizes (413)
    -> charge the tenant's limits (SubmitPolicy.charge) -> conditional put (identical live jobs coalesce)
    -> SendMessage (SubmitPolicy.send; batch ingest collects the messages and sends ten at a time)

What differs on purpose between callers is `SubmitPolicy`:
  API           the tenant's tier (its key record; interactive by default), charged, sent at once, may stream
  batch line    the batch tier, not charged, collected
  queue message RequestsQueueTier (interactive by default), not charged (its sender is trusted by IAM), sent at once
The tier picks the jobs queue (Settings.queue_for) and the deadline (Settings.deadline_for):
interactive jobs expire unstarted after job_deadline_s, batch jobs after the batch window.
Everything else is the same: a job is kept until its deadline + 1 h (it is polled or streamed), a
cacheable one cache_ttl_s if that is longer. A job a batch file's line made, joined or hit is kept
at least the batch window + BATCH_KEEP_S: the batch's output is written from it.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, replace

from aws_lambda_powertools.metrics import MetricUnit

from stratus.cache_key import cache_key
from stratus.catalogue import ModelEntry
from stratus.contracts import CACHED_PREFIX, UNCACHED_PREFIX, InferenceRequest, Job, QueueMessage, Status
from stratus.deps import Deps
from stratus.errors import InvalidRequest, RateLimited, Unavailable
from stratus.jobstore import check_sizes, load_result
from stratus.keys import Tenant, charge, refund
from stratus.observability import logger, metrics
from stratus.settings import Settings
from stratus.wire import parse_request

IN_FLIGHT_RETRY_S = 2  # a tenant at its in-flight cap: about when one of its jobs may have finished
MAX_BYTES_PER_TOKEN = 32  # no token of a byte-level BPE vocabulary we serve is longer; workers check exactly
KEEP_AFTER_DEADLINE_S = 3600  # a job stays readable at least this long after its deadline
BATCH_KEEP_S = 86400  # a job a batch file's line made, joined or hit outlives the line's window by this:
# the batch's output, written once its last line finishes, reads it


@dataclass(frozen=True)
class SubmitPolicy:
    """What differs on purpose between the paths a request arrives by (api, batch_line,
    queue_message below make the three): its tier and deadline, whether it is charged, sent at once
    or may stream, and where its job id comes from when it is not cacheable."""

    deadline_s: float  # the job expires unstarted after this
    tier: str = "interactive"  # stratus.contracts.TIERS
    charge: bool = True  # tenant limits apply
    send: bool = True  # send the message now (False: the caller sends Submission.message)
    streaming: bool = False  # `stream: true` is allowed, and marks the message (the worker writes chunks)
    cache_control: str = ""  # the request's Cache-Control header
    batch: str | None = None  # the batch whose line this is (Job.batch)
    # where a request that is not cacheable comes from, when it may come again (a batch file's line,
    # line_origin; a requests-queue message, "sqs/<MessageId>"): its job's id is derived from it
    origin: str | None = None
    once: bool = False  # its job is made once, never again under its id (a batch line: a run that lags
    # behind the one that took its batch over must not make a finished line's job again)
    redelivered: bool = False  # it may have been handled before, up to making its job: a QUEUED job it
    # joins gets its message again (a duplicate message is harmless)
    keep_s: float = 0.0  # its job is kept at least this long (a stored response's: its conversation)
    wake: str | None = None  # the waiting API instance's wake queue (stratus.wake), carried by the message


def api(
    settings: Settings,
    cache_control: str = "",
    *,
    stream: bool = False,
    tier: str = "interactive",
    wake: str | None = None,
) -> SubmitPolicy:
    return SubmitPolicy(
        settings.deadline_for(tier), tier, charge=True, streaming=stream, cache_control=cache_control, wake=wake
    )


SERVICE_TIERS = ("auto", "default", "flex", "priority", "scale")  # OpenAI's service_tier values


def tier_of(body, tenant: Tenant) -> str:
    """The tier a request runs in: its tenant's (the key record), or the batch tier when the body
    asks for service_tier "flex" (cheaper and slower: it waits behind interactive work). No request
    raises its tenant above the tier its key was given."""
    wanted = body.get("service_tier") if isinstance(body, dict) else None
    if wanted is not None and wanted not in SERVICE_TIERS:
        raise InvalidRequest(
            f"service_tier must be one of {', '.join(SERVICE_TIERS)}, got {wanted!r}", param="service_tier"
        )
    return "batch" if wanted == "flex" else tenant.tier


def batch_line(settings: Settings, batch_id: str | None = None, line: int | None = None) -> SubmitPolicy:
    """A batch file's line (its number in the file, when its job's id is to come from it: made once)."""
    origin = line_origin(batch_id, line) if batch_id and line is not None else None
    return SubmitPolicy(
        settings.deadline_for("batch"),
        "batch",
        charge=False,
        send=False,
        batch=batch_id,
        origin=origin,
        once=origin is not None,
    )


def queue_message(settings: Settings, message_id: str | None = None, redelivered: bool = False) -> SubmitPolicy:
    """A requests-queue message (SQS's MessageId, the same on each of its deliveries)."""
    tier = settings.requests_tier
    return SubmitPolicy(
        settings.deadline_for(tier),
        tier,
        charge=False,
        origin=f"sqs/{message_id}" if message_id else None,
        redelivered=redelivered,
    )


def line_origin(batch_id: str, line: int) -> str:
    """SubmitPolicy.origin of a batch file's line (its number in the file)."""
    return f"{batch_id}/{line}"


@dataclass(frozen=True)
class Submission:
    req: InferenceRequest
    job_id: str
    cacheable: bool
    hit: Job | None = None  # a DONE cached job, its result loaded: nothing was written
    job: Job | None = None  # the job as created, or the live job this request joined
    created: bool = False
    message: QueueMessage | None = None  # its queue message (sent unless SubmitPolicy.send is False)

    @property
    def woken(self) -> bool:
        """This request made the job and its message carries a wake queue (stratus.wake): whoever
        finishes it wakes the request."""
        return self.created and self.message is not None and self.message.wake is not None


def _fewest_prompt_tokens(req: InferenceRequest) -> int:
    """The longest prompt's token count, at least (text: bytes / MAX_BYTES_PER_TOKEN; ids: exact)."""
    if req.route == "chat":
        return req.text_bytes // MAX_BYTES_PER_TOKEN
    return max(len(p.encode()) // MAX_BYTES_PER_TOKEN if isinstance(p, str) else len(p) for p in req.prompts)


def resolve(req: InferenceRequest, s: Settings) -> tuple[InferenceRequest, ModelEntry]:
    """The catalogue entry a request's model names, and the request as that model's: an alias runs
    as, is cached as and is answered as the model it names. ModelNotFound (404) otherwise."""
    model = s.catalogue.find(req.model)
    return (req if req.model == model.id else replace(req, model=model.id)), model


def submit(route: str, body: dict, tenant: Tenant, deps: Deps, how: SubmitPolicy) -> Submission:
    s = deps.settings
    req = parse_request(
        route, body, max_messages=s.max_messages, max_tokens_limit=s.max_tokens, streaming=how.streaming
    )
    req, model = resolve(req, s)
    tenant.check_model(model.id)
    min_tokens = _fewest_prompt_tokens(req)  # no tokenizer here: a sure lower bound
    if min_tokens + req.params.max_tokens > model.context_length:
        raise InvalidRequest(
            f"the prompt (at least {min_tokens} tokens) + max_tokens "
            f"({req.params.max_tokens}) exceeds the model's context length of {model.context_length}",
            param="messages" if route == "chat" else "prompt",
        )
    return enqueue(req, tenant, deps, how)


def enqueue(req: InferenceRequest, tenant: Tenant, deps: Deps, how: SubmitPolicy) -> Submission:
    """A valid request -> a cached result, the live job it joins, or a new job and its message."""
    s = deps.settings
    directives = {d.strip().lower() for d in how.cache_control.split(",") if d.strip()}
    no_store, refresh = "no-store" in directives, "no-cache" in directives
    cacheable = req.params.deterministic and not no_store
    job_id = job_id_for(req, tenant.name, s, cacheable, how.origin)
    logger.append_keys(job_id=job_id, tenant=tenant.name)
    hit = None
    if cacheable and not refresh:
        hit = deps.store.get(job_id, now=deps.clock(), prompt=False)  # (the key covers the prompt)
        if hit is not None and hit.status == Status.DONE:
            metrics.add_metric(name="CacheHits", unit=MetricUnit.Count, value=1)
            logger.info("cache hit", extra={"job_id": job_id})  # (named: batch lines submit from threads)
            _keep_for_batch(job_id, how, deps)
            return Submission(req, job_id, cacheable, hit=load_result(hit, deps.s3))
    joins = hit is not None and not hit.status.finished  # (no new work: never refused for the tenant's load)
    if how.charge and how.tier == "interactive" and not joins:
        _check_in_flight(tenant, deps)
    now = deps.clock()
    # readable until its deadline + a margin whatever CacheTtlSeconds says (a poller, a batch's output)
    keep = how.deadline_s + (BATCH_KEEP_S if how.batch else KEEP_AFTER_DEADLINE_S)
    ttl = max(s.cache_ttl_s if cacheable else 0, keep, how.keep_s)
    job = Job(
        job_id,
        tenant.name,
        Status.QUEUED,
        req,
        cacheable,
        created_at=now,
        expires_at=int(now + ttl),
        tier=how.tier,
        batch=how.batch,
    )
    message = QueueMessage(
        job_id,
        tenant.name,
        req,
        enqueued_at=now,
        deadline=now + how.deadline_s,
        stream=how.streaming,
        tier=how.tier,
        wake=how.wake,
    )
    check_sizes(job, message.to_body())  # a 413 before anything is written or charged
    if how.charge:  # limits guard GPU time: only work that may reach a worker is charged
        charge(deps.table, tenant, estimated_tokens(req), now=now)
    try:
        return _create(job, message, refresh, how, deps)
    except Exception:  # nothing was queued (a 503): the tenant gets the charge back
        if how.charge:
            refund(deps.table, tenant, estimated_tokens(req), now=now)
        raise


def _create(job: Job, message: QueueMessage, refresh: bool, how: SubmitPolicy, deps: Deps) -> Submission:
    """The job made (and its message sent), or the live job it joins."""
    job_id, req, cacheable = job.job_id, job.request, job.cacheable
    held, created = deps.store.create(job, refresh=refresh, once=how.once and not cacheable)
    if not created:
        metrics.add_metric(name="CacheCoalesced", unit=MetricUnit.Count, value=1)
        logger.info("coalesced on a live job", extra={"job_id": job_id, "status": held.status.value})
        _keep_for_batch(job_id, how, deps)
        if how.tier == "interactive" and held.tier == "batch" and how.send and deps.store.promote(job_id):
            send(message, deps)  # it waited in the batch tier: an interactive message jumps the queue
            logger.info("promoted a batch job to interactive")  # (the batch message is dropped once it runs)
        elif how.tier == "batch" and how.send and held.batch and deps.store.adopt(job_id):
            send(message, deps)  # a batch file's line made it: its cancel must not take the answer away
            logger.info("adopted a batch file's job")  # (the line's own message is dropped once it runs)
        elif how.redelivered and how.send and held.status == Status.QUEUED:
            send(message, deps)  # an earlier delivery may have died between making the job and sending
            logger.info("sent a queued job's message again for a redelivered request")
        return Submission(req, job_id, cacheable, job=held, created=False, message=message)
    if how.send:
        send(message, deps)
    metrics.add_metric(name="CacheMisses", unit=MetricUnit.Count, value=1)
    return Submission(req, job_id, cacheable, job=job, created=True, message=message)


def estimated_tokens(req: InferenceRequest) -> int:
    """The tokens a request may cost, before a tokenizer has seen it: what a tenant is charged, and
    what a batch line weighs in a fair share."""
    return req.text_bytes // 4 + req.prompt_token_ids + req.params.max_tokens * req.choices


class TooManyInFlight(RateLimited):
    code = "too_many_requests_in_flight"


def _check_in_flight(tenant: Tenant, deps: Deps) -> None:
    """A tenant's interactive jobs QUEUED or RUNNING are at most MaxInFlightPerTenant, so one tenant
    cannot fill the interactive queue and every worker; the next is a 429 until some finish."""
    cap = deps.settings.max_in_flight
    if deps.store.live_count(tenant.name, at_most=cap) >= cap:
        raise TooManyInFlight(
            f"tenant {tenant.name} has {cap} requests queued or running, at most {cap} at once "
            "(MaxInFlightPerTenant): retry when some finish",
            retry_after_s=IN_FLIGHT_RETRY_S,
        )


def _keep_for_batch(job_id: str, how: SubmitPolicy, deps: Deps) -> None:
    """A batch line that hit or joined a job keeps it as long as a job the line made would live."""
    if how.batch:
        deps.store.keep(job_id, int(deps.clock() + how.deadline_s + BATCH_KEEP_S))


def send(message: QueueMessage, deps: Deps) -> None:
    """SendMessage for a job just created; if it cannot go, the job fails (never stays QUEUED)."""
    try:
        deps.sqs.send_message(
            QueueUrl=deps.settings.catalogue.find(message.request.model).queue_for(message.tier),
            MessageBody=message.to_body(),
            MessageGroupId=message.tenant,  # SQS fair queues: a tenant's backlog never delays the others'
        )
    except Exception as exc:  # botocore raises many types
        deps.store.transition(
            message.job_id,
            [Status.QUEUED],
            Status.FAILED,
            error={"message": "could not enqueue the job", "type": "server_error", "code": "enqueue_failed"},
        )
        raise Unavailable("the jobs queue is unavailable; retry later") from exc
    metrics.add_metric(name="JobsQueued", unit=MetricUnit.Count, value=1)
    logger.info("queued")


def job_id_for(req: InferenceRequest, tenant: str, s: Settings, cacheable: bool, origin: str | None = None) -> str:
    """Cacheable requests meet on their cache key ("c" + SHA-256); others get a random id ("j" + uuid),
    or, with an origin (SubmitPolicy.origin), one derived from it: a run that redoes a batch slice (or cancels
    it) finds the jobs a run that died made for it, and a redelivered requests-queue message the job
    its first delivery made. (Its tenant may work such an id out, an upload's batch id being a hash
    of the file; GET and DELETE /v1/jobs answer only the job's own tenant.)"""
    if cacheable:
        digest = s.catalogue.find(req.model).digest
        return CACHED_PREFIX + cache_key(req, model_digest=digest, scope="*" if s.shared_cache else tenant)
    if origin is not None:
        return UNCACHED_PREFIX + hashlib.sha256(f"{tenant}/{origin}".encode()).hexdigest()[:32]
    return UNCACHED_PREFIX + uuid.uuid4().hex
