"""Waking a request that waits for its job, instead of leaving it to notice on its next read.

  API instance   a Waker: an SQS queue of its own ({prefix}-{created, hex}-{random}), made on the
                 first wait, and one thread that long-polls it and marks the jobs its messages name
  submit         the job's queue message carries that queue's URL (QueueMessage.wake)
  worker, dlq    right after the write that finishes the job: SendMessage {"job_id", "job"} to it
                 (send: "job" is the job that write returned, as an item less its prompt); for a
                 streamed job also {"job_id", "chunks"} as each write of its chunks begins
                 (send_many: the chunk items being written)
  the request    waits on the mark between its reads of the job (Waker.wait); woken by a finished
                 job's wake it answers from the job carried (Waker.finished), a stream sends the
                 chunks carried when they follow on from its text (Waker.chunks), neither read back

Wakes are best effort. The request still reads its job on its schedule (less often), so a wake
that is lost (SQS refused it, the queue was swept) costs one pause, never the answer. A finished
job does not change again (only its bookkeeping: expiry, replies posted), so the job a wake carries
is what a read would see, as a written chunk is; what is too big to carry (MAX_CARRIED_BYTES) is
sent as the id alone, and read. Only the stack's workers and dlq function may send to the queues
(IAM), as only they may finish jobs.

An instance that is gone (a Lambda execution environment retired without a shutdown) leaves its
queue; the next instance to make one deletes those made more than MAX_AGE_S ago. An instance
whose own queue was swept makes a new one.
"""

from __future__ import annotations

import functools
import json
import secrets
import threading
import time
from collections.abc import Callable

from stratus.chunks import Chunk
from stratus.contracts import Job
from stratus.observability import logger

WAIT_S = 20  # a receive's long poll (SQS's longest)
MAX_AGE_S = 12 * 3600  # a wake queue older than this is swept by the next instance that starts one
RETRY_S = 30.0  # after SQS refused to make the queue: wait this long before trying again
WOKEN_KEEP_S = 120.0  # a wake kept for a request that has not begun to wait yet
MAX_CARRIED_BYTES = 200_000  # a finished job or chunks ride in their wake when they fit
BATCH_BYTES = 250_000  # SQS: 256 KiB a SendMessageBatch, all its messages together
NAME_ROOM = 80 - 18  # SQS names are at most 80 characters; "-{8 hex}-{8 hex}" follows the prefix
# (a longer prefix is cut; IAM, which names the whole prefix, then refuses the queue: requests
# only re-read. Stacks named in at most 57 characters get wakes: "<stack>-wake" is the prefix.)


def send(sqs, url: str | None, job: Job) -> None:
    """Wake whoever waits for a job that just finished (the queue message's `wake`), handing it the
    job as its finishing write left it; best effort: a failure is logged and the waiter notices on
    its next read."""
    _send(sqs, [(url, job.job_id, body(job.job_id, job))])


def send_many(sqs, wakes: list[tuple[str | None, str, list[Chunk]]]) -> None:
    """Wake the readers of many (url, job id, its chunks being written) at once (a worker's flush
    round of stream chunks, whose readers mostly share an API instance)."""
    _send(sqs, [(url, job_id, body(job_id, chunks=chunks)) for url, job_id, chunks in wakes])


def body(job_id: str, job: Job | None = None, chunks: list[Chunk] = ()) -> str:
    """A wake's message: the job's id, and what it carries when the message stays within
    MAX_CARRIED_BYTES: a finished job's item without its prompt (the poll's projection,
    jobstore.WITHOUT_PROMPT), or chunk items (expires_at left out)."""
    carried: dict = {}
    if job is not None:
        carried["job"] = {k: v for k, v in job.to_item().items() if k != "prompt"}
    if chunks:
        carried["chunks"] = [{k: v for k, v in c.to_item(0).items() if k != "expires_at"} for c in chunks]
    if carried:
        text = json.dumps({"job_id": job_id, **carried}, separators=(",", ":"), default=str)  # (Decimals)
        if len(text.encode()) <= MAX_CARRIED_BYTES:
            return text
    return json.dumps({"job_id": job_id}, separators=(",", ":"))


def _send(sqs, wakes: list[tuple[str | None, str, str]]) -> None:
    """(url, job id, body) -> SendMessageBatch per queue, 10 wakes or BATCH_BYTES at most a call,
    one wake per job."""
    by_url: dict[str, dict[str, str]] = {}
    for url, job_id, text in wakes:
        if url:
            by_url.setdefault(url, {}).setdefault(job_id, text)
    for url, bodies in by_url.items():
        for texts in _batches(list(bodies.values())):
            entries = [{"Id": str(n), "MessageBody": t} for n, t in enumerate(texts)]
            try:
                sqs.send_message_batch(QueueUrl=url, Entries=entries)
            except Exception as exc:  # (botocore raises many types) nothing is lost: readers read on their schedule
                logger.info("wakes not sent", extra={"wakes": len(entries), "error": type(exc).__name__})


def _batches(texts: list[str]) -> list[list[str]]:
    """Message bodies -> SendMessageBatch loads: at most 10 and BATCH_BYTES each, in order."""
    out: list[list[str]] = []
    size = 0
    for t in texts:
        n = len(t.encode())
        if not out or len(out[-1]) == 10 or size + n > BATCH_BYTES:
            out.append([])
            size = 0
        out[-1].append(t)
        size += n
    return out


class Waker:
    """One API instance's wake queue and its reader. make_sqs: makes the SQS client, on the first
    wait (not at every container's start), one whose read timeout outlasts WAIT_S (deps.WAKE_CONFIG)."""

    def __init__(self, make_sqs: Callable[[], object], prefix: str, *, clock=time.time, wait_s: int = WAIT_S) -> None:
        self.make_sqs, self.prefix, self.clock, self.wait_s = make_sqs, prefix[:NAME_ROOM], clock, wait_s
        self._cond = threading.Condition()
        self._woken: dict[str, float] = {}  # job id -> when its wake came (monotonic)
        self._carried: dict[str, Job] = {}  # job id -> the finished job its wake carried, until taken
        self._chunks: dict[str, list[Chunk]] = {}  # job id -> chunks its wakes carried, until taken
        self._url: str | None = None
        self._retry_at = 0.0
        self._closed = False

    def url(self) -> str | None:
        """The queue's URL for a message to carry, made (with its reader) on first use; None while
        SQS refuses to make it (the request then only reads)."""
        with self._cond:
            if self._url is None and not self._closed and time.monotonic() >= self._retry_at:
                try:
                    self._url = self._create()
                except Exception as exc:
                    self._retry_at = time.monotonic() + RETRY_S
                    logger.warning("no wake queue; waiting requests only re-read", extra={"error": type(exc).__name__})
                    return None
                threading.Thread(target=self._read, args=(self._url,), name="wake", daemon=True).start()
            return self._url

    def wait(self, job_id: str, since: float, timeout: float) -> bool:
        """Block until a wake for this job that came after `since` (time.monotonic(), taken before
        the caller last read the job: what that read saw is older) is here -> True, at once if it
        already is; False when `timeout` passes first."""
        with self._cond:
            return self._cond.wait_for(lambda: self._woken.get(job_id, -1.0) >= since, max(0.0, timeout))

    def finished(self, job_id: str) -> Job | None:
        """The finished job a wake carried for this id (taken: a job wakes the one request that made
        it), or None."""
        with self._cond:
            return self._carried.pop(job_id, None)

    def chunks(self, job_id: str) -> list[Chunk]:
        """The chunks wakes carried for this id since it was last asked, in sequence order (taken)."""
        with self._cond:
            return sorted(self._chunks.pop(job_id, []), key=lambda c: c.seq)

    def close(self) -> None:
        """Delete the queue (an instance shutting down); its reader stops with it."""
        with self._cond:
            url, self._url, self._closed = self._url, None, True
        if url:
            try:
                self.sqs.delete_queue(QueueUrl=url)
            except Exception as exc:
                logger.info("wake queue not deleted", extra={"error": type(exc).__name__})

    @functools.cached_property
    def sqs(self):
        return self.make_sqs()

    def _create(self) -> str:
        name = f"{self.prefix}-{int(self.clock()):08x}-{secrets.token_hex(4)}"
        url = self.sqs.create_queue(QueueName=name, Attributes={"MessageRetentionPeriod": "60"})["QueueUrl"]
        logger.info("wake queue made", extra={"queue": name})
        threading.Thread(target=self.sweep, args=(url,), name="wake-sweep", daemon=True).start()
        return url

    def sweep(self, own: str) -> int:
        """Delete the wake queues of this prefix made more than MAX_AGE_S ago (gone instances');
        -> how many."""
        deleted, kwargs = 0, {"QueueNamePrefix": f"{self.prefix}-", "MaxResults": 1000}
        try:
            while True:
                page = self.sqs.list_queues(**kwargs)
                for url in page.get("QueueUrls", []):
                    made = made_at(url.rsplit("/", 1)[-1], self.prefix)
                    if url != own and made is not None and self.clock() - made > MAX_AGE_S:
                        self.sqs.delete_queue(QueueUrl=url)
                        deleted += 1
                if "NextToken" not in page:
                    break
                kwargs["NextToken"] = page["NextToken"]
        except Exception as exc:
            logger.info("wake queues not swept", extra={"error": type(exc).__name__})
        if deleted:
            logger.info("swept old wake queues", extra={"deleted": deleted})
        return deleted

    def _read(self, url: str) -> None:
        """Long-poll the queue and mark the jobs its messages name, until the queue is closed or
        gone (the next url() then makes a new one)."""
        while True:
            with self._cond:
                if self._url != url:
                    return
            try:
                got = self.sqs.receive_message(QueueUrl=url, WaitTimeSeconds=self.wait_s, MaxNumberOfMessages=10)
            except Exception as exc:
                if _gone(exc):
                    with self._cond:
                        if self._url == url:
                            self._url = None
                    logger.warning("wake queue gone; the next wait makes another")
                    return
                logger.info("wake queue not read", extra={"error": type(exc).__name__})
                time.sleep(1.0)
                continue
            messages = got.get("Messages", [])
            self._mark([_read(m.get("Body", "")) for m in messages])
            if messages:
                try:
                    self.sqs.delete_message_batch(
                        QueueUrl=url,
                        Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)],
                    )
                except Exception as exc:  # (they come back after the visibility timeout: a spare read)
                    logger.info("wakes not deleted", extra={"error": type(exc).__name__})

    def _mark(self, wakes: list[tuple[str | None, Job | None, list[Chunk]]]) -> None:
        now = time.monotonic()
        with self._cond:
            for job_id, job, chunks in wakes:
                if job_id:
                    self._woken[job_id] = now
                if job is not None:
                    self._carried[job_id] = job
                if chunks:
                    self._chunks.setdefault(job_id, []).extend(chunks)
            for job_id in [j for j, at in self._woken.items() if now - at > WOKEN_KEEP_S]:
                del self._woken[job_id]
                self._carried.pop(job_id, None)
                self._chunks.pop(job_id, None)
            self._cond.notify_all()


def made_at(name: str, prefix: str) -> int | None:
    """When a wake queue of this prefix was made (epoch seconds, from its name), or None."""
    stamp = name[len(prefix) + 1 :].split("-", 1)[0] if name.startswith(f"{prefix}-") else ""
    try:
        return int(stamp, 16)
    except ValueError:
        return None


def _read(text: str) -> tuple[str | None, Job | None, list[Chunk]]:
    """A wake's message -> (the job id it names, the finished job it carries, the chunks it
    carries); None and [] for what is not there or not well formed (the reader then reads)."""
    try:
        fields = json.loads(text)
        job_id = fields.get("job_id")
    except (ValueError, AttributeError):
        return None, None, []
    if not isinstance(job_id, str):
        return None, None, []
    try:
        job = Job.from_item(fields["job"]) if "job" in fields else None
    except (KeyError, TypeError, ValueError, AttributeError):
        job = None
    try:
        chunks = [Chunk.from_item(i) for i in fields.get("chunks", [])]
    except (KeyError, TypeError, ValueError, AttributeError):
        chunks = []
    mine = [c for c in chunks if c.stream.split(".", 1)[0] == job_id]
    return job_id, job if job is not None and job.job_id == job_id and job.status.finished else None, mine


def _gone(exc: Exception) -> bool:
    code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
    return code in ("AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist")
