"""A job's states as this worker moves it, each a conditional write on the job item (JobStore):

  QUEUED ──past its deadline──▶ EXPIRED
  QUEUED ──claim──▶ RUNNING (ours)        RUNNING (a silent worker's, or ours) ──take over──▶ RUNNING (ours)
  RUNNING (ours) ──the model cannot serve it──▶ FAILED (400: too long, bad chat)
  RUNNING (ours) ──touch──▶ RUNNING       a fresh updated_at tells other workers the job is alive
  RUNNING (ours) ──requeue──▶ QUEUED      a retryable failure, or this worker stopping

`start` decides what to do with a received message before any compute (an Outcome):
  (Outcome.GENERATE, Started) | (Outcome.DELETE_MESSAGE, None) | (Outcome.LEAVE_MESSAGE, None)
Replies a finished job owes (requests-queue messages) are posted whenever a job is seen finished.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, auto

from aws_lambda_powertools.metrics import MetricUnit

from stratus.contracts import Job, QueueMessage, Status
from stratus.errors import InvalidRequest
from stratus.jobstore import JobStore
from stratus.observability import logger, metrics
from stratus_worker.choices import encode_prompts


class Outcome(Enum):
    """What to do with a received message (JobStates.start), decided before any compute."""

    GENERATE = auto()  # claimed and tokenized: generate it from its Started
    DELETE_MESSAGE = auto()  # nothing left to do (expired, rejected, finished, gone): the message is spent
    LEAVE_MESSAGE = auto()  # another worker runs it: leave the message hidden; it comes back if that worker dies


@dataclass(frozen=True)
class Started:
    """A job this worker claimed: what it generates from, and the run its stream chunks belong to
    (the claimed item's, never the message's: a message may outlive the job it was sent for)."""

    prompts: list[list[int]]  # each prompt's token ids
    run: str  # Job.run


class JobStates:
    def __init__(
        self,
        store: JobStore,
        worker_id: str,
        engine,
        heartbeat_s: float,
        notify: Callable[[Job | None, str | None], None],  # (a finished job, its message's wake)
        clock: Callable[[], float],
    ) -> None:
        self.store, self.worker_id, self.engine = store, worker_id, engine
        self.heartbeat_s, self.notify, self.clock = heartbeat_s, notify, clock

    def start(self, msg: QueueMessage, receive_count: int) -> tuple[Outcome, Started | None]:
        """Everything before compute: expiry, claim, tokenizing and the exact context check."""
        job_id, now = msg.job_id, self.clock()
        logger.thread_safe_append_keys(job_id=job_id, tenant=msg.tenant)  # this thread's lines only
        if now > msg.deadline:
            expired = self.store.transition(
                job_id,
                [Status.QUEUED],
                Status.EXPIRED,
                error={
                    "message": f"the job waited {now - msg.enqueued_at:.0f} s in the queue, past its deadline",
                    "type": "server_error",
                    "code": "expired",
                },
            )
            if expired:
                metrics.add_metric(name="RequestsExpired", unit=MetricUnit.Count, value=1)
                self.notify(expired, msg.wake)
                return Outcome.DELETE_MESSAGE, None
            # not QUEUED: finished, or started before its deadline (running, or its worker went
            # silent): as any other message, but never started now
        claimed, job = self.claim(msg, receive_count, may_start=now <= msg.deadline)
        if not claimed:
            return self._skip(job), None
        if job.request.to_json() != msg.request.to_json():  # the item is the truth: never generate
            # (and cache under its key) a request its job was not made for
            self.requeue(job_id)
            logger.warning("a message's request differs from its job's: the message is dropped")
            metrics.add_metric(name="WorkerErrors", unit=MetricUnit.Count, value=1)
            return Outcome.DELETE_MESSAGE, None
        try:
            prompts = encode_prompts(self.engine, msg.request)
        except InvalidRequest as exc:  # permanent: the model cannot serve this request
            self.notify(
                self.store.transition(
                    job_id,
                    [Status.RUNNING],
                    Status.FAILED,
                    owner=self.worker_id,
                    error={"message": exc.message, "type": exc.error_type, "code": exc.code or "invalid_request"},
                ),
                msg.wake,
            )
            logger.info("rejected", extra={"code": exc.code})
            return Outcome.DELETE_MESSAGE, None
        return Outcome.GENERATE, Started(prompts, job.run)

    def claim(self, msg: QueueMessage, receive_count: int, may_start: bool = True) -> tuple[bool, Job | None]:
        """QUEUED -> RUNNING (ours) if it may start, or take over a RUNNING job whose worker went
        silent. -> (claimed?, the job: as claimed, or as read when not)"""
        claimed = may_start and self.store.transition(
            msg.job_id, [Status.QUEUED], Status.RUNNING, worker=self.worker_id, attempts=receive_count
        )
        if claimed:
            return True, claimed
        job = self.store.get(msg.job_id)
        if job is None or job.status != Status.RUNNING:
            return False, job
        silent = self.clock() - job.updated_at > 2 * self.heartbeat_s
        taken = (job.worker == self.worker_id or silent) and self.store.transition(
            msg.job_id,
            [Status.RUNNING],
            Status.RUNNING,
            owner=job.worker,
            worker=self.worker_id,
            attempts=receive_count,
        )
        return (True, taken) if taken else (False, job)

    def touch(self, job_id: str) -> None:
        self.store.transition(job_id, [Status.RUNNING], Status.RUNNING, owner=self.worker_id)

    def fail(self, job_id: str, error: dict, *, queued: bool = True, running: bool = True) -> Job | None:
        """A job nothing will retry (an invocation) -> FAILED with `error`: from QUEUED (queued), or
        from RUNNING when it is ours (running); never a job another worker runs."""
        return (
            (queued and self.store.transition(job_id, [Status.QUEUED], Status.FAILED, error=error))
            or (
                running
                and self.store.transition(job_id, [Status.RUNNING], Status.FAILED, owner=self.worker_id, error=error)
            )
            or None
        )

    def requeue(self, job_id: str, **fields) -> None:
        self.store.transition(job_id, [Status.RUNNING], Status.QUEUED, owner=self.worker_id, **fields)

    def _skip(self, job: Job | None) -> Outcome:
        """Not claimed: gone or finished -> done with the message; running elsewhere -> leave it hidden."""
        if job is None or job.status.finished:
            if job is not None and job.status == Status.CANCELLED:
                metrics.add_metric(name="RequestsCancelled", unit=MetricUnit.Count, value=1)
            self.notify(job, None)  # replies a finished job still owes (e.g. its writer died before posting)
            return Outcome.DELETE_MESSAGE
        return Outcome.LEAVE_MESSAGE
