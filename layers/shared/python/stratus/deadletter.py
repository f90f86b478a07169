"""What happens to a job whose message reached the dead-letter queue."""

from __future__ import annotations

import json
import time

from aws_lambda_powertools.metrics import MetricUnit

from stratus.contracts import Status
from stratus.jobstore import JobStore
from stratus.observability import logger, metrics
from stratus.replies import post_replies
from stratus.wake import send as send_wake


class StillRunning(Exception):
    """The job is RUNNING with a fresh heartbeat: a worker is on it. The dead letter is kept (the
    record fails) and looked at again after the DLQ's visibility timeout."""


def fail_dead_letter(
    body: str, store: JobStore, *, sqs, s3, heartbeat_s: float = 30.0, now: float | None = None
) -> bool:
    """Mark the message's job FAILED (unless it finished meanwhile, or a worker is still running
    it: StillRunning); True when this call failed it.

    The body is read leniently: a message the workers could not parse still names its job."""
    try:
        fields = json.loads(body)
        job_id = fields["job_id"]
    except (ValueError, KeyError, TypeError):
        logger.error("dead letter without a job id; dropped", extra={"body_bytes": len(body)})
        return False
    job = store.get(job_id)
    now = time.time() if now is None else now
    if job is not None and job.status == Status.RUNNING and now - job.updated_at < 3 * heartbeat_s:
        logger.info("dead letter of a running job: kept for later", extra={"job_id": job_id, "worker": job.worker})
        raise StillRunning(job_id)
    last = " The last attempt failed on the worker." if job is not None and job.last_error else ""
    failed = store.transition(
        job_id,
        [Status.QUEUED, Status.RUNNING],
        Status.FAILED,
        error={
            "message": f"the job failed on every delivery to the workers and was moved to the dead-letter queue.{last}",
            "type": "server_error",
            "code": "job_failed",
        },
    )
    metrics.add_metric(name="DeadLetters", unit=MetricUnit.Count, value=1)
    logger.warning("dead letter", extra={"job_id": job_id, "failed_now": bool(failed)})
    if failed:
        wake = fields.get("wake")
        send_wake(sqs, wake if isinstance(wake, str) else None, failed)
    post_replies(failed or store.get(job_id), sqs=sqs, s3=s3, store=store)
    return bool(failed)
