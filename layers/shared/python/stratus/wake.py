"""Waking a request that waits for its job, instead of leaving it to notice on its next read.

  API instance   a Waker: an SQS queue of its own ({prefix}-{created, hex}-{random}), made on the
                 first wait, and one thread that long-polls it and marks the jobs its messages name
  submit         the job's queue message carries that queue's URL (QueueMessage.wake)
  worker, dlq    right after the write that finishes the job: SendMessage {"job_id"} to it (send);
                 for a streamed job also after each write of its chunks (send_many)
  the request    waits on the mark between its reads of the job (Waker.wait), so it reads the
                 finished job within milliseconds of its write

Wakes are best effort. The request still reads its job on its schedule (less often), so a wake
that is lost (SQS refused it, the queue was swept) costs one pause, never the answer. A message
says only which job to read again: the job item stays the truth.

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

from stratus.observability import logger

WAIT_S = 20  # a receive's long poll (SQS's longest)
MAX_AGE_S = 12 * 3600  # a wake queue older than this is swept by the next instance that starts one
RETRY_S = 30.0  # after SQS refused to make the queue: wait this long before trying again
WOKEN_KEEP_S = 120.0  # a wake kept for a request that has not begun to wait yet
NAME_ROOM = 80 - 18  # SQS names are at most 80 characters; "-{8 hex}-{8 hex}" follows the prefix
# (a longer prefix is cut; IAM, which names the whole prefix, then refuses the queue: requests
# only re-read. Stacks named in at most 57 characters get wakes: "<stack>-wake" is the prefix.)


def send(sqs, url: str | None, job_id: str) -> None:
    """Wake whoever waits for a finished job (the queue message's `wake`); best effort: a failure
    is logged and the waiter notices on its next read."""
    send_many(sqs, [(url, job_id)])


def send_many(sqs, wakes: list[tuple[str | None, str]]) -> None:
    """send() for many (url, job id) at once: one SendMessageBatch per queue and 10 wakes (a
    worker's flush round of stream chunks, whose readers mostly share an API instance)."""
    by_url: dict[str, list[str]] = {}
    for url, job_id in wakes:
        if url and job_id not in by_url.setdefault(url, []):
            by_url[url].append(job_id)
    for url, job_ids in by_url.items():
        for i in range(0, len(job_ids), 10):
            entries = [
                {"Id": str(n), "MessageBody": json.dumps({"job_id": j}, separators=(",", ":"))}
                for n, j in enumerate(job_ids[i : i + 10])
            ]
            try:
                sqs.send_message_batch(QueueUrl=url, Entries=entries)
            except Exception as exc:  # (botocore raises many types) nothing is lost: readers read on their schedule
                logger.info("wakes not sent", extra={"wakes": len(entries), "error": type(exc).__name__})


class Waker:
    """One API instance's wake queue and its reader. make_sqs: makes the SQS client, on the first
    wait (not at every container's start), one whose read timeout outlasts WAIT_S (deps.WAKE_CONFIG)."""

    def __init__(self, make_sqs: Callable[[], object], prefix: str, *, clock=time.time, wait_s: int = WAIT_S) -> None:
        self.make_sqs, self.prefix, self.clock, self.wait_s = make_sqs, prefix[:NAME_ROOM], clock, wait_s
        self._cond = threading.Condition()
        self._woken: dict[str, float] = {}  # job id -> when its wake came (monotonic)
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
            self._mark([_job_id(m.get("Body", "")) for m in messages])
            if messages:
                try:
                    self.sqs.delete_message_batch(
                        QueueUrl=url,
                        Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)],
                    )
                except Exception as exc:  # (they come back after the visibility timeout: a spare read)
                    logger.info("wakes not deleted", extra={"error": type(exc).__name__})

    def _mark(self, job_ids: list[str | None]) -> None:
        now = time.monotonic()
        with self._cond:
            for job_id in job_ids:
                if job_id:
                    self._woken[job_id] = now
            for job_id in [j for j, at in self._woken.items() if now - at > WOKEN_KEEP_S]:
                del self._woken[job_id]
            self._cond.notify_all()


def made_at(name: str, prefix: str) -> int | None:
    """When a wake queue of this prefix was made (epoch seconds, from its name), or None."""
    stamp = name[len(prefix) + 1 :].split("-", 1)[0] if name.startswith(f"{prefix}-") else ""
    try:
        return int(stamp, 16)
    except ValueError:
        return None


def _job_id(body: str) -> str | None:
    try:
        job_id = json.loads(body).get("job_id")
    except (ValueError, AttributeError):
        return None
    return job_id if isinstance(job_id, str) else None


def _gone(exc: Exception) -> bool:
    code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
    return code in ("AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist")
