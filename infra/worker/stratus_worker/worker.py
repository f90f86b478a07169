"""The worker: jobs queue (SQS) -> engine (continuous batch) -> job store (DynamoDB).

Four threads share one Engine:

  main    receive from the interactive queue first, and from the batch queue only while it left room
          (tiers: see poll), up to 10 messages a call, and admit each (jobs.JobStates:
            past its deadline -> EXPIRED;  finished or cancelled -> drop;  otherwise claim it
            (QUEUED -> RUNNING, conditional) -> render + tokenize -> exact context check -> submit).
          every heartbeat_s: extend the held messages' leases (leases.py) and touch their jobs;
          every cancel_check_s: re-read the held jobs (DELETE /v1/jobs/{id} makes one CANCELLED,
          and the engine drops it before its next step; a streaming request that joined a job
          marks it streamed).
  engine  Engine.run(): prefill and decode steps; a finished row resolves its future.
  writer  each finished future: RUNNING (ours) -> DONE with the result (results.py), then delete
          the message. A write that fails for a passing reason is tried again with the result
          in hand for up to WRITE_RETRY_S (one that landed though its call failed counts as written).
  chunks  streamed jobs' text as it is generated -> StreamTable chunk items (streams.py).

Failures: a request the model cannot serve (too long, bad chat) -> FAILED at once. Anything else
is retryable: the job goes back to QUEUED and the message becomes visible again at once; after
the queue's maxReceiveCount deliveries SQS moves it to the DLQ and the dlq function marks it
FAILED. Every write is conditional on the job being ours, so a duplicate delivery or a worker
that lost its message never writes a second result.

SIGTERM: stop receiving, finish what is held for up to drain_s, release the rest, exit.

SageMaker's server (sagemaker.py) serves the same Worker without the queue: each /invocations
request runs its job on its own thread (invocations.py: claim, submit, write), held in Worker.held
like a received message, and the server's main thread calls housekeep() for it. That is why the
pieces both need are public here: submit, keep_trying, and hold / drop / let_go on what is held.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TypeVar

from aws_lambda_powertools.metrics import MetricUnit

from stratus.chunks import ChunkStore
from stratus.contracts import TIERS, NewerMessage, QueueMessage, Status
from stratus.errors import transient
from stratus.jobstore import JobStore
from stratus.observability import logger, metrics
from stratus.replies import post_replies
from stratus.settings import Settings
from stratus.wake import send as send_wake
from stratus.wake import send_many as send_wakes
from stratus_engine.engine import Engine, GenerationRequest
from stratus_worker import choices, health
from stratus_worker.choices import gather
from stratus_worker.jobs import JobStates, Outcome, Started
from stratus_worker.leases import Leases, Receipt
from stratus_worker.results import Results, chunk_error
from stratus_worker.streams import ChunkWriter

T = TypeVar("T")
IDLE_WAIT_S = 2  # long-poll length when idle: also how quickly an idle worker notices SIGTERM
RECEIVE_BACKOFF_S = 1.0  # after a failed ReceiveMessage
METRICS_EVERY_S = 10.0
WRITE_RETRY_S = 60.0  # how long a finished result's failed write is tried again (half the default lease)
WRITE_RETRY_FIRST_S, WRITE_RETRY_MAX_S = 0.25, 4.0  # the pause between tries: doubling, capped
HELD_HERE_HIDE_S = 1  # a new message for a job whose stale generation is being dropped here waits this long
NEWER_MESSAGE_HIDE_S = 60  # a message this worker is too old for comes back after this (to the DLQ in the end)
REPLIES_AGAIN_S = 30  # a message whose finished job's replies could not be posted comes back after this for them


class RepliesOwed(Exception):
    """A finished job's replies could not be posted for now (stratus.replies): its message is kept,
    and comes back in REPLIES_AGAIN_S to post them (its job is finished, so nothing runs again)."""


@dataclass(eq=False)
class Held:
    """A message this worker holds and the generation it feeds."""

    message: QueueMessage
    receipt: Receipt | None  # None: an invocation's (invocations.py), which no queue redelivers
    received: float
    attempt: int = 1  # the message's receive count
    future: Future | None = None
    message_id: str = ""  # SQS's MessageId: the same on every delivery of one message
    settled: threading.Event = field(default_factory=threading.Event)  # an invocation's: written or given up
    run: str = ""  # an invocation's: the run it generates (Job.run), once claimed
    taken: float = 0.0  # when the message reached this worker (received: when it was claimed and submitted)


class Worker:
    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        *,
        sqs,
        table,
        s3,
        stream_table,
        worker_id: str | None = None,
        clock=time.time,
    ) -> None:
        self.engine, self.settings, self.sqs, self.s3, self.clock = engine, settings, sqs, s3, clock
        self.store = JobStore(table)
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        tokenizer = engine.model.tokenizer
        self.chunks = ChunkWriter(
            ChunkStore(stream_table),
            engine.new_text,
            settings.stream_flush_s,
            render=lambda t: choices.entry(t, engine.token_bytes),
            wake=lambda wakes: send_wakes(sqs, wakes),
        )
        self.leases = Leases(sqs, settings.visibility_s)
        self._batch_backlog = False  # the last batch receive found messages: more are likely waiting
        self.jobs = JobStates(self.store, self.worker_id, engine, settings.heartbeat_s, self._notify, clock)
        self.results = Results(
            self.store,
            self.chunks,
            self.worker_id,
            s3,
            settings.bucket,
            self._notify,
            engine.token_bytes,
            lambda ids: tokenizer.decode(ids, skip_special_tokens=False),
            keep_trying=self.keep_trying,
        )
        self.held: dict[str, Held] = {}
        self.cancelled: set[str] = set()
        self.stopping = threading.Event()  # set by SIGTERM: take no new work
        self._finished: queue.Queue[Held | None] = queue.Queue()
        self.halt = threading.Event()
        self._lock = threading.Lock()
        self._writing: str | None = None  # the job whose result the writer thread is writing
        self._next = {"heartbeat": 0.0, "cancel": 0.0, "metrics": 0.0, "alive": 0.0}
        self._prefix_seen: dict = {}  # the prefix cache's counters at the last metrics report

    # ---- lifecycle --------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until stop() and then drain (or until the engine fails)."""
        threads = [
            threading.Thread(target=self.run_engine, name="engine", daemon=True),
            threading.Thread(target=self._write_results, name="writer", daemon=True),
            threading.Thread(target=self.chunks.run, args=(self.halt, chunk_error), name="chunks", daemon=True),
        ]
        for t in threads:
            t.start()
        logger.info("worker started", extra={"worker": self.worker_id, "max_batch": self.settings.max_batch})
        drain_until = None
        try:
            while True:
                if self.failure is not None:
                    break
                if self.stopping.is_set():
                    drain_until = drain_until or time.monotonic() + self.settings.drain_s
                    if not self.held or time.monotonic() > drain_until:
                        break
                    time.sleep(0.05)
                else:
                    self.poll()
                self.housekeep()
        finally:
            self.halt.set()
            self._finished.put(None)
            for t in threads:
                t.join(timeout=10)
            self.release_all()
            self.publish_metrics()
            logger.info("worker stopped", extra={"worker": self.worker_id})

    def stop(self) -> None:
        self.stopping.set()

    @property
    def failure(self) -> BaseException | None:
        """What the engine thread died with (Engine.failure), or None."""
        return self.engine.failure

    def run_engine(self) -> None:
        try:
            self.engine.run(self.halt)
        except BaseException:
            logger.exception("engine failed")
            metrics.add_metric(name="WorkerErrors", unit=MetricUnit.Count, value=1)
            self.stopping.set()

    # ---- receiving ----------------------------------------------------------------------------

    def poll(self) -> None:
        """Receive interactive work first, batch work only into spare room.

        Room: held messages up to two batches' worth (one running, one waiting in the engine); the
        interactive queue may also use a third, so batch work held never keeps interactive work
        out. The engine admits waiting interactive rows first (priority), so an interactive job
        joins the running batch at its next step. The interactive queue is long-polled unless
        batch work is waiting to fill the room; the batch queue is read without waiting, and only
        when the interactive queue had nothing."""
        s = self.settings
        room = 2 * s.max_batch - len(self.held)
        batch_url = s.queue_for("batch")
        batches = batch_url != s.queue_url
        wait = 0 if batches and self._batch_backlog and room > 0 else (1 if self.held else IDLE_WAIT_S)
        got = self._receive(s.queue_url, room + s.max_batch, wait)
        if batches and not got and room > 0:
            got = self._receive(batch_url, room, 0)
            self._batch_backlog = bool(got)
        for receipt, m in got:
            try:
                self.admit(m, receipt)
            except NewerMessage as exc:  # a newer API ahead of this worker: leave it for a newer worker
                logger.warning("message from a newer version; left for a newer worker", extra={"reason": str(exc)})
                metrics.add_metric(name="WorkerErrors", unit=MetricUnit.Count, value=1)
                self.leases.hide(receipt, NEWER_MESSAGE_HIDE_S)
            except RepliesOwed as exc:  # (a finished job's replies, seen as its message came back)
                self._owe_replies(receipt, "", exc)
            except Exception as exc:
                logger.exception("could not admit a message")
                metrics.add_metric(name="WorkerErrors", unit=MetricUnit.Count, value=1)
                self._retry_later(receipt, m["Body"], exc)

    def _receive(self, url: str, room: int, wait: int) -> list[tuple[Receipt, dict]]:
        if room <= 0:
            time.sleep(0.02)
            return []
        try:
            got = self.sqs.receive_message(
                QueueUrl=url,
                MaxNumberOfMessages=min(10, room),
                AttributeNames=["All"],
                VisibilityTimeout=self.settings.visibility_s,
                WaitTimeSeconds=wait,
            )
        except Exception:
            logger.exception("could not receive from a jobs queue")
            metrics.add_metric(name="WorkerErrors", unit=MetricUnit.Count, value=1)
            time.sleep(RECEIVE_BACKOFF_S)
            return []
        return [(Receipt(url, m["ReceiptHandle"]), m) for m in got.get("Messages", [])]

    def admit(self, m: dict, receipt: Receipt) -> None:
        taken = self.clock()
        if self.failure is not None:  # dead: the message goes back untouched (the worker is stopping)
            self.leases.release(receipt)
            return
        msg, message_id = QueueMessage.from_body(m["Body"]), m.get("MessageId", "")
        with self._lock:
            held = self.held.get(msg.job_id)
            if held is not None and held.message_id == message_id:  # ours again (its lease lapsed):
                held.receipt = receipt  # only the newest receipt extends and deletes it
                return
        if held is not None:
            self._another_message(msg.job_id, receipt)
            return
        attempt = int(m.get("Attributes", {}).get("ApproximateReceiveCount", 1))
        outcome, started = self.jobs.start(msg, attempt)
        if outcome is Outcome.DELETE_MESSAGE:
            self.leases.delete(receipt)
        if outcome is not Outcome.GENERATE:
            return
        held = Held(msg, receipt, self.clock(), attempt, message_id=message_id, taken=taken)
        with self._lock:
            self.held[msg.job_id] = held
        try:
            held.future = self.submit(msg, started, attempt)
        except BaseException:  # (the caller gives the message back)
            with self._lock:
                self.held.pop(msg.job_id, None)
            raise
        held.future.add_done_callback(lambda _f: self._finished.put(held))

    def _another_message(self, job_id: str, receipt: Receipt) -> None:
        """A second message for a job held here. The job still ours and running: it was promoted
        (an interactive message beside its batch one), which this generation serves -> delete it.
        Otherwise the job was made again after a cancel (or ended): this generation is stale ->
        drop it at the engine's next step, and take the message afresh in a moment."""
        job = self.store.get(job_id)
        if job is not None and job.status == Status.RUNNING and job.worker == self.worker_id:
            self.leases.delete(receipt)
            return
        with self._lock:
            if job_id in self.held:
                self.cancelled.add(job_id)
        self.leases.hide(receipt, HELD_HERE_HIDE_S)

    def submit(self, msg: QueueMessage, started: Started, attempt: int) -> Future:
        """A claimed job -> a future of its GenerationResults, one per prompt (the text of the first
        is streamed). Its message is held (hold, or admit) until it is let go of (let_go)."""
        job_id = msg.job_id
        on_token = self.results.open(msg, started.run, attempt, self.clock(), len(started.prompts[0]))
        try:
            priority = TIERS.index(msg.tier) if msg.tier in TIERS else len(TIERS)
            return gather(
                [
                    self.engine.submit(
                        GenerationRequest(
                            ids,
                            msg.request.params,
                            request_id=job_id,
                            is_cancelled=lambda: job_id in self.cancelled,
                            on_token=on_token if i == 0 else None,
                            priority=priority,
                            tenant=msg.tenant,  # (tenants take turns at admission)
                            cache_scope="" if self.settings.shared_cache else msg.tenant,  # (a timing side
                            # channel otherwise: a tenant could tell another's prompts by their prefill time)
                        )
                    )
                    for i, ids in enumerate(started.prompts)
                ]
            )
        except BaseException:
            self.results.abandon(job_id)
            raise

    # ---- what is held ---------------------------------------------------------------------------

    def hold(self, held: Held) -> Held:
        """Hold `held`'s job unless a generation of it is held already -> the one held for it."""
        with self._lock:
            return self.held.setdefault(held.message.job_id, held)

    def drop(self, held: Held) -> None:
        """Stop `held`'s generation at the engine's next step, if it is still the one held for its
        job: one let go of meanwhile may be made again, and held anew by another generation."""
        with self._lock:
            if self.held.get(held.message.job_id) is held:
                self.cancelled.add(held.message.job_id)

    def let_go(self, job_id: str) -> None:
        """The job's generation is over here (written, given back or failed): forget it and any
        cancel read for it, so a generation held for it later starts clean."""
        with self._lock:
            self.held.pop(job_id, None)
            self.cancelled.discard(job_id)
            if self._writing == job_id:
                self._writing = None

    def _snapshot(self) -> list[Held]:
        with self._lock:
            return list(self.held.values())

    # ---- while generating ---------------------------------------------------------------------

    def housekeep(self) -> None:
        """Periodic chores; one that fails (a throttled call) is logged and tried again next time."""
        now = time.monotonic()
        for chore, every, run in (
            ("heartbeat", self.settings.heartbeat_s, self.heartbeat),
            ("cancel", self.settings.cancel_check_s, self.check_cancelled),
            ("metrics", METRICS_EVERY_S, self.publish_metrics),
            ("alive", METRICS_EVERY_S, health.touch),
        ):  # the container health check
            if now >= self._next[chore]:
                self._next[chore] = now + every
                try:
                    run()
                except Exception:
                    logger.exception(f"{chore} failed")

    def heartbeat(self) -> None:
        held = self._snapshot()
        lost = set(self.leases.extend([h.receipt for h in held if h.receipt is not None]))
        for h in held:
            if h.receipt in lost:  # the message may come back to another worker; the job item says we run it
                logger.warning("could not extend a message's visibility", extra={"job_id": h.message.job_id})
                metrics.add_metric(name="LeaseExtensionFailed", unit=MetricUnit.Count, value=1)
            self.jobs.touch(h.message.job_id)  # a fresh updated_at tells other workers this job is alive

    def check_cancelled(self) -> None:
        held = {h.message.job_id: h for h in self._snapshot()}
        if held:
            states = self.store.states(list(held))
            for j, (status, _) in states.items():
                if status == Status.CANCELLED:
                    self.drop(held[j])
            self.chunks.mark_streamed(j for j, (_, streamed) in states.items() if streamed)

    # ---- finishing ----------------------------------------------------------------------------

    def _write_results(self) -> None:
        while (held := self._finished.get()) is not None:
            try:
                self.finish(held)
            except RepliesOwed as exc:
                self._owe_replies(held.receipt, held.message.job_id, exc)
            except Exception as exc:
                logger.exception("could not finish a job (its generation or its result write failed)")
                metrics.add_metric(name="WorkerErrors", unit=MetricUnit.Count, value=1)
                self._retry_later(held.receipt, held.message.to_body(), exc)
            finally:
                self.let_go(held.message.job_id)

    def finish(self, held: Held) -> None:
        with self._lock:
            self._writing = held.message.job_id  # release_all leaves it to this thread
        # (a failed generation raises)
        self.results.record(held.message, held.received, held.future.result(), taken=held.taken)
        self.leases.delete(held.receipt)

    def keep_trying(self, write: Callable[[], T], job_id: str) -> T:
        """A finished generation is worth keeping: a result write that fails for a passing reason
        (throttled, a 5xx, storage unreachable) is tried again with backoff for up to WRITE_RETRY_S,
        while the heartbeat keeps the message's lease, before the job goes back to the queue to be
        generated again. Any other failure goes back at once."""
        give_up, pause = time.monotonic() + WRITE_RETRY_S, WRITE_RETRY_FIRST_S
        while True:
            try:
                return write()
            except Exception as exc:
                if not transient(exc) or self.halt.is_set() or time.monotonic() + pause > give_up:
                    raise
                logger.warning(
                    "could not write a result; trying again",
                    extra={"job_id": job_id, "error": type(exc).__name__, "retry_in_s": pause},
                )
                metrics.add_metric(name="WorkerErrors", unit=MetricUnit.Count, value=1)
                self.halt.wait(pause)
                pause = min(2 * pause, WRITE_RETRY_MAX_S)

    def _notify(self, job, wake: str | None = None) -> None:
        """A job this worker saw finish: wake the request waiting for it (the message's `wake`),
        then post the replies it owes."""
        if job is not None and job.status.finished:
            send_wake(self.sqs, wake, job)
        try:
            post_replies(job, sqs=self.sqs, s3=self.s3, store=self.store)
        except Exception as exc:
            raise RepliesOwed(f"{type(exc).__name__}: {exc}") from exc

    # ---- giving messages back -----------------------------------------------------------------

    def _owe_replies(self, receipt: Receipt, job_id: str, exc: RepliesOwed) -> None:
        """A finished job whose replies could not be posted: its message comes back for them later
        (not at once: the reply queue is throttled or down), and after the queue's maxReceiveCount
        the dlq function posts them."""
        logger.warning(
            "replies not posted; the message comes back for them",
            extra={"job_id": job_id, "error": str(exc), "retry_in_s": REPLIES_AGAIN_S},
        )
        metrics.add_metric(name="WorkerErrors", unit=MetricUnit.Count, value=1)
        try:
            self.leases.hide(receipt, REPLIES_AGAIN_S)
        except Exception:
            logger.exception("could not hide a message", extra={"job_id": job_id})

    def _retry_later(self, receipt: Receipt, body: str, exc: BaseException) -> None:
        """Put the job back to QUEUED (if ours) and make its message visible again now."""
        try:
            job_id = QueueMessage.from_body(body).job_id
            self.results.abandon(job_id)
            self.jobs.requeue(job_id, last_error=f"{type(exc).__name__}: {exc}"[:500])
        except Exception:
            logger.warning("could not requeue the job of a failed message")
        self.leases.release(receipt)

    def release_all(self) -> None:
        """Give back every held job but the one the writer is writing (it deletes or releases it).
        After the engine died, each job names the failure (as the writer does for those it reached)."""
        with self._lock:
            writing = self._writing
        why = {} if self.failure is None else {"last_error": f"EngineFailed: {self.failure}"[:500]}
        for h in self._snapshot():
            if h.message.job_id == writing:
                continue
            try:
                self.results.abandon(h.message.job_id)
                self.jobs.requeue(h.message.job_id, **why)
                self.leases.release(h.receipt)
            except Exception:
                logger.exception("could not give a job back", extra={"job_id": h.message.job_id})
        with self._lock:
            self.held = {j: h for j, h in self.held.items() if j == writing}

    def publish_metrics(self) -> None:
        metrics.add_metric(name="RequestsRunning", unit=MetricUnit.Count, value=self.engine.num_running)
        metrics.add_metric(name="RequestsWaiting", unit=MetricUnit.Count, value=self.engine.num_waiting)
        metrics.add_metric(name="BatchSize", unit=MetricUnit.Count, value=self.engine.num_running)
        if self.engine.prefixes is not None:  # shared-prefix reuse: its memory (bounded) and, since the last
            report = self.engine.prefixes.report()  # report, its hits and the prompt tokens it saved
            metrics.add_metric(name="PrefixCacheBytes", unit=MetricUnit.Bytes, value=report["bytes"])
            for name, metric in (
                ("hits", "PrefixCacheHits"),
                ("misses", "PrefixCacheMisses"),
                ("tokens_reused", "PrefixCacheTokensReused"),
            ):
                metrics.add_metric(
                    name=metric,
                    unit=MetricUnit.Count,
                    value=report[name] - self._prefix_seen.get(name, 0),
                )
            self._prefix_seen = report
        metrics.flush_metrics()
