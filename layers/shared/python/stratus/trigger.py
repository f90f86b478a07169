"""Requests that arrive as messages on the requests queue (event-driven callers, no HTTP).

Message: {"id": "<caller's id>", "url": "/v1/chat/completions" | "/v1/completions", "body": {...},
          "reply_to": "<SQS queue URL>" (optional), "tenant": "<name>" (optional)}

Each becomes a job through the same path as the API (cache hit, coalescing, conditional put +
SendMessage); with reply_to, the result is posted there when the job finishes (stratus.replies).
Senders are trusted by IAM (they may write to the queue), so tenant limits are not charged.
A request that can never succeed (bad JSON, invalid body, reply queue not allowed) is answered
with an error when it names an allowed reply queue, and is not retried; anything else raises so
SQS redelivers it. A redelivered message never makes a second job (a job that is not cacheable
has an id derived from SQS's MessageId) nor a second reply (JobStore.watch keeps one per reply).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from stratus import submission
from stratus.contracts import Status
from stratus.deps import Deps
from stratus.errors import InvalidRequest, NotFound, PayloadTooLarge, RateLimited, StratusError, shown
from stratus.jobstore import load_result
from stratus.keys import Tenant
from stratus.observability import logger
from stratus.replies import send, send_reply
from stratus.shapes import error_body
from stratus.wire import ROUTE_PATHS, json_object, require_unicode

MAX_ID_CHARS = 256  # a message's id: kept with its job (one of the job's reply addresses) and echoed in the reply


@dataclass(frozen=True)
class RequestMessage:
    id: str | None
    route: str
    body: dict
    reply_to: str | None
    tenant: str

    @classmethod
    def parse(cls, raw: str, *, default_tenant: str, reply_pattern: str) -> RequestMessage:
        msg = json_object(raw, "the message")
        require_unicode({k: v for k, v in msg.items() if k != "body"}, "the message")  # the body: parse_request
        reply_to = _reply_to(msg, reply_pattern)
        url = msg.get("url", "/v1/chat/completions")
        if not isinstance(url, str) or url not in ROUTE_PATHS:  # (a list or an object is no path, nor hashable)
            raise InvalidRequest(f"url must be one of {', '.join(ROUTE_PATHS)}, got {shown(url)}", param="url")
        tenant = msg.get("tenant")
        if tenant not in (None, default_tenant):  # one tenant per requests queue: the sender's IAM grant
            raise InvalidRequest(
                f"this requests queue serves tenant {default_tenant!r} (TriggerTenant); "
                "send other tenants' requests to their own queue",
                param="tenant",
            )
        request_id = msg.get("id")
        if request_id is not None and (not isinstance(request_id, str) or len(request_id) > MAX_ID_CHARS):
            raise InvalidRequest(f"id must be a string of at most {MAX_ID_CHARS} characters", param="id")
        return cls(request_id, ROUTE_PATHS[url], msg.get("body"), reply_to, default_tenant)


def _reply_to(msg: dict, reply_pattern: str) -> str | None:
    """The message's reply queue (None when it has none); InvalidRequest when it names one outside
    the pattern the senders' replies are allowed to."""
    reply_to = msg.get("reply_to")
    if reply_to is not None:
        if not isinstance(reply_to, str):
            raise InvalidRequest(f"reply_to must be a queue URL (a string), got {reply_to!r}", param="reply_to")
        name = reply_to.rstrip("/").rsplit("/", 1)[-1]
        if not fnmatch.fnmatch(name, reply_pattern):
            raise InvalidRequest(
                f"reply_to must name a queue matching {reply_pattern!r}, got {name!r}", param="reply_to"
            )
    return reply_to


def _where_to_answer(raw: str, tenant: str, reply_pattern: str) -> tuple[str | None, str | None]:
    """A refused message's (id, allowed reply queue), as far as they can be read; (None, None) when
    they cannot, or when it claims another tenant (not trusted: no reply)."""
    try:
        msg = json_object(raw, "the message")
        require_unicode({k: msg.get(k) for k in ("id", "reply_to")}, "the message")
        if msg.get("tenant") not in (None, tenant):
            return None, None
        return msg.get("id") if isinstance(msg.get("id"), str) else None, _reply_to(msg, reply_pattern)
    except InvalidRequest:
        return None, None


def _refuse(exc: StratusError, request_id: str | None, reply_to: str | None, deps: Deps) -> None:
    """A request that can never succeed: answered with its error when it names a reply queue, not retried."""
    logger.info("request message refused", extra={"error": type(exc).__name__, "param": exc.param})  # (messages
    # echo request values: never logged)
    if reply_to:
        send(reply_to, {"id": request_id, "job_id": None, "status": Status.FAILED.value, **error_body(exc)}, deps.sqs)


def handle_request(raw: str, deps: Deps, message_id: str | None = None, receive_count: int = 1) -> str:
    """One requests-queue message (SQS's MessageId: the same on each delivery of it) -> a job (and a
    reply when it is already known); returns the job id. A request that is not cacheable gets a job
    id derived from the message, so a redelivery joins the job the first delivery made (made again
    if it failed; its message sent again if it is still QUEUED: that delivery may have died before
    sending it)."""
    s = deps.settings
    try:
        msg = RequestMessage.parse(raw, default_tenant=s.trigger_tenant, reply_pattern=s.reply_queue_pattern)
    except InvalidRequest as exc:
        _refuse(exc, *_where_to_answer(raw, s.trigger_tenant, s.reply_queue_pattern), deps)
        return ""
    tenant = Tenant.trusted(msg.tenant)
    how = submission.queue_message(s, message_id, redelivered=receive_count > 1)
    try:
        sub = submission.submit(msg.route, msg.body, tenant, deps, how)
    except (InvalidRequest, NotFound, PayloadTooLarge) as exc:  # answered, not retried
        _refuse(exc, msg.id, msg.reply_to, deps)
        return ""
    if msg.reply_to:
        reply = {"queue_url": msg.reply_to, "id": msg.id, "message": message_id}  # (one per message: watch)
        if sub.hit is not None:  # a cache hit: its result is loaded already
            send_reply(sub.hit, reply, deps.sqs)
        else:
            try:
                watched = deps.store.watch(sub.job_id, reply)
            except RateLimited as exc:  # (the job keeps MAX_REPLIES reply addresses)
                _refuse(exc, msg.id, msg.reply_to, deps)
                return sub.job_id
            if not watched:  # finished just now
                send_reply(load_result(deps.store.get(sub.job_id, now=deps.clock()), deps.s3), reply, deps.sqs)
    return sub.job_id
