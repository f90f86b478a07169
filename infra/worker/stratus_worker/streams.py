"""Streaming jobs' text, written to the StreamTable while they generate (stratus.chunks).

Every job a worker runs collects its tokens (TextDeltas.push: a list append per token). A job is
streamed when its message asks for it, or when a streaming request joins it later (the job item's
`streamed` flag, seen by the worker's periodic job read). The flusher thread writes each streamed
job's new visible text as one chunk item: the first as soon as there is any, then at most every
flush_s; all due jobs go out in one BatchWriteItem (a chunk whose write fails stays, and is written
before the job's next: a reader never sees a gap). The reader the job's message names (its wake
queue, stratus.wake) is handed the chunks as their write begins: it has the text as soon as it is
made, and the table's copy serves every reader that reads. After the job's result is written, a
final chunk carries the rest of the text, the finish reason and the usage.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from stratus.chunks import Chunk, ChunkStore, first_seq, stream_key
from stratus.errors import transient
from stratus_engine.deltas import TextDeltas, TokenText
from stratus_worker.choices import usage


@dataclass(eq=False)
class _Stream:
    key: str  # stream_key(job id, run): the partition its chunks go to
    deltas: TextDeltas
    expires_at: int
    seq: int  # the next chunk's sequence number
    streamed: bool
    prompt_tokens: int = 0  # (each chunk carries the usage so far)
    entries: list[dict] | None = None  # log-probability entries, when the request asked for them
    entries_sent: int = 0
    last_flush: float = 0.0
    wrote: bool = False
    job_id: str = ""
    wake: str | None = None  # the reading API instance's wake queue (stratus.wake): woken after each write
    unsent: list = field(default_factory=list)  # (chunk, expires_at) made but not yet written: tried again

    def take_entries(self) -> tuple[int, list[dict] | None]:
        """-> (offset, the entries of the tokens the text sent so far holds)"""
        if self.entries is None:
            return 0, None
        start = self.entries_sent
        end = min(len(self.entries), self.deltas.tokens_sent(start))
        self.entries_sent = max(start, end)
        return start, self.entries[start : self.entries_sent]


class ChunkWriter:
    def __init__(
        self,
        store: ChunkStore,
        new_text: Callable[[], TokenText],
        flush_s: float = 0.15,
        clock: Callable[[], float] = time.monotonic,
        render: Callable[[object], dict] | None = None,
        wake: Callable[[list[tuple[str, str, list[Chunk]]]], None] = lambda wakes: None,
    ) -> None:
        """new_text: a TokenText for each job's tokens (Engine.new_text); render: an engine
        TokenLogprob -> its entry (stratus_worker.choices.entry); wake: sends [(wake queue, job id,
        its chunks)] as a write of those chunks begins (stratus.wake.send_many)"""
        self.store, self.new_text, self.flush_s, self.clock, self.render = store, new_text, flush_s, clock, render
        self.wake = wake
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()

    def open(
        self,
        job_id: str,
        run: str,
        attempt: int,
        stop: tuple[str, ...],
        expires_at: int,
        streamed: bool,
        logprobs: bool = False,
        prompt_tokens: int = 0,
        wake: str | None = None,
    ) -> Callable[[int, object], None]:
        """Start collecting a job's tokens (its run: Job.run; the prompt's length, for the usage
        each chunk carries; the message's wake queue) -> the engine's on_token callback for it."""
        s = _Stream(
            stream_key(job_id, run),
            TextDeltas(self.new_text(), stop),
            expires_at,
            first_seq(attempt),
            streamed,
            prompt_tokens,
            entries=[] if logprobs and self.render is not None else None,
            job_id=job_id,
            wake=wake,
        )
        with self._lock:
            self._streams[job_id] = s

        def on_token(token_id: int, logprob=None) -> None:
            s.deltas.push(token_id)
            if s.entries is not None and logprob is not None:
                s.entries.append(self.render(logprob))
            if s.streamed and not s.wrote:
                self._wake.set()  # the first delta goes out at once

        return on_token

    def mark_streamed(self, job_ids) -> None:
        """Streaming requests joined these jobs: stream them from now on (from their first token)."""
        with self._lock:
            for j in job_ids:
                if j in self._streams and not self._streams[j].streamed:
                    self._streams[j].streamed = True
                    self._wake.set()

    def close(self, job_id: str, result=None) -> None:
        """The job's generation is over. With `result` (a GenerationResult whose job item was
        written): the final chunk, whose text completes the job's text."""
        with self._lock:
            s = self._streams.pop(job_id, None)
        if s is None or not s.streamed or result is None:
            return
        sent = s.deltas.sent
        rest = result.text[len(sent) :] if result.text.startswith(sent) else ""
        final = {"finish_reason": result.finish_reason, "usage": usage([result])}
        entries = None
        if s.entries is not None:  # the result's own entries (cut at a stop string), past those sent
            entries = [self.render(t) for t in result.choices[0].logprobs or []][s.entries_sent :]
        self.store.put(
            [*s.unsent, (Chunk(s.key, s.seq, len(sent), rest, final, entries, s.entries_sent), s.expires_at)]
        )  # (chunks a failed write left go first, in order)

    def flush(self) -> int:
        """Write one chunk for each streamed job that is due and has new text -> chunks written."""
        now = self.clock()
        with self._lock:
            due = [
                s for s in self._streams.values() if s.streamed and (not s.wrote or now - s.last_flush >= self.flush_s)
            ]
        for s in due:
            offset = len(s.deltas.sent)
            delta = s.deltas.take()
            if delta:
                lp_offset, entries = s.take_entries()
                chunk = Chunk(s.key, s.seq, offset, delta, None, entries, lp_offset, s.prompt_tokens, s.deltas.tokens)
                s.unsent.append((chunk, s.expires_at))
                s.seq, s.wrote, s.last_flush = s.seq + 1, True, now
        with self._lock:
            waiting = [s for s in self._streams.values() if s.unsent]  # (a failed round's too)
        return self._write(waiting)

    def _write(self, streams: list[_Stream]) -> int:
        """Write the streams' unsent chunks in one call -> chunks written. If it fails, each stream's
        alone, so one stream's trouble never holds back the others' text; what fails stays unsent,
        tried next round (the first error is raised after trying every stream)."""
        chunks = [c for s in streams for c in s.unsent]
        if not chunks:
            return 0
        # the waiting readers first: the text is theirs as made, whether or not this write lands (a
        # chunk tried again is handed again, and skipped; a takeover's text that disagrees is Diverged)
        self.wake([(s.wake, s.job_id, [c for c, _ in s.unsent]) for s in streams if s.wake])
        try:
            self.store.put(chunks)
        except Exception as exc:
            if len(streams) > 1:
                return self._write_each(streams)
            _give_up_if_refused(streams[0], exc)
            raise
        for s in streams:
            s.unsent = []
        return len(chunks)

    def _write_each(self, streams: list[_Stream]) -> int:
        written, error = 0, None
        for s in streams:
            try:
                self.store.put(s.unsent)
            except Exception as exc:
                _give_up_if_refused(s, exc)
                error = error or exc
                continue
            written, s.unsent = written + len(s.unsent), []
        if error is not None:
            raise error
        return written

    def run(self, halt: threading.Event, on_error: Callable[[BaseException], None]) -> None:
        """The flusher thread: wake on a first token or every flush_s / 3, flush what is due."""
        while not halt.is_set():
            self._wake.wait(self.flush_s / 3)
            self._wake.clear()
            try:
                self.flush()
            except Exception as exc:
                on_error(exc)


def _give_up_if_refused(s: _Stream, exc: BaseException) -> None:
    """Storage refused a stream's chunk outright (past the item size, say), so trying again cannot
    help: the stream stops here, and its readers take the text from the job's result."""
    if not transient(exc):
        s.streamed, s.unsent = False, []
