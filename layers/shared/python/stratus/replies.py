"""Replies for requests that came in on the requests queue: when their job finishes, a message
goes to each reply queue the job is watched by (JobStore.watch).

Whoever finishes a job posts them (a worker, or the dlq function), then marks the job notified;
a redelivered message for a finished, un-notified job posts them again (at least once). A reply
queue that refuses for good (deleted, no access) is skipped; a passing failure (throttled, a 5xx,
unreachable) raises once every reply was tried, so the job is not marked and its message comes
back to post them again.

Reply body: {"id": <the request's id>, "job_id", "status", "response": <OpenAI body> | "error": {...}}
"""

from __future__ import annotations

import json

from stratus.contracts import Job, Status
from stratus.errors import transient
from stratus.jobstore import JobStore, load_result
from stratus.observability import logger

MAX_REPLY_BYTES = 250_000  # SQS takes 256 KiB a message; a bigger response is fetched by job id


def reply_body(job: Job, request_id: str | None) -> dict:
    from stratus.shapes import completion_body  # the one place OpenAI bodies are shaped

    body = {"id": request_id, "job_id": job.job_id, "status": job.status.value}
    if job.status == Status.DONE:
        body["response"] = completion_body(job)
        if len(json.dumps(body)) > MAX_REPLY_BYTES:
            del body["response"]
            body["response_omitted"] = f"over {MAX_REPLY_BYTES} bytes: GET /v1/jobs/{job.job_id}"
    else:
        body["error"] = job.error or {
            "message": f"job {job.status.value.lower()}",
            "type": "server_error",
            "code": job.status.value.lower(),
        }
    return body


def post_replies(job: Job | None, *, sqs, s3, store: JobStore) -> int:
    """Post the replies a finished job owes; returns how many were sent. A reply queue that
    refuses for good (deleted by its owner, say) is logged and skipped: it must not hold up the
    others. A passing failure is raised after every reply was tried, the job left unmarked."""
    if job is None or not job.status.finished or not job.notify or job.notified:
        return 0
    if job.status == Status.DONE:
        load_result(job, s3)
    sent, again = 0, None
    for reply in job.notify:
        try:
            sent += send_reply(job, reply, sqs)
        except Exception as exc:
            again = again or exc
    if again is not None:
        raise again
    store.mark_notified(job.job_id)
    logger.info("replies posted", extra={"job_id": job.job_id, "replies": sent})
    return sent


def send_reply(job: Job, reply: dict, sqs) -> bool:
    """One reply ({"queue_url", "id"}) for a finished job whose result is loaded; False if refused
    for good, raises on a passing failure."""
    return send(reply["queue_url"], reply_body(job, reply.get("id")), sqs, job_id=job.job_id)


def send(queue_url: str, body: dict, sqs, *, job_id: str | None = None) -> bool:
    """Post a reply body -> True; False when the queue refuses for good (logged); raises when the
    failure may pass (throttled, a 5xx, unreachable: the caller's message comes back)."""
    try:
        sqs.send_message(QueueUrl=queue_url, MessageBody=json.dumps(body, separators=(",", ":")))
        return True
    except Exception as exc:
        if transient(exc):
            logger.warning(
                "reply not posted; it will be tried again",
                extra={"job_id": job_id, "queue": queue_url, "error": type(exc).__name__},
            )
            raise
        logger.exception("reply not posted", extra={"job_id": job_id, "queue": queue_url})
        return False
