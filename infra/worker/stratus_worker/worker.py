"""The worker: jobs queue (SQS) -> engine (continuous batch) -> job store (DynamoDB).

Four threads share one Engine:

  main    receive up to 10 messages while the batch has room, and admit each:
            past its deadline -> EXPIRED;  finished or cancelled -> drop;  otherwise claim it
            (QUEUED -> RUNNING, conditional) -> render + tokenize -> exact context check -> submit.
          every heartbeat_s: extend the held messages' visibility and touch their jobs;
          every cancel_check_s: re-read the held jobs (DELETE /v1/jobs/{id} makes one CANCELLED,
          and the engine drops it before its next step).
  engine  Engine.run(): prefill and decode steps; a finished row resolves its future.
  writer  each finished future: RUNNING (ours) -> DONE with the result, then delete the message.
  chunks  streamed jobs' text as it is generated -> StreamTable chunk items (streams.py).

Failures: a request the model cannot serve (too long, bad chat) -> FAILED at once. Anything else
is retryable: the job goes back to QUEUED and the message becomes visible again at once; after
the queue's maxReceiveCount deliveries SQS moves it to the DLQ and the dlq function marks it
FAILED. Every write is conditional on the job being ours, so a duplicate delivery or a worker
that lost its message never writes a second result.

SIGTERM: stop receiving, finish what is held for up to drain_s, release the rest, exit.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass

from aws_lambda_powertools.metrics import MetricUnit

from stratus.chunks import ChunkStore
from stratus.contracts import InferenceRequest, Job, QueueMessage, Status
from stratus.errors import InvalidRequest
from stratus.jobstore import JobStore
from stratus.observability import logger, metrics
from stratus.replies import post_replies
from stratus.settings import Settings
from stratus_engine.engine import Engine, GenerationRequest, GenerationResult
from stratus_worker import health
from stratus_worker.streams import ChunkWriter

GENERATE, DONE_WITH_MESSAGE, LEAVE_MESSAGE = "generate", "done", "leave"  # what start() decided
IDLE_WAIT_S = 2  # long-poll length when idle: also how quickly an idle worker notices SIGTERM
RECEIVE_BACKOFF_S = 1.0  # after a failed ReceiveMessage
METRICS_EVERY_S = 10.0


@dataclass(eq=False)
class Held:
    """A message this worker holds and the generation it feeds."""

    message: QueueMessage
    receipt: str
    received: float
    attempt: int = 1  # the message's receive count
    future: Future | None = None


class Worker:
    def __init__(self, engine: Engine, settings: Settings, *, sqs, table, s3, stream_table,
                 worker_id: str | None = None, clock=time.time) -> None:
        self.engine, self.settings, self.sqs, self.s3, self.clock = engine, settings, sqs, s3, clock
        self.store = JobStore(table)
        tokenizer = engine.model.tokenizer
        self.chunks = ChunkWriter(ChunkStore(stream_table), lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
                                  settings.stream_flush_s)
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.held: dict[str, Held] = {}
        self.cancelled: set[str] = set()
        self.stopping = threading.Event()  # set by SIGTERM: take no new work
        self.failure: BaseException | None = None  # the engine thread died with this
        self._finished: queue.Queue[Held | None] = queue.Queue()
        self._halt = threading.Event()
        self._lock = threading.Lock()
        self._next = {"heartbeat": 0.0, "cancel": 0.0, "metrics": 0.0, "alive": 0.0}

    # ---- lifecycle --------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until stop() and then drain (or until the engine fails)."""
        threads = [threading.Thread(target=self._run_engine, name="engine", daemon=True),
                   threading.Thread(target=self._write_results, name="writer", daemon=True),
                   threading.Thread(target=self.chunks.run, args=(self._halt, self.chunk_error), name="chunks",
                                    daemon=True)]
        for t in threads:
            t.start()
        logger.info("worker started", extra={"worker": self.worker_id, "max_batch": self.settings.max_batch})
        drain_until = None
        try:
            while True:
                if self.stopping.is_set():
                    drain_until = drain_until or time.monotonic() + self.settings.drain_s
                    if not self.held or time.monotonic() > drain_until or self.failure:
                        break
                    time.sleep(0.05)
                else:
                    self.poll()
                self.housekeep()
        finally:
            self._halt.set()
            self._finished.put(None)
            for t in threads:
                t.join(timeout=10)
            self.release_all()
            self.publish_metrics()
            logger.info("worker stopped", extra={"worker": self.worker_id})

    def stop(self) -> None:
        self.stopping.set()

    def chunk_error(self, exc: BaseException) -> None:
        logger.warning("could not write stream chunks; retrying", extra={"error": type(exc).__name__})
        metrics.add_metric(name="worker_errors", unit=MetricUnit.Count, value=1)

    def _run_engine(self) -> None:
        try:
            self.engine.run(self._halt)
        except BaseException as exc:  # noqa: BLE001 - the main thread releases our messages and exits
            logger.exception("engine failed")
            metrics.add_metric(name="worker_errors", unit=MetricUnit.Count, value=1)
            self.failure = exc
            self.stopping.set()

    # ---- receiving ----------------------------------------------------------------------------

    def poll(self) -> None:
        """Receive while there is room for a full batch running and a full batch waiting."""
        room = 2 * self.settings.max_batch - len(self.held)
        if room <= 0:
            time.sleep(0.02)
            return
        try:
            got = self.sqs.receive_message(
                QueueUrl=self.settings.queue_url, MaxNumberOfMessages=min(10, room), AttributeNames=["All"],
                VisibilityTimeout=self.settings.visibility_s, WaitTimeSeconds=1 if self.held else IDLE_WAIT_S)
        except Exception:  # noqa: BLE001 - throttled or unreachable: what we hold keeps generating
            logger.exception("could not receive from the jobs queue")
            metrics.add_metric(name="worker_errors", unit=MetricUnit.Count, value=1)
            time.sleep(RECEIVE_BACKOFF_S)
            return
        for m in got.get("Messages", []):
            try:
                self.admit(m)
            except Exception as exc:  # noqa: BLE001 - retryable: back to the queue, the DLQ bounds retries
                logger.exception("could not admit a message")
                metrics.add_metric(name="worker_errors", unit=MetricUnit.Count, value=1)
                self._retry_later(m, exc)

    def admit(self, m: dict) -> None:
        msg = QueueMessage.from_body(m["Body"])
        if msg.job_id in self.held:  # a duplicate of a message we are serving: it comes back, finished, later
            return
        attempt = int(m.get("Attributes", {}).get("ApproximateReceiveCount", 1))
        outcome, ids = self.start(msg, attempt)
        if outcome == DONE_WITH_MESSAGE:
            self._delete(m["ReceiptHandle"])
        if outcome != GENERATE:
            return
        held = Held(msg, m["ReceiptHandle"], self.clock(), attempt)
        with self._lock:
            self.held[msg.job_id] = held
        held.future = self._submit(msg, ids, attempt)
        held.future.add_done_callback(lambda _f: self._finished.put(held))

    def start(self, msg: QueueMessage, receive_count: int) -> tuple[str, list[int] | None]:
        """Everything before compute: expiry, claim, tokenizing and the exact context check.
        -> (GENERATE, token ids) | (DONE_WITH_MESSAGE, None) | (LEAVE_MESSAGE, None)"""
        job_id, now = msg.job_id, self.clock()
        logger.append_keys(job_id=job_id, tenant=msg.tenant)
        if now > msg.deadline:
            expired = self.store.transition(job_id, [Status.QUEUED], Status.EXPIRED, error={
                "message": f"the job waited {now - msg.enqueued_at:.0f} s in the queue, past its deadline",
                "type": "server_error", "code": "expired"})
            if expired:
                metrics.add_metric(name="requests_expired", unit=MetricUnit.Count, value=1)
                self._notify(expired)
            return DONE_WITH_MESSAGE, None
        claimed, seen = self._claim(msg, receive_count)
        if not claimed:
            return self._skip(seen), None
        try:
            ids = self._encode(msg.request)
            self.engine.check_fits(len(ids), msg.request.params.max_tokens)
        except InvalidRequest as exc:  # permanent: the model cannot serve this request
            self._notify(self.store.transition(job_id, [Status.RUNNING], Status.FAILED, owner=self.worker_id, error={
                "message": exc.message, "type": exc.error_type, "code": exc.code or "invalid_request"}))
            logger.info("rejected", extra={"code": exc.code})
            return DONE_WITH_MESSAGE, None
        return GENERATE, ids

    def run_one(self, msg: QueueMessage) -> Job | None:
        """Serve one job synchronously, without the queue (SageMaker's /invocations); the engine
        thread must be running. Returns the job as it ends up."""
        outcome, ids = self.start(msg, 1)
        if outcome == GENERATE:
            received = self.clock()
            self.record(msg, received, self._submit(msg, ids, 1).result())
        return self.store.get(msg.job_id)

    def _submit(self, msg: QueueMessage, ids: list[int], attempt: int) -> Future:
        job_id = msg.job_id
        on_token = self.chunks.open(job_id, attempt, msg.request.params.stop,
                                    int(max(msg.deadline, self.clock()) + 3600), streamed=msg.stream)
        try:
            return self.engine.submit(GenerationRequest(ids, msg.request.params, request_id=job_id,
                                                        is_cancelled=lambda: job_id in self.cancelled,
                                                        on_token=on_token))
        except BaseException:
            self.chunks.close(job_id)
            raise

    def _claim(self, msg: QueueMessage, receive_count: int) -> tuple[bool, Job | None]:
        """QUEUED -> RUNNING (ours), or take over a RUNNING job whose worker went silent.
        -> (claimed?, the job as read when not claimed)"""
        if self.store.transition(msg.job_id, [Status.QUEUED], Status.RUNNING, worker=self.worker_id,
                                 attempts=receive_count):
            return True, None
        job = self.store.get(msg.job_id)
        if job is None or job.status != Status.RUNNING:
            return False, job
        silent = self.clock() - job.updated_at > 2 * self.settings.heartbeat_s
        taken = (job.worker == self.worker_id or silent) and self.store.transition(
            msg.job_id, [Status.RUNNING], Status.RUNNING, owner=job.worker, worker=self.worker_id,
            attempts=receive_count)
        return bool(taken), job

    def _skip(self, job: Job | None) -> str:
        """Not claimed: gone or finished -> done with the message; running elsewhere -> leave it hidden."""
        if job is None or job.status.finished:
            if job is not None and job.status == Status.CANCELLED:
                metrics.add_metric(name="requests_cancelled", unit=MetricUnit.Count, value=1)
            self._notify(job)  # replies a finished job still owes (e.g. its writer died before posting)
            return DONE_WITH_MESSAGE
        return LEAVE_MESSAGE

    def _encode(self, req: InferenceRequest) -> list[int]:
        if req.route == "chat":
            return self.engine.encode_chat(list(req.messages))
        return self.engine.encode(req.prompt)

    # ---- while generating ---------------------------------------------------------------------

    def housekeep(self) -> None:
        """Periodic chores; one that fails (a throttled call) is logged and tried again next time."""
        now = time.monotonic()
        for chore, every, run in (("heartbeat", self.settings.heartbeat_s, self.heartbeat),
                                  ("cancel", self.settings.cancel_check_s, self.check_cancelled),
                                  ("metrics", METRICS_EVERY_S, self.publish_metrics),
                                  ("alive", METRICS_EVERY_S, health.touch)):  # the container health check
            if now >= self._next[chore]:
                self._next[chore] = now + every
                try:
                    run()
                except Exception:  # noqa: BLE001
                    logger.exception(f"{chore} failed")

    def heartbeat(self) -> None:
        held = self._snapshot()
        for i in range(0, len(held), 10):
            entries = [{"Id": str(n), "ReceiptHandle": h.receipt, "VisibilityTimeout": self.settings.visibility_s}
                       for n, h in enumerate(held[i:i + 10])]
            self.sqs.change_message_visibility_batch(QueueUrl=self.settings.queue_url, Entries=entries)
        for h in held:  # a fresh updated_at tells other workers this job is alive
            self.store.transition(h.message.job_id, [Status.RUNNING], Status.RUNNING, owner=self.worker_id)

    def check_cancelled(self) -> None:
        held = [h.message.job_id for h in self._snapshot()]
        if held:
            states = self.store.states(held)
            self.cancelled.update(j for j, (status, _) in states.items() if status == Status.CANCELLED)
            self.chunks.mark_streamed(j for j, (_, streamed) in states.items() if streamed)

    # ---- finishing ----------------------------------------------------------------------------

    def _write_results(self) -> None:
        while (held := self._finished.get()) is not None:
            try:
                self.finish(held)
            except Exception as exc:  # noqa: BLE001 - retryable: the message comes back
                logger.exception("could not write a result")
                metrics.add_metric(name="worker_errors", unit=MetricUnit.Count, value=1)
                self._retry_later({"ReceiptHandle": held.receipt, "Body": held.message.to_body()}, exc)
            finally:
                with self._lock:
                    self.held.pop(held.message.job_id, None)
                self.cancelled.discard(held.message.job_id)

    def finish(self, held: Held) -> None:
        self.record(held.message, held.received, held.future.result())
        self._delete(held.receipt)

    def record(self, msg: QueueMessage, received: float, r: GenerationResult) -> None:
        """Write a finished generation: RUNNING (ours) -> DONE, replies, metrics."""
        job_id = msg.job_id
        if r.finish_reason == "cancelled":
            self.chunks.close(job_id)
            metrics.add_metric(name="requests_cancelled", unit=MetricUnit.Count, value=1)
            self._notify(self.store.get(job_id))
            return
        queued_s = received - msg.enqueued_at + r.timings.queue_s
        timings = {"queue_s": round(queued_s, 4), "ttft_s": round(r.timings.ttft_s, 4),
                   "decode_s": round(r.timings.decode_s, 4), "total_s": round(r.timings.total_s, 4),
                   "decode_tokens_per_s": round(r.timings.decode_tokens_per_s(r.usage.completion_tokens), 2)}
        usage = {"prompt_tokens": r.usage.prompt_tokens, "completion_tokens": r.usage.completion_tokens,
                 "total_tokens": r.usage.total_tokens}
        try:
            written = self.store.complete(job_id, self.worker_id, {"text": r.text, "finish_reason": r.finish_reason},
                                          s3=self.s3, bucket=self.settings.bucket, usage=usage, timings=timings)
        except BaseException:
            self.chunks.close(job_id)
            raise
        try:  # the final chunk only speeds readers up: they also see DONE on the job item
            self.chunks.close(job_id, r if written else None)
        except Exception as exc:  # noqa: BLE001
            self.chunk_error(exc)
        self._notify(written)
        if written:
            logger.info("generated", extra={"job_id": job_id, "completion_tokens": r.usage.completion_tokens,
                                            "ttft_s": timings["ttft_s"], "finish_reason": r.finish_reason})
        else:  # cancelled meanwhile, or another worker took it over: never a second result
            logger.info("result not written: the job is no longer ours", extra={"job_id": job_id})
        for name, value, unit in (("time_to_first_token_seconds", r.timings.ttft_s, MetricUnit.Seconds),
                                  ("request_queue_time_seconds", queued_s, MetricUnit.Seconds),
                                  ("e2e_request_latency_seconds", r.timings.total_s, MetricUnit.Seconds),
                                  ("generation_tokens", r.usage.completion_tokens, MetricUnit.Count),
                                  ("generation_tokens_per_second", timings["decode_tokens_per_s"],
                                   MetricUnit.CountPerSecond)):
            metrics.add_metric(name=name, unit=unit, value=value)

    def _notify(self, job) -> None:
        post_replies(job, sqs=self.sqs, s3=self.s3, store=self.store)

    # ---- giving messages back -----------------------------------------------------------------

    def _retry_later(self, m: dict, exc: BaseException) -> None:
        """Put the job back to QUEUED (if ours) and make its message visible again now."""
        try:
            job_id = QueueMessage.from_body(m["Body"]).job_id
            self.chunks.close(job_id)
            self.store.transition(job_id, [Status.RUNNING], Status.QUEUED, owner=self.worker_id,
                                  last_error=f"{type(exc).__name__}: {exc}"[:500])
        except Exception:  # noqa: BLE001 - an unreadable message still goes back, towards the DLQ
            logger.warning("could not requeue the job of a failed message")
        self._release(m["ReceiptHandle"])

    def release_all(self) -> None:
        for h in self._snapshot():
            self.chunks.close(h.message.job_id)
            self.store.transition(h.message.job_id, [Status.RUNNING], Status.QUEUED, owner=self.worker_id)
            self._release(h.receipt)
        with self._lock:
            self.held.clear()

    def _release(self, receipt: str) -> None:
        self.sqs.change_message_visibility(QueueUrl=self.settings.queue_url, ReceiptHandle=receipt,
                                           VisibilityTimeout=0)

    def _delete(self, receipt: str) -> None:
        self.sqs.delete_message(QueueUrl=self.settings.queue_url, ReceiptHandle=receipt)

    def _snapshot(self) -> list[Held]:
        with self._lock:
            return list(self.held.values())

    def publish_metrics(self) -> None:
        metrics.add_metric(name="num_requests_running", unit=MetricUnit.Count, value=self.engine.num_running)
        metrics.add_metric(name="num_requests_waiting", unit=MetricUnit.Count, value=self.engine.num_waiting)
        metrics.add_metric(name="batch_size", unit=MetricUnit.Count, value=self.engine.num_running)
        metrics.flush_metrics()
