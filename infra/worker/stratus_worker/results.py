"""Recording what a generation produced: the text as it streams (streams.ChunkWriter) and the
result when it ends (RUNNING, ours -> DONE, conditional: never a second result), then the
replies it owes and the per-request metrics.
"""

from __future__ import annotations

from collections.abc import Callable

from aws_lambda_powertools.metrics import MetricUnit

from stratus.contracts import Job, QueueMessage, Status
from stratus.jobstore import JobStore
from stratus.observability import logger, metrics
from stratus_engine.outputs import GenerationResult
from stratus_worker import choices
from stratus_worker.streams import ChunkWriter


class Results:
    def __init__(
        self,
        store: JobStore,
        chunks: ChunkWriter,
        worker_id: str,
        s3,
        bucket: str,
        notify: Callable[[Job | None, str | None], None],  # (a finished job, its message's wake)
        token_bytes: list[bytes],
        decode: Callable[[list[int]], str],
        keep_trying: Callable[[Callable[[], Job | None], str], Job | None],
    ) -> None:
        """keep_trying(write, job id): runs the result write, trying again while it may pass (Worker.keep_trying)."""
        self.store, self.chunks, self.worker_id, self.keep_trying = store, chunks, worker_id, keep_trying
        self.token_bytes, self.decode = token_bytes, decode
        self.s3, self.bucket, self.notify = s3, bucket, notify

    def open(
        self, msg: QueueMessage, run: str, attempt: int, now: float, prompt_tokens: int = 0
    ) -> Callable[[int], None]:
        """Start collecting the job's tokens (the claimed job's `run`; its first prompt's length)
        -> the engine's on_token callback."""
        return self.chunks.open(
            msg.job_id,
            run,
            attempt,
            msg.request.params.stop,
            int(max(msg.deadline, now) + 3600),
            streamed=msg.stream,
            logprobs=msg.request.params.logprobs is not None,
            prompt_tokens=prompt_tokens,
            wake=msg.wake,
        )

    def abandon(self, job_id: str) -> None:
        """The generation will not finish here (requeued, released, failed to start)."""
        self.chunks.close(job_id)

    def _landed(self, job_id: str) -> Job | None:
        """The job, when an earlier write of ours already finished it (DONE, owned by this worker)."""
        job = self.store.get(job_id)
        return job if job is not None and job.status == Status.DONE and job.worker == self.worker_id else None

    def record(
        self, msg: QueueMessage, received: float, results: list[GenerationResult], *, taken: float | None = None
    ) -> None:
        """Write a finished generation (one result per prompt): RUNNING (ours) -> DONE, the final
        chunk, replies, metrics. received: when the job was claimed and handed to the engine; taken:
        when its message reached this worker (the request timeline's marks, stratus.timeline)."""
        job_id = msg.job_id
        r = max(results, key=lambda x: x.timings.total_s)  # the timings of the slowest prompt
        if any(c.finish_reason == "cancelled" for x in results for c in x.choices):
            self.chunks.close(job_id)
            metrics.add_metric(name="RequestsCancelled", unit=MetricUnit.Count, value=1)
            self.notify(self.store.get(job_id), msg.wake)
            return
        queued_s = received - msg.enqueued_at + r.timings.queue_s
        timings = {
            "queue_s": round(queued_s, 4),
            "ttft_s": round(r.timings.ttft_s, 4),
            "decode_s": round(r.timings.decode_s, 4),
            "total_s": round(r.timings.total_s, 4),
            "decode_tokens_per_s": round(r.timings.decode_tokens_per_s(r.usage.completion_tokens), 2),
            "started_s": round(received - msg.enqueued_at, 4),  # (the engine's times count from here)
        }
        if taken is not None:
            timings["taken_s"] = round(taken - msg.enqueued_at, 4)
        usage = choices.usage(results)
        result = choices.result_body(msg.request, results, self.token_bytes, self.decode, job_id)

        def write() -> Job | None:  # (an earlier try's write may have landed though its call failed)
            return self.store.complete(
                job_id,
                self.worker_id,
                result,
                s3=self.s3,
                bucket=self.bucket,
                usage=usage,
                timings=timings,
                request_bytes=msg.request.stored_bytes,
            ) or self._landed(job_id)

        try:
            written = self.keep_trying(write, job_id)  # only the write: replies and metrics follow once
        except BaseException:
            self.chunks.close(job_id)
            raise
        if written:
            logger.info(
                "generated",
                extra={
                    "job_id": job_id,
                    "completion_tokens": usage["completion_tokens"],
                    "ttft_s": timings["ttft_s"],
                    "finish_reason": r.finish_reason,
                },
            )
        else:  # cancelled meanwhile, or another worker took it over: never a second result
            logger.info("result not written: the job is no longer ours", extra={"job_id": job_id})
        try:  # the final chunk only speeds readers up: they also see DONE on the job item
            self.chunks.close(job_id, results[0] if written else None)
        except Exception as exc:
            chunk_error(exc)
        for name, value, unit in (
            ("TimeToFirstToken", r.timings.ttft_s, MetricUnit.Seconds),
            ("RequestQueueTime", queued_s, MetricUnit.Seconds),
            ("RequestLatency", r.timings.total_s, MetricUnit.Seconds),
            ("GenerationTokens", usage["completion_tokens"], MetricUnit.Count),
            ("GenerationTokensPerSecond", timings["decode_tokens_per_s"], MetricUnit.CountPerSecond),
        ):
            metrics.add_metric(name=name, unit=unit, value=value)
        self.notify(written, msg.wake)  # last: replies that cannot be posted now raise (worker.RepliesOwed)


def chunk_error(exc: BaseException) -> None:
    """A chunk write failed: the text is kept and tried again; readers fall back to the job item."""
    logger.warning("could not write stream chunks; retrying", extra={"error": type(exc).__name__})
    metrics.add_metric(name="WorkerErrors", unit=MetricUnit.Count, value=1)
