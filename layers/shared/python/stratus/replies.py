"""Replies for requests that came in on the requests queue: when their job finishes, a message
goes to each reply queue the job is watched by (JobStore.watch).

Whoever finishes a job posts them (a worker, or the dlq function), then marks the job notified;
a redelivered message for a finished, un-notified job posts them again (at least once).

Reply body: {"id": <the request's id>, "job_id", "status", "response": <OpenAI body> | "error": {...}}
"""

from __future__ import annotations

import json

from stratus.contracts import Job, Status
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
        body["error"] = job.error or {"message": f"job {job.status.value.lower()}", "type": "server_error",
                                      "code": job.status.value.lower()}
    return body


def post_replies(job: Job | None, *, sqs, s3, store: JobStore) -> int:
    """Post the replies a finished job owes; returns how many were sent. A reply queue that
    refuses (deleted by its owner, say) is logged and skipped: it must not hold up the others."""
    if job is None or not job.status.finished or not job.notify or job.notified:
        return 0
    if job.status == Status.DONE:
        load_result(job, s3)
    sent = sum(send_reply(job, reply, sqs) for reply in job.notify)
    store.mark_notified(job.job_id)
    logger.info("replies posted", extra={"job_id": job.job_id, "replies": sent})
    return sent


def send_reply(job: Job, reply: dict, sqs) -> bool:
    """One reply ({"queue_url", "id"}) for a finished job whose result is loaded; False if refused."""
    try:
        sqs.send_message(QueueUrl=reply["queue_url"],
                         MessageBody=json.dumps(reply_body(job, reply.get("id")), separators=(",", ":")))
        return True
    except Exception:  # noqa: BLE001 - botocore's ClientError and friends
        logger.exception("reply not posted", extra={"job_id": job.job_id, "queue": reply["queue_url"]})
        return False
