"""`stream: true`: OpenAI's server-sent events, read from the chunk items workers write.

open_stream(route, body, tenant, deps)   validate, authenticate (done by the caller), charge and
                                         enqueue: errors here keep their HTTP status and JSON body
Stream.events()                          bytes to send, in order:
    role chunk (chat; completions send an empty text) at once,
    text chunks as they land (those its worker's wakes carry, stratus.wake, when they go on from the
      text sent; else a strongly consistent Query of the job's chunks, every WOKEN_PAUSE_S when its
      worker wakes it; a stream on another request's job reads every poll_interval_s, growing to
      MAX_PAUSE_S while nothing arrives),
    the finish chunk, the usage chunk (stream_options.include_usage), `data: [DONE]`.
With continuous_usage_stats too, every chunk carries the usage as of its text (the worker writes
it on each chunk item; null before the worker has the prompt's length).
A cache hit streams its text at once. Identical requests share one job, so they stream the same
chunks (one that joins a job created without streaming marks it: its worker starts writing).
After the first byte an error is in-band, `data: {"error": {...}}` then `[DONE]`, which the
openai SDK raises as an APIError. `: keep-alive` comments go out every stream_keepalive_s of
silence (a job waiting in the queue, a worker starting).
Stream.close() when the client went away: a job nobody else can be waiting on (not cacheable) is
cancelled; a cacheable one finishes and its result is cached.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from botocore.exceptions import BotoCoreError, ClientError

from stratus import submission, timeline
from stratus.chunks import Assembler, Chunk, ChunkStore, Diverged, stream_key
from stratus.contracts import InferenceRequest, Job, Status
from stratus.deps import Deps
from stratus.errors import InvalidRequest
from stratus.keys import Tenant
from stratus.observability import logger
from stratus.service import carried, wake_url, with_result
from stratus.shapes import TextOffsets, completion_logprobs
from stratus.tools import CallDeltas
from stratus.wire import StreamOptions, stream_options

CONTENT_TYPE = "text/event-stream"
HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
JOB_READ_EVERY_S = 1.0  # how often a stream re-reads its job (failures, and results whose final chunk is missing)
MAX_PAUSE_S = 0.05
WOKEN_PAUSE_S = 0.5  # a stream whose worker wakes it (stratus.wake) reads when woken, else this often
DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keep-alive\n\n"


def sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


@dataclass
class Shape:
    """The chunk bodies of one response (same id, created and model on every chunk)."""

    route: str
    job_id: str
    created: int
    model: str
    include_usage: bool
    continuous_usage: bool = False
    offsets: TextOffsets = field(default_factory=TextOffsets)  # completions' text_offset, across chunks

    def _base(self, usage: dict | None = None) -> dict:
        chat = self.route == "chat"
        body = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{self.job_id}",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": self.created,
            "model": self.model,
        }
        if self.include_usage:
            body["usage"] = usage if self.continuous_usage else None
        return body

    def text(
        self,
        text: str,
        *,
        role: bool = False,
        finish_reason: str | None = None,
        logprobs: list[dict] | None = None,
        usage: dict | None = None,
    ) -> bytes:
        """logprobs: this chunk's log-probability entries (requests that asked), the ones after
        those already sent; usage: as of this text (shown with continuous_usage_stats)."""
        if self.route == "chat":
            delta = (
                {"role": "assistant", "content": text}
                if role
                else ({"content": text} if text or finish_reason is None else {})
            )
            return self.delta(delta, finish_reason=finish_reason, logprobs=logprobs, usage=usage)
        choice = {
            "index": 0,
            "text": text,
            "finish_reason": finish_reason,
            "logprobs": None if logprobs is None else completion_logprobs(logprobs, self.offsets),
        }
        return sse({**self._base(usage), "choices": [choice]})

    def delta(
        self,
        delta: dict,
        *,
        finish_reason: str | None = None,
        logprobs: list[dict] | None = None,
        usage: dict | None = None,
    ) -> bytes:
        """A chat chunk of any delta (text, or tool_calls: stratus.tools.CallDeltas)."""
        choice = {
            "index": 0,
            "delta": delta,
            "logprobs": None if logprobs is None else {"content": logprobs},
            "finish_reason": finish_reason,
        }
        return sse({**self._base(usage), "choices": [choice]})

    def usage(self, usage: dict) -> bytes:
        return sse({**self._base(), "choices": [], "usage": usage})


def error_event(message: str, code: str, error_type: str = "server_error") -> bytes:
    return sse({"error": {"message": message, "type": error_type, "param": None, "code": code}})


class Stream:
    def __init__(
        self,
        deps: Deps,
        tenant: Tenant,
        req: InferenceRequest,
        job: Job,
        options: StreamOptions,
        hit: bool,
        woken: bool = False,
    ) -> None:
        """woken: the job's message carries this instance's wake queue (its worker wakes the stream
        after each chunk it writes)."""
        self.deps, self.tenant, self.req, self.job, self.hit, self.woken = deps, tenant, req, job, hit, woken
        self.shape = Shape(
            req.route, job.job_id, int(job.created_at), req.model, options.include_usage, options.continuous_usage
        )
        self.chunks = ChunkStore(deps.stream_table)
        self.logprobs = req.params.logprobs is not None
        self.finished = False
        # a chat offered tools: its text goes out as content or as tool_calls deltas (stratus.tools)
        self.calls = CallDeltas(job.job_id) if req.params.grammar and req.route == "chat" else None
        self.held: list[dict] = []  # log-probability entries waiting for a delta to carry them
        # the stream's timeline (stratus.timeline.stream_phases; stream_of sets the request's marks)
        self.t_in: float | None = None  # the request's arrival
        self.t_sent: float | None = None  # its submit's end
        self.t_first: float | None = None  # its first text sent
        self.ended: Job | None = None  # its job as it finished

    @property
    def stream(self) -> str:
        """The chunk partition of the job's run (stratus.chunks.stream_key)."""
        return stream_key(self.job.job_id, self.job.run)

    def events(self) -> Iterator[bytes]:
        yield from self._events()
        if self.t_in is not None and self.t_sent is not None and not self.hit:
            spans = timeline.stream_phases(self.ended, self.t_in, self.t_sent, self.t_first, self.deps.clock())
            ms = {k: round(1000 * v, 1) for k, v in spans.items()}
            logger.info("stream timeline", extra={"job_id": self.job.job_id, "ms": ms})

    def _events(self) -> Iterator[bytes]:
        yield from self._start()
        if self.job.status.finished:  # a cache hit, or a job that finished before the stream opened
            yield from self._end(Assembler(), self.job)
            return
        asm, clock = Assembler(), self.deps.clock
        started = last_sent = last_read = clock()
        pause = self.deps.settings.poll_interval_s
        if self.woken:  # a job just made has no chunks: read once woken
            self.deps.pause(self.job.job_id, time.monotonic(), WOKEN_PAUSE_S)
        while True:
            read_at = time.monotonic()
            try:
                done = carried(self.job.job_id, self.tenant, self.deps)  # (its wake carried it: stratus.wake)
                if done is not None and done.run == self.job.run:
                    yield from self._end(asm, with_result(done, self.deps))
                    return
                for chunk in self._new_chunks(asm):
                    piece, entries = asm.apply(chunk)
                    if piece and self.t_first is None:
                        self.t_first = clock()
                    if piece or entries:
                        yield from self._send(piece, entries, chunk.usage)
                        last_sent, pause = clock(), self.deps.settings.poll_interval_s
                    if chunk.final and len(asm.sent) == chunk.offset + len(chunk.text):
                        yield from self._finish(chunk.final["finish_reason"], chunk.final["usage"])
                        return
                    if chunk.final:  # a flush was lost on the way: the job item has the whole text
                        last_read = float("-inf")
                now = clock()
                if now - last_read >= JOB_READ_EVERY_S:
                    last_read = now
                    job = self.deps.store.get(self.job.job_id, now=now, prompt=False)
                    if job is None:
                        yield from self._fail("the job is gone (expired or removed)", "job_gone")
                        return
                    if job.run != self.job.run:  # made again (the run waited on failed): read the new run's
                        self.job, asm.last_seq = job, 0  # chunks, from offset 0: the Assembler skips what was sent
                    if job.status.finished:
                        yield from self._end(asm, with_result(job, self.deps))
                        return
            except (BotoCoreError, ClientError) as exc:  # storage unreachable for a moment: keep waiting
                logger.warning(
                    "stream read failed; retrying", extra={"job_id": self.job.job_id, "error": type(exc).__name__}
                )
                now = clock()
            except Diverged as exc:
                logger.warning("stream diverged", extra={"job_id": self.job.job_id})
                yield from self._fail(f"{exc}; the text so far is incomplete. Retry the request", "stream_diverged")
                return
            if now - started > self.deps.settings.stream_max_s:
                yield from self._fail(
                    f"the stream stayed open {self.deps.settings.stream_max_s:.0f} s; the job "
                    f"goes on: GET /v1/jobs/{self.job.job_id}",
                    "stream_timeout",
                )
                return
            if now - last_sent >= self.deps.settings.stream_keepalive_s:
                yield KEEPALIVE
                last_sent = now
            # (a wake for the job, after a chunk or at its end, cuts the pause short)
            self.deps.pause(self.job.job_id, read_at, WOKEN_PAUSE_S if self.woken else pause)
            pause = min(MAX_PAUSE_S, pause * 1.5)

    def _new_chunks(self, asm: Assembler) -> list[Chunk]:
        """The chunks past those applied: the ones wakes carried (stratus.wake) when they go on from
        the text sent, else those read from the stream."""
        given = self.deps.waker.chunks(self.job.job_id) if self.deps.waker is not None else []
        fresh = [c for c in given if c.stream == self.stream and c.seq > asm.last_seq]
        if fresh and asm.follows(fresh):
            return fresh
        return self.chunks.after(self.stream, asm.last_seq)

    def _end(self, asm: Assembler, job: Job) -> Iterator[bytes]:
        """The job finished: the rest of its text and the finish, or an in-band error."""
        self.ended = job
        if job.status != Status.DONE:
            err = job.error or {"message": f"job {job.status.value.lower()}", "code": job.status.value.lower()}
            yield from self._fail(
                err.get("message", ""), err.get("code") or "job_failed", err.get("type") or "server_error"
            )
            return
        result = job.result or {}
        rest, entries = asm.finish(result.get("text", ""), result.get("logprobs"))  # Diverged when it disagrees
        if rest and self.t_first is None:
            self.t_first = self.deps.clock()
        if rest or entries:
            yield from self._send(rest, entries, job.usage)
        yield from self._finish(result.get("finish_reason", "stop"), job.usage or {})

    # ---- the events (a subclass speaks another API: stratus.responses.ResponseStream) -------------

    def _start(self) -> Iterator[bytes]:
        yield self.shape.text("", role=True)

    def _fail(self, message: str, code: str, error_type: str = "server_error") -> Iterator[bytes]:
        """An in-band error, then the end."""
        yield error_event(message, code, error_type)
        yield from self._done()

    def _send(self, piece: str, entries: list[dict], usage: dict | None) -> Iterator[bytes]:
        if self.calls is None:
            yield self.shape.text(piece, logprobs=entries if self.logprobs else None, usage=usage)
            return
        self.held += entries
        for delta in self.calls.push(piece):
            yield self.shape.delta(delta, logprobs=self._take_held(), usage=usage)

    def _take_held(self) -> list[dict] | None:
        if not self.logprobs:
            return None
        held, self.held = self.held, []
        return held

    def _finish(self, finish_reason: str, usage: dict) -> Iterator[bytes]:
        if self.calls is not None:
            if self.calls.calling and finish_reason == "stop":
                finish_reason = "tool_calls"
            if self.held:
                yield self.shape.delta({}, logprobs=self._take_held(), usage=usage)
        yield self.shape.text("", finish_reason=finish_reason, usage=usage)
        if self.shape.include_usage:
            yield self.shape.usage(usage)
        yield from self._done()

    def _done(self) -> Iterator[bytes]:
        self.finished = True
        yield DONE

    def close(self) -> None:
        """The client went away before the end."""
        if self.finished or self.hit or self.job.cacheable:
            return  # a cacheable job finishes and is cached (identical requests may be waiting on it)
        if self.deps.store.cancel(self.job.job_id, self.tenant.name):
            logger.info("stream abandoned: job cancelled", extra={"job_id": self.job.job_id})


def open_stream(route: str, body: dict, tenant: Tenant, deps: Deps, *, cache_control: str = "") -> Stream | None:
    """A Stream for `stream: true` requests (None otherwise). Raises StratusError before any byte."""
    options = stream_options(body) if isinstance(body, dict) else None
    if options is None:
        return None
    if deps.stream_table is None:
        raise InvalidRequest("streaming is not configured on this deployment (no stream table)", param="stream")
    t_in = deps.clock()
    wake = wake_url(deps)
    how = submission.api(deps.settings, cache_control, stream=True, tier=submission.tier_of(body, tenant), wake=wake)
    sub = submission.submit(route, body, tenant, deps, how)
    return stream_of(sub, tenant, deps, Stream, options, marks=(t_in, deps.clock()))


def stream_of(
    sub: submission.Submission, tenant: Tenant, deps: Deps, kind: type, *args, marks: tuple[float, float]
) -> Stream:
    """A stream (`kind`: Stream or a subclass, made with `args` after the job) of a submission made
    with streaming on: a cache hit's text at once; a live job joined is marked streamed. marks: the
    request's arrival and its submit's end, its timeline's first marks."""
    stream = _stream_of(sub, tenant, deps, kind, *args)
    stream.t_in, stream.t_sent = marks
    return stream


def _stream_of(sub: submission.Submission, tenant: Tenant, deps: Deps, kind: type, *args) -> Stream:
    if sub.hit is not None:
        return kind(deps, tenant, sub.req, sub.hit, *args, hit=True)
    if not sub.created and not deps.store.mark_streamed(sub.job_id):
        finished = deps.store.get(sub.job_id)  # finished meanwhile: streamed from the job item
        if finished is not None and finished.status.finished:
            return kind(deps, tenant, sub.req, with_result(finished, deps), *args, hit=True)
    return kind(deps, tenant, sub.req, sub.job, *args, hit=False, woken=sub.woken)
