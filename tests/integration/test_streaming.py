"""`stream: true` in-process: the api's streaming path over moto, a worker thread writing chunks,
and the reader putting them back together (stratus.streaming, stratus.chunks)."""

from __future__ import annotations

import json
import threading
import time

import pytest

from stratus import responses, streaming
from stratus.chunks import Chunk, ChunkStore, first_seq
from stratus.contracts import Status
from stratus.deps import deps_from_env
from stratus.errors import InvalidRequest
from stratus.jobstore import JobStore
from stratus.keys import authenticate
from stratus.shapes import completion_logprobs
from stratus.streaming import open_stream
from stratus.wire import parse_request
from stratus_local.template import LambdaContext

MODEL = "smollm2-135m-instruct-int4"


def chat(text: str, **kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 12, "temperature": 0, **kw}


def events(raw: list[bytes]) -> list:
    """SSE bytes -> the `data:` payloads (dicts, or "[DONE]"); comments are skipped."""
    out = []
    for block in b"".join(raw).split(b"\n\n"):
        if block.startswith(b"data: "):
            data = block[6:].decode()
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def text_of(evs: list, route: str = "chat") -> str:
    key = (lambda c: c["delta"].get("content", "")) if route == "chat" else (lambda c: c["text"])
    return "".join(key(c) for e in evs if isinstance(e, dict) and "choices" in e for c in e["choices"])


@pytest.fixture
def deps(stack):
    d = deps_from_env()
    yield d
    if d.waker is not None:
        d.waker.close()  # (its reader stops)


@pytest.fixture
def tenant(stack, key, deps):
    return authenticate(deps.table, f"Bearer {key}", {})


def stream(route, body, tenant, deps, **kw) -> list:
    s = open_stream(route, body, tenant, deps, **kw)
    assert s is not None
    return events(list(s.events()))


def test_a_streamed_chat_is_the_whole_response_in_chunks(stack, key, deps, tenant, make_worker):
    make_worker()
    s = open_stream("chat", chat("stream me", stream=True, stream_options={"include_usage": True}), tenant, deps)
    evs = events(list(s.events()))
    # (the worker wrote the text to this run's stream, which the reader read: not the job item at the end)
    written = ChunkStore(deps.stream_table).after(s.stream, 0)
    assert written and written[-1].final is not None and "".join(c.text for c in written) == text_of(evs)
    chunks, done = evs[:-1], evs[-1]
    assert done == "[DONE]"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert {c["id"] for c in chunks} == {chunks[0]["id"]} and {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert all(c["usage"] is None for c in chunks[:-1])  # include_usage: null until the last chunk
    finish, usage = chunks[-2], chunks[-1]
    assert finish["choices"][0]["delta"] == {} and finish["choices"][0]["finish_reason"] in ("stop", "length")
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] >= 1
    # the same request, whole (a cache hit now): the same text
    status, body, headers = stack.call("api_chat_completion.json", key=key, body=chat("stream me"))
    assert status == 200 and headers["x-stratus-cache"] == "hit"
    assert text_of(evs) == body["choices"][0]["message"]["content"] != ""
    assert usage["usage"] == body["usage"]


def test_a_stream_reads_its_chunks_when_its_worker_wakes_it(stack, key, deps, tenant, make_worker, monkeypatch):
    # Given reads so rare that only wakes can bring the chunks within the test's time (stratus.wake)
    monkeypatch.setattr(streaming, "WOKEN_PAUSE_S", 60.0)
    monkeypatch.setattr(streaming, "JOB_READ_EVERY_S", 60.0)
    monkeypatch.setattr("stratus_worker.worker.send_wake", lambda *a, **k: None)  # (the end's wake: not this test's)
    make_worker(stream_flush_s=0.0)
    t = time.monotonic()
    s = open_stream("chat", chat("wake each chunk", stream=True, max_tokens=12), tenant, deps)
    assert s.woken
    for raw in s.events():  # up to the first text
        if text_of(events([raw])):
            break
    assert time.monotonic() - t < 30  # (without a chunk's wake: the first read after the start is at 60 s)


def test_a_woken_stream_sends_the_text_its_wakes_carry_reading_nothing(
    stack, key, deps, tenant, make_worker, monkeypatch, caplog
):
    # Given reads so rare that the stream could only end within the test's time on its wakes
    monkeypatch.setattr(streaming, "WOKEN_PAUSE_S", 60.0)
    monkeypatch.setattr(streaming, "JOB_READ_EVERY_S", 60.0)
    reads = []
    real_after = ChunkStore.after
    monkeypatch.setattr(ChunkStore, "after", lambda self, *a: reads.append(a) or real_after(self, *a))
    make_worker(stream_flush_s=0.0)
    t = time.monotonic()
    s = open_stream("chat", chat("carry my chunks", stream=True, max_tokens=24), tenant, deps)
    evs = events(list(s.events()))
    assert time.monotonic() - t < 30
    assert reads == []  # every chunk came in a wake, and the end with the finished job
    job = JobStore(stack.table).get(s.job.job_id)
    assert job.status == Status.DONE and text_of(evs) == job.result["text"] != ""
    pieces = [e for e in evs[:-1] if e["choices"] and e["choices"][0]["delta"].get("content")]
    assert len(pieces) >= 2  # (the text came as it was made, not in one piece at the end)
    # and where its time went, logged at its end (stratus.timeline.stream_phases)
    [line] = [r for r in caplog.records if r.getMessage() == "stream timeline"]
    ms = line.ms
    assert list(ms) == ["submit", "queue", "claim", "prefill", "first_text", "ttft", "rest", "total"]
    assert ms["prefill"] > 0 and abs(sum(ms[k] for k in list(ms)[:5]) - ms["ttft"]) < 1.0  # (each rounded)
    assert abs(ms["ttft"] + ms["rest"] - ms["total"]) < 1.0


def test_a_responses_api_stream_logs_its_timeline_too(stack, deps, tenant, make_worker, caplog):
    make_worker()
    body = {"model": MODEL, "input": "time me", "stream": True, "max_output_tokens": 8, "temperature": 0}
    created = responses.create(body, tenant, deps)
    raw = b"".join(responses.open_response_stream(created, tenant, deps).events())
    assert b"response.output_text.delta" in raw and b"response.incomplete" in raw  # (8 tokens: cut short)
    [line] = [r for r in caplog.records if r.getMessage() == "stream timeline"]
    assert line.job_id == created.sub.job_id and {"submit", "ttft", "total"} <= set(line.ms)


def test_continuous_usage_stats_put_the_usage_so_far_on_every_chunk(stack, key, deps, tenant, make_worker):
    make_worker()
    options = {"include_usage": True, "continuous_usage_stats": True}
    evs = stream("chat", chat("count me", stream=True, stream_options=options, max_tokens=16), tenant, deps)
    chunks = evs[:-1]
    text_chunks = [c for c in chunks[1:] if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert text_chunks and all(c["usage"] is not None for c in chunks[1:])
    counts = [c["usage"]["completion_tokens"] for c in chunks[1:]]
    assert counts == sorted(counts) and counts[0] >= 1  # the usage so far: it only grows
    final = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and counts[-1] == final["completion_tokens"]
    assert {c["usage"]["prompt_tokens"] for c in chunks[1:]} == {final["prompt_tokens"]}
    assert all(
        c["usage"]["total_tokens"] == c["usage"]["prompt_tokens"] + c["usage"]["completion_tokens"] for c in chunks[1:]
    )
    # without include_usage it means nothing (vLLM's reading): no usage field at all
    plain = stream("chat", chat("count me", stream=True, stream_options={"continuous_usage_stats": True}), tenant, deps)
    assert all("usage" not in c for c in plain[:-1])


def test_a_streamed_completion_and_a_streamed_cache_hit(stack, key, deps, tenant, make_worker):
    make_worker()
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 10, "temperature": 0, "stream": True}
    first = stream("completion", body, tenant, deps)
    assert {e["object"] for e in first[:-1]} == {"text_completion"} and first[-1] == "[DONE]"
    started = time.monotonic()
    again = stream("completion", body, tenant, deps)  # cached: at once, from the job item
    assert time.monotonic() - started < 1.0
    assert text_of(first, "completion") == text_of(again, "completion") != ""
    assert first[-2]["choices"][0]["finish_reason"] == again[-2]["choices"][0]["finish_reason"]


def test_a_stop_string_never_reaches_the_client(stack, key, deps, tenant, make_worker):
    make_worker()
    whole = stream("chat", chat("tell me", stream=True), tenant, deps)
    text = text_of(whole)
    assert len(text) >= 4
    stop = text[2:4]  # inside the text: the stream must end before it
    cut = stream("chat", chat("tell me", stream=True, stop=[stop]), tenant, deps)
    assert text_of(cut) == text[: text.index(stop)]
    assert cut[-2]["choices"][0]["finish_reason"] == "stop"


def test_identical_streams_share_one_job_and_the_same_chunks(stack, key, deps, tenant, make_worker):
    body = chat("together", stream=True)
    a, b = open_stream("chat", body, tenant, deps), open_stream("chat", body, tenant, deps)
    assert a.job.job_id == b.job.job_id
    make_worker()
    assert text_of(events(list(a.events()))) == text_of(events(list(b.events()))) != ""


def test_a_stream_joining_a_job_created_without_streaming_marks_it(stack, key, deps, tenant):
    status, reply, _ = stack.call("api_create_job.json", key=key, body=chat("quiet"))
    assert status == 202
    s = open_stream("chat", chat("quiet", stream=True), tenant, deps)
    assert s.job.job_id == reply["id"]
    assert JobStore(stack.table).states([reply["id"]])[reply["id"]] == (Status.QUEUED, True)


def write(deps, stream: str, chunks: list[tuple], final: dict | None = None) -> None:
    """(attempt, offset, text[, log-probability entries, their offset]) chunk items, as workers write
    them to a stream (Stream.stream: the job's run)."""
    store, seqs = ChunkStore(deps.stream_table), {}
    for attempt, offset, text, *logprobs in chunks:
        seq = seqs.get(attempt, first_seq(attempt))
        seqs[attempt] = seq + 1
        store.put([(Chunk(stream, seq, offset, text, None, *logprobs), int(time.time()) + 600)])


def test_a_takeover_that_regenerates_shows_the_text_once(stack, deps, tenant):
    # Given a non-cacheable streaming job whose first worker died after "The capital " and a second
    # worker that regenerated the same tokens from the start, then finished
    s = open_stream("chat", chat("x", stream=True, temperature=1.0), tenant, deps)
    job_id = s.job.job_id
    write(deps, s.stream, [(1, 0, "The "), (1, 4, "capital "), (2, 0, "The capital of"), (2, 14, " France")])
    store = JobStore(stack.table)
    store.transition(job_id, [Status.QUEUED], Status.RUNNING, worker="w2")
    store.complete(
        job_id,
        "w2",
        {"text": "The capital of France.", "finish_reason": "stop"},
        usage={"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9},
    )
    # Then the client gets each character once, and the result's tail from the job item
    evs = events(list(s.events()))
    assert text_of(evs) == "The capital of France."
    assert evs[-2]["choices"][0]["finish_reason"] == "stop" and evs[-1] == "[DONE]"


def test_a_takeover_that_diverges_ends_with_an_error_not_garbled_text(stack, deps, tenant):
    s = open_stream("chat", chat("y", stream=True, temperature=1.0), tenant, deps)
    write(deps, s.stream, [(1, 0, "Hello there"), (2, 0, "Goodbye")])
    evs = events(list(s.events()))
    assert text_of(evs) == "Hello there"
    assert evs[-2]["error"]["code"] == "stream_diverged" and evs[-1] == "[DONE]"


def test_a_failed_job_is_an_in_band_error(stack, deps, tenant):
    s = open_stream("chat", chat("z", stream=True, temperature=1.0), tenant, deps)
    JobStore(stack.table).transition(
        s.job.job_id,
        [Status.QUEUED],
        Status.FAILED,
        error={"message": "the worker ran out of memory", "type": "server_error", "code": "worker_failed"},
    )
    evs = events(list(s.events()))
    assert evs[-2]["error"] == {
        "message": "the worker ran out of memory",
        "type": "server_error",
        "param": None,
        "code": "worker_failed",
    }


def test_a_client_that_leaves_cancels_a_job_nobody_else_waits_on(stack, deps, tenant):
    s = open_stream("chat", chat("bye", stream=True, temperature=1.0), tenant, deps)  # not cacheable
    next(iter(s.events()))
    s.close()
    assert JobStore(stack.table).get(s.job.job_id).status == Status.CANCELLED
    cached = open_stream("chat", chat("keep", stream=True), tenant, deps)  # greedy: cacheable
    cached.close()
    assert JobStore(stack.table).get(cached.job.job_id).status == Status.QUEUED


@pytest.mark.parametrize(
    "body, param",
    [
        ({"stream": "yes"}, "stream"),
        ({"stream": True, "stream_options": {"include_usage": "no"}}, "stream_options"),
        ({"stream": True, "stream_options": {"include_usage": True, "unknown": 1}}, "stream_options"),
        ({"stream": True, "stream_options": {"continuous_usage_stats": 1}}, "stream_options"),
        ({"stream": True, "ignore_eos": "yes"}, "ignore_eos"),
        ({"stream": True, "min_tokens": 13}, "min_tokens"),
    ],
)
def test_bad_stream_fields_are_refused_before_any_byte(deps, tenant, body, param):
    with pytest.raises(InvalidRequest) as err:
        open_stream("chat", chat("q", **body), tenant, deps)
    assert err.value.param == param


def test_stream_is_refused_where_nothing_can_stream():
    with pytest.raises(InvalidRequest, match="batch lines, jobs and queue messages are answered whole"):
        parse_request("chat", chat("q", stream=True), max_messages=8, max_tokens_limit=64)


def test_the_event_handler_answers_a_stream_whole(stack, key, make_worker):
    # `sam local invoke` / `stratus invoke` of the api function: the same events, buffered
    make_worker()
    out = stack.handler(stack.event("api_chat_stream.json", key=key), LambdaContext())  # events/, as sam local invoke
    assert out["statusCode"] == 200 and out["headers"]["Content-Type"] == "text/event-stream"
    evs = events([out["body"].encode()])
    assert evs[0]["choices"][0]["delta"]["role"] == "assistant" and evs[-1] == "[DONE]" and text_of(evs)


def logprobs_of(evs: list, route: str = "chat") -> list:
    out = []
    for e in evs:
        for c in e.get("choices", []) if isinstance(e, dict) else []:
            lp = c.get("logprobs")
            if lp:
                out += (
                    lp["content"]
                    if route == "chat"
                    else [
                        {"token": t, "logprob": v, "offset": o}
                        for t, v, o in zip(lp["tokens"], lp["token_logprobs"], lp["text_offset"])
                    ]
                )
    return out


@pytest.mark.parametrize("stop", [None, "stop-inside"])
def test_streamed_logprobs_equal_the_whole_responses(stack, key, deps, tenant, make_worker, stop):
    # Given a worker, a streamed chat asking for logprobs (and, once, cut at a stop string)
    make_worker(stream_flush_s=0.0)
    body = chat("stream my logprobs", max_tokens=16, logprobs=True, top_logprobs=2)
    if stop:
        whole_text = text_of(stream("chat", {**body, "stream": True}, tenant, deps))
        body["stop"] = [whole_text[3:5]]
    evs = stream("chat", {**body, "stream": True}, tenant, deps)
    streamed = logprobs_of(evs)
    # then the entries across chunks are the whole response's, each once, in order
    status, whole, _ = stack.call("api_chat_completion.json", key=key, body=body)
    assert status == 200 and streamed == whole["choices"][0]["logprobs"]["content"]
    assert text_of(evs) == whole["choices"][0]["message"]["content"]
    assert len(streamed) >= 1 and all(len(e["top_logprobs"]) == 2 for e in streamed)
    # and each chunk's entries spell no more than the text sent up to it (a token holding part of a
    # character, or a byte that is none, goes with the text before it: it adds no character yet)
    sent, spelled = "", b""
    for e in evs[:-1]:
        c = e["choices"][0] if e.get("choices") else None
        if c is None:
            continue
        sent += c["delta"].get("content", "")
        spelled += b"".join(bytes(x["bytes"]) for x in (c["logprobs"] or {"content": []})["content"])
        assert len(spelled.decode("utf-8", "replace").rstrip("\ufffd")) <= len(sent) or c["finish_reason"]


def test_a_streamed_completion_carries_logprobs_with_text_offsets(stack, key, deps, tenant, make_worker):
    make_worker(stream_flush_s=0.0)
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0, "logprobs": 1}
    evs = stream("completion", {**body, "stream": True}, tenant, deps)
    streamed = logprobs_of(evs, "completion")
    _status, whole, _ = stack.call("api_completion.json", key=key, body=body)
    lp = whole["choices"][0]["logprobs"]
    assert [e["token"] for e in streamed] == lp["tokens"] and [e["offset"] for e in streamed] == lp["text_offset"]
    assert [e["logprob"] for e in streamed] == lp["token_logprobs"]


def finish(store: JobStore, job_id: str, text: str, **result) -> None:
    """A worker's run of the job, start to end (no chunks written)."""
    store.transition(job_id, [Status.QUEUED], Status.RUNNING, worker="w1")
    store.complete(
        job_id,
        "w1",
        {"text": text, "finish_reason": "stop", **result},
        usage={"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    )


def test_a_job_made_again_under_its_id_never_replays_the_earlier_runs_chunks(stack, deps, tenant):
    # Given a cacheable streamed job whose run streamed "Old words" and then failed
    body = chat("made twice", stream=True)
    first = open_stream("chat", body, tenant, deps)
    write(deps, first.stream, [(1, 0, "Old "), (1, 4, "words")])
    store = JobStore(stack.table)
    store.transition(first.job.job_id, [Status.QUEUED], Status.FAILED, error={"message": "x", "code": "worker_failed"})
    # When the same request makes the job again under its id, and that run finishes "New words."
    again = open_stream("chat", body, tenant, deps)
    assert again.job.job_id == first.job.job_id and again.stream != first.stream
    finish(store, again.job.job_id, "New words.")
    # Then its stream is the new run's text alone: no earlier chunk, no divergence error
    evs = events(list(again.events()))
    assert text_of(evs) == "New words." and evs[-2]["choices"][0]["finish_reason"] == "stop"


def test_streamed_text_offsets_are_the_whole_responses_when_a_chunk_starts_inside_a_token(stack, deps, tenant):
    # Given a streamed completion with logprobs whose worker held back part of a token (" wo" of
    # " world" could begin the stop string " wol"): its first chunk sends "Hello " with the entries of
    # "He" and "llo" only, its second " world" from inside the third token
    entries = [
        {"token": t, "logprob": -0.5, "bytes": list(t.encode()), "top_logprobs": None}
        for t in ["He", "llo", " wor", "ld"]
    ]
    body = {
        "model": MODEL,
        "prompt": "Say hello",
        "max_tokens": 4,
        "temperature": 0,
        "logprobs": 0,
        "stop": [" wol"],
        "stream": True,
    }
    s = open_stream("completion", body, tenant, deps)
    write(deps, s.stream, [(1, 0, "Hello ", entries[:2], 0), (1, 6, "world", entries[2:], 2)])
    finish(JobStore(stack.table), s.job.job_id, "Hello world", logprobs=entries)
    # Then the offsets across chunks are the whole response's: each token's own start
    evs = events(list(s.events()))
    offsets = [o for e in evs[:-1] for c in e["choices"] if c["logprobs"] for o in c["logprobs"]["text_offset"]]
    assert text_of(evs, "completion") == "Hello world"
    assert offsets == completion_logprobs(entries)["text_offset"] == [0, 2, 5, 9]


def test_a_stream_whose_job_is_made_again_reads_the_new_runs_chunks_as_they_come(stack, deps, tenant):
    # Given a stream that has sent "The capital " of a cacheable job's run, which then failed
    body = chat("remade while read", stream=True)
    s = open_stream("chat", body, tenant, deps)
    write(deps, s.stream, [(1, 0, "The capital ")])
    got, events_ = [], s.events()
    while "The capital " not in text_of(events([b"".join(got)])):
        got.append(next(events_))
    store = JobStore(stack.table)
    store.transition(s.job.job_id, [Status.QUEUED], Status.FAILED, error={"message": "x", "code": "worker_failed"})
    # When an identical request makes it again and its run streams the same text further (still running)
    again = open_stream("chat", body, tenant, deps)
    store.transition(again.job.job_id, [Status.QUEUED], Status.RUNNING, worker="w2")
    write(deps, again.stream, [(1, 0, "The capital of France")])
    # Then the first stream goes on with the new run's text as it comes, not only at the job's end
    reader = threading.Thread(target=lambda: [got.append(e) for e in events_], daemon=True)
    reader.start()
    deadline = time.monotonic() + 5
    while "of France" not in text_of(events([b"".join(got)])):
        assert time.monotonic() < deadline, text_of(events([b"".join(got)]))
        time.sleep(0.05)
    store.complete(
        again.job.job_id,
        "w2",
        {"text": "The capital of France.", "finish_reason": "stop"},
        usage={"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9},
    )
    reader.join(timeout=10)
    assert text_of(events([b"".join(got)])) == "The capital of France."
