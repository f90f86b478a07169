"""Serving one queue message synchronously, without the queue: SageMaker's /invocations
(sagemaker.py parses the HTTP body and shapes the reply; this module runs the job).

An invocation is served by the same Worker as a queue message (worker.py): the same job states
(jobs.JobStates), engine submission (Worker.submit) and result write (results.Results), and it is
held in Worker.held while it runs, so the main thread's housekeeping (Worker.housekeep) keeps its
heartbeat, cancel and streaming checks. What differs is that nothing redelivers an invocation:

  - a failure the queue would retry fails the job instead (INVOCATION_FAILED), as nobody else will;
  - replies a finished job cannot post now are tried a while longer here (no message comes back);
  - a second invocation for a job held here waits for the first rather than being hidden for later.
"""

from __future__ import annotations

from stratus.contracts import Job, QueueMessage, Status
from stratus.observability import logger
from stratus.replies import post_replies
from stratus_worker.jobs import Outcome
from stratus_worker.worker import Held, RepliesOwed, Worker

INVOCATION_FAILED = {
    "message": "the worker failed on this job (its log has the cause)",
    "type": "server_error",
    "code": "worker_failed",
}


def run_one(worker: Worker, msg: QueueMessage) -> Job | None:
    """Serve one job synchronously; the engine thread must be running. Returns the job as it ends
    up; raises, with the job FAILED (INVOCATION_FAILED), when it cannot be served here.

    A second invocation for a job held here waits for the first. The first served it (a promoted
    or adopted job has two messages) -> its result. The job was made again meanwhile (cancelled,
    then asked for again: a new run, QUEUED) -> the stale generation is dropped at the engine's
    next step, and this invocation generates the new run."""
    while True:
        held = Held(msg, None, worker.clock())
        first = worker.hold(held)
        if first is held:
            return _serve(worker, held)
        try:
            drop_if_stale(worker, first)
            first.settled.wait()
            job = worker.store.get(msg.job_id)
        except Exception:
            worker.jobs.fail(msg.job_id, INVOCATION_FAILED, running=False)  # (the first's run, if any, goes on)
            raise
        if job is None or job.status != Status.QUEUED:
            return job


def drop_if_stale(worker: Worker, first: Held) -> None:
    """The generation `first` holds is stale when the job, read after it claimed its run, has
    another run (made again meanwhile): the engine drops it at its next step."""
    claimed = first.run
    if not claimed:
        return  # (not claimed yet: it will claim whatever run the job has)
    job = worker.store.get(first.message.job_id)
    if job is not None and job.run != claimed:
        worker.drop(first)


def _serve(worker: Worker, held: Held) -> Job | None:
    """Generate and record the job `held` holds for this invocation -> the job as it ends up."""
    job_id = held.message.job_id
    try:
        _generate(worker, held)
    except RepliesOwed:  # the job is finished; no message comes back for its replies: try a while longer
        _post_replies(worker, job_id)
    except Exception:
        worker.results.abandon(job_id)
        # (before a waiting invocation reads it; once a run is claimed, only that run: the job
        # may have been made again meanwhile, for another invocation)
        worker.jobs.fail(job_id, INVOCATION_FAILED, queued=not held.run)
        raise
    finally:
        worker.let_go(job_id)
        held.settled.set()
    return worker.store.get(job_id)


def _generate(worker: Worker, held: Held) -> None:
    msg = held.message
    outcome, started = worker.jobs.start(msg, 1)
    if outcome is Outcome.GENERATE:
        held.run = started.run
        held.future = worker.submit(msg, started, 1)
        worker.results.record(msg, held.received, held.future.result())


def _post_replies(worker: Worker, job_id: str) -> None:
    """The replies of a finished job, tried as long as a result write would be; logged if they fail."""
    try:
        worker.keep_trying(
            lambda: post_replies(worker.store.get(job_id), sqs=worker.sqs, s3=worker.s3, store=worker.store),
            job_id,
        )
    except Exception:
        logger.exception("replies not posted", extra={"job_id": job_id})
