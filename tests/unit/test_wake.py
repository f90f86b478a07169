"""stratus.wake on moto: an API instance's wake queue, its reader, the worker's send, the sweep."""

from __future__ import annotations

import threading
import time

import boto3
import pytest
from moto import mock_aws

from stratus import wake
from stratus.chunks import Chunk
from stratus.contracts import InferenceRequest, Job, Status
from stratus.params import SamplingParams
from stratus.wake import MAX_AGE_S, Waker, made_at


def finished(job_id: str, text: str = "Paris.", status: Status = Status.DONE) -> Job:
    """A job as a worker's finishing write returns it."""
    req = InferenceRequest("chat", "m", SamplingParams(), ({"role": "user", "content": "The capital of France?"},))
    return Job(
        job_id,
        "acme",
        status,
        req,
        True,
        created_at=1765000000.123456,
        expires_at=1765003600,
        updated_at=1765000001.654321,
        result={"text": text, "finish_reason": "stop"},
        usage={"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11},
        timings={"total_s": 0.25, "taken_s": 0.01},
        worker="w0",
    )


@pytest.fixture
def sqs(monkeypatch):
    for k, v in {"AWS_DEFAULT_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "t", "AWS_SECRET_ACCESS_KEY": "t"}.items():
        monkeypatch.setenv(k, v)
    with mock_aws():
        yield boto3.client("sqs")


@pytest.fixture
def waker(sqs):
    w = Waker(lambda: sqs, "stack-wake", wait_s=1)
    yield w
    w.close()


def test_a_wake_sent_after_the_read_ends_the_wait_at_once(sqs, waker):
    url = waker.url()
    assert url is not None and url == waker.url()  # one queue per instance
    read_at = time.monotonic()
    threading.Timer(0.2, wake.send_many, args=(sqs, [(url, "j1", [])])).start()
    t = time.monotonic()
    assert waker.wait("j1", read_at, timeout=30)
    assert time.monotonic() - t < 20  # (woken, not timed out)
    assert not waker.wait("j2", read_at, timeout=0.1)  # another job's wake is not this one's


def test_a_wake_that_came_before_the_read_is_not_waited_for_again(sqs, waker):
    wake.send_many(sqs, [(waker.url(), "j1", [])])
    assert waker.wait("j1", time.monotonic() - 60, timeout=30)  # came after that read: returns at once
    read_at = time.monotonic()  # a read after the wake saw all it says
    assert not waker.wait("j1", read_at, timeout=0.2)


def test_many_wakes_go_in_batches_per_queue(sqs, waker, monkeypatch):
    url = waker.url()
    other = Waker(lambda: sqs, "stack-wake", wait_s=1)
    calls = []
    real = sqs.send_message_batch
    monkeypatch.setattr(sqs, "send_message_batch", lambda **kw: calls.append(kw) or real(**kw))
    read_at = time.monotonic()
    wake.send_many(
        sqs, [(url, f"j{i}", []) for i in range(12)] + [(other.url(), "k", []), (url, "j0", []), (None, "x", [])]
    )
    assert sorted(len(c["Entries"]) for c in calls) == [1, 2, 10]  # 12 distinct jobs on one queue, 1 on the other
    assert all(waker.wait(f"j{i}", read_at, timeout=30) for i in range(12))
    assert other.wait("k", read_at, timeout=30)
    other.close()


def test_a_wake_for_an_unknown_queue_or_none_is_dropped_quietly(sqs):
    wake.send(sqs, None, finished("j1"))
    wake.send(sqs, "https://sqs.us-east-1.amazonaws.com/123456789012/gone", finished("j1"))  # logged, not raised
    wake.send_many(sqs, [("https://sqs.us-east-1.amazonaws.com/123456789012/gone", "j1", [])])


def test_a_finished_jobs_wake_carries_it_once_without_its_prompt(sqs, waker):
    url, read_at = waker.url(), time.monotonic()
    sent = finished("c1")
    wake.send(sqs, url, sent)
    assert waker.wait("c1", read_at, timeout=30)
    got = waker.finished("c1")
    assert got is not None and got.status == Status.DONE and got.tenant == "acme" and got.worker == "w0"
    assert (got.result, got.usage, got.timings) == (sent.result, sent.usage, sent.timings)
    assert (got.created_at, got.updated_at, got.expires_at, got.run) == (
        sent.created_at, sent.updated_at, sent.expires_at, sent.run
    )  # fmt: skip
    assert got.request.messages == () and got.request.model == "m"  # (no prompt: as a poll reads the job)
    assert waker.finished("c1") is None  # taken


def test_a_job_too_big_to_carry_or_not_finished_wakes_to_be_read(sqs, waker, monkeypatch):
    monkeypatch.setattr(wake, "MAX_CARRIED_BYTES", 2000)
    url, read_at = waker.url(), time.monotonic()
    wake.send(sqs, url, finished("c2", text="x" * 3000))
    wake.send(sqs, url, finished("c3", status=Status.RUNNING))
    sqs.send_message(QueueUrl=url, MessageBody='{"job_id": "c4", "job": {"pk": "c4"}}')  # not a job item
    for job_id in ("c2", "c3", "c4"):
        assert waker.wait(job_id, read_at, timeout=30)  # woken all the same
        assert waker.finished(job_id) is None  # ... to read the job


def test_chunk_wakes_carry_their_chunks_in_batches_sqs_takes(sqs, waker, monkeypatch):
    url, read_at = waker.url(), time.monotonic()
    calls = []
    real = sqs.send_message_batch
    monkeypatch.setattr(sqs, "send_message_batch", lambda **kw: calls.append(kw) or real(**kw))
    big = "x" * 90_000  # three such wakes pass SQS's 256 KiB a batch
    wakes = [
        (url, f"c{i}", [Chunk(f"c{i}.r", 1_000_000, 0, big), Chunk(f"c{i}.r", 1_000_001, 90_000, "!")])
        for i in range(3)
    ]
    wake.send_many(sqs, [*wakes, (url, "c9", [Chunk("other.r", 1_000_000, 0, "not c9's")])])
    assert [len(c["Entries"]) for c in calls] == [2, 2]  # (by bytes, not only by 10s)
    assert all(sum(len(e["MessageBody"]) for e in c["Entries"]) <= 256 * 1024 for c in calls)
    for i in range(3):
        assert waker.wait(f"c{i}", read_at, timeout=30)
        got = waker.chunks(f"c{i}")
        assert [(c.seq, c.offset, len(c.text)) for c in got] == [(1_000_000, 0, 90_000), (1_000_001, 90_000, 1)]
        assert waker.chunks(f"c{i}") == []  # taken
    assert waker.wait("c9", read_at, timeout=30) and waker.chunks("c9") == []  # another job's chunk is dropped


def test_a_swept_queue_is_made_again_on_the_next_wait(sqs, waker):
    first = waker.url()
    sqs.delete_queue(QueueUrl=first)
    deadline = time.monotonic() + 10
    while waker.url() in (first, None) and time.monotonic() < deadline:  # (the reader notices within wait_s)
        time.sleep(0.1)
    second = waker.url()
    assert second not in (first, None)
    read_at = time.monotonic()
    wake.send_many(sqs, [(second, "j1", [])])
    assert waker.wait("j1", read_at, timeout=30)


def test_close_deletes_the_queue_and_no_other_is_made(sqs, waker):
    url = waker.url()
    waker.close()
    assert url not in sqs.list_queues().get("QueueUrls", [])
    assert waker.url() is None


def test_the_sweep_deletes_only_this_prefixs_queues_older_than_max_age(sqs):
    now = time.time()
    old = sqs.create_queue(QueueName=f"stack-wake-{int(now - MAX_AGE_S - 60):08x}-00000001")["QueueUrl"]
    young = sqs.create_queue(QueueName=f"stack-wake-{int(now - 60):08x}-00000002")["QueueUrl"]
    other = sqs.create_queue(QueueName=f"other-wake-{int(now - MAX_AGE_S - 60):08x}-00000003")["QueueUrl"]
    unrelated = sqs.create_queue(QueueName="stack-wake-replies")["QueueUrl"]
    w = Waker(lambda: sqs, "stack-wake")
    assert w.sweep(own=young) == 1
    left = set(sqs.list_queues().get("QueueUrls", []))
    assert old not in left and {young, other, unrelated} <= left


def test_queue_names_carry_when_they_were_made_and_fit_sqs():
    assert made_at("p-wake-5f000000-ab12cd34", "p-wake") == 0x5F000000
    assert made_at("p-wake-replies", "p-wake") is None and made_at("q-wake-5f000000-x", "p-wake") is None
    long = Waker(lambda: None, "x" * 200)
    assert len(long.prefix) + 18 == 80
