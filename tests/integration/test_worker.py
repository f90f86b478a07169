"""The worker against the jobs queue and table under moto, running the tiny model built by our pipeline.

Jobs enter through the api handler (events/*.json) exactly as in production; the worker runs in a
thread with short timeouts so redelivery paths take seconds, not minutes.
"""

from __future__ import annotations

import dataclasses
import json
import time

import boto3
import pytest
from botocore.exceptions import ClientError, ReadTimeoutError

from stratus import service, timeline
from stratus.contracts import QueueMessage, Status
from stratus.jobstore import JobStore
from stratus.wire import parse_request
from stratus_engine.engine import Engine
from stratus_local.template import ROOT, LambdaContext, load_handler, load_template
from stratus_worker.leases import Receipt

MODEL = "smollm2-135m-instruct-int4"


def chat(text: str, **kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 8, "temperature": 0, **kw}


def wait_until(predicate, timeout: float = 20.0, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("condition not met in time")


def job(stack, job_id: str):
    return JobStore(stack.table).get(job_id)


def queue_depth(stack, name: str = "JobsQueue") -> int:
    attrs = stack.sqs.get_queue_attributes(QueueUrl=stack.refs[name], AttributeNames=["All"])["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]) + int(attrs["ApproximateNumberOfMessagesNotVisible"])


def submit(stack, key, body: dict) -> str:
    status, reply, _ = stack.call("api_create_job.json", key=key, body=body)
    assert status == 202, reply
    return reply["id"]


def test_queued_jobs_are_generated_then_served_from_the_cache(stack, key, make_worker):
    ids = [submit(stack, key, chat(f"question {i}")) for i in range(5)]
    ids.append(submit(stack, key, {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 6, "temperature": 0}))
    make_worker()
    assert wait_until(lambda: all(job(stack, j).status == Status.DONE for j in ids))
    assert wait_until(lambda: queue_depth(stack) == 0)  # each message is deleted just after its result
    j = job(stack, ids[0])
    assert j.usage["completion_tokens"] >= 1 and j.timings["ttft_s"] > 0 and j.worker == "w0"
    status, body, headers = stack.call("api_chat_completion.json", key=key, body=chat("question 0"))
    assert status == 200 and headers["x-stratus-cache"] == "hit"
    assert body["choices"][0]["message"]["content"] == j.result["text"]


def long_wait(stack, monkeypatch) -> None:
    deps = stack.module.get_deps()
    monkeypatch.setattr(deps, "settings", dataclasses.replace(deps.settings, sync_wait_s=20.0))


def test_a_synchronous_request_waits_for_the_worker(stack, key, make_worker, monkeypatch):
    make_worker()
    long_wait(stack, monkeypatch)
    status, body, headers = stack.call("api_chat_completion.json", key=key, body=chat("wait for me"))
    assert status == 200 and headers["x-stratus-cache"] == "miss" and body["usage"]["completion_tokens"] >= 1
    # where its time went (stratus.timeline): every phase, in order, summing to the whole
    spans = timeline.read_server_timing(headers["server-timing"])
    assert list(spans) == ["submit", "queue", "claim", "engine", "result", "notice", "reply", "total"]
    assert spans["engine"] > 0 and spans["total"] >= spans["engine"]
    assert abs(sum(spans.values()) - 2 * spans["total"]) < 1.0  # ms (each rounded to 0.1)


def test_a_waiting_request_is_woken_by_its_worker_not_by_a_re_read(stack, key, make_worker, monkeypatch):
    # Given re-reads so rare that only the wake can answer within the wait (stratus.wake)
    monkeypatch.setattr(service, "POLL_MAX_S", 60.0)
    monkeypatch.setattr(service, "WOKEN_POLL_S", 60.0)
    make_worker()
    long_wait(stack, monkeypatch)
    reads = []
    real_get = service.get_job
    monkeypatch.setattr(service, "get_job", lambda *a, **k: reads.append(a) or real_get(*a, **k))
    t = time.monotonic()
    status, body, _ = stack.call("api_chat_completion.json", key=key, body=chat("wake me"))
    assert status == 200 and body["usage"]["completion_tokens"] >= 1
    assert time.monotonic() - t < 15  # (the re-read after the first would come at 20 s: the wait's end)
    assert reads == []  # its wake carried the finished job: never read back
    assert body["choices"][0]["message"]["content"] == job(stack, body["id"].removeprefix("chatcmpl-")).result["text"]


def test_a_lost_wake_costs_a_re_read_not_the_answer(stack, key, make_worker, monkeypatch):
    monkeypatch.setattr(service, "WOKEN_POLL_S", 0.3)
    monkeypatch.setattr("stratus_worker.worker.send_wake", lambda *a, **k: None)  # every wake is lost
    make_worker()
    long_wait(stack, monkeypatch)
    status, body, _ = stack.call("api_chat_completion.json", key=key, body=chat("wake me, or not"))
    assert status == 200 and body["usage"]["completion_tokens"] >= 1
    assert stack.module.get_deps().waker.url() is not None  # (it waited for a wake that never came)


def test_expired_and_cancelled_jobs_never_run(stack, key, make_worker):
    store = JobStore(stack.table)
    cancelled = submit(stack, key, chat("cancel me"))
    assert stack.call("api_cancel_job.json", key=key, job_id=cancelled)[0] == 200
    expired = submit(stack, key, chat("too late"))
    # Given a message whose deadline passed while it waited in the queue
    msgs = stack.sqs.receive_message(QueueUrl=stack.refs["JobsQueue"], MaxNumberOfMessages=10)["Messages"]
    for m in msgs:
        qm = QueueMessage.from_body(m["Body"])
        if qm.job_id == expired:
            stack.sqs.delete_message(QueueUrl=stack.refs["JobsQueue"], ReceiptHandle=m["ReceiptHandle"])
            late = dataclasses.replace(qm, deadline=time.time() - 1)
            stack.sqs.send_message(QueueUrl=stack.refs["JobsQueue"], MessageBody=late.to_body())
        else:
            stack.sqs.change_message_visibility(
                QueueUrl=stack.refs["JobsQueue"], ReceiptHandle=m["ReceiptHandle"], VisibilityTimeout=0
            )
    engine_calls = []
    w = make_worker()
    real_submit = w.engine.submit
    w.engine.submit = lambda r: engine_calls.append(r) or real_submit(r)
    wait_until(lambda: queue_depth(stack) == 0)
    assert store.get(expired).status == Status.EXPIRED and "past its deadline" in store.get(expired).error["message"]
    assert store.get(cancelled).status == Status.CANCELLED and store.get(cancelled).result is None
    assert engine_calls == []


def slow(engine: Engine, seconds: float = 0.02) -> Engine:
    """A model whose decode steps take `seconds` (so a test can act mid-generation)."""
    decode = engine._decode

    def slow_decode():
        time.sleep(seconds)
        decode()

    engine._decode = slow_decode
    return engine


def test_cancel_while_running_stops_at_the_next_step(stack, key, make_worker, tiny):
    engine = slow(Engine.from_dir(tiny.dirs["int4"], threads=1, max_batch=4, initial_capacity=16))
    job_id = submit(stack, key, chat("a long one", max_tokens=200, stop=None))
    make_worker(engine)
    wait_until(lambda: job(stack, job_id).status == Status.RUNNING)
    time.sleep(0.1)
    assert stack.call("api_cancel_job.json", key=key, job_id=job_id)[0] == 200
    wait_until(lambda: queue_depth(stack) == 0 and engine.num_running == 0)
    j = job(stack, job_id)
    assert j.status == Status.CANCELLED and j.result is None


def test_the_worker_checks_the_exact_prompt_length(stack, key, make_worker, monkeypatch):
    # Given a prompt that passes the API's byte bound but is over the tiny model's 256-token context
    long = " ".join(["hello world"] * 200)
    job_id = submit(stack, key, chat(long))
    make_worker()
    j = wait_until(lambda: (x := job(stack, job_id)).status.finished and x)
    assert j.status == Status.FAILED and j.error["code"] == "context_length_exceeded"
    assert "context length of 256" in j.error["message"]
    # and a caller waiting on the same request gets the 400 (a failed job is retried, and fails again)
    long_wait(stack, monkeypatch)
    status, body, _ = stack.call("api_chat_completion.json", key=key, body=chat(long))
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"


def test_a_duplicate_delivery_generates_once(stack, key, make_worker, tiny):
    job_id = submit(stack, key, chat("only once"))
    original = stack.sqs.receive_message(QueueUrl=stack.refs["JobsQueue"])["Messages"][0]
    stack.sqs.delete_message(QueueUrl=stack.refs["JobsQueue"], ReceiptHandle=original["ReceiptHandle"])
    for _ in range(2):  # the same message twice (SQS delivers at least once)
        stack.sqs.send_message(QueueUrl=stack.refs["JobsQueue"], MessageBody=original["Body"])
    generated = []
    engines = [
        slow(Engine.from_dir(tiny.dirs["int4"], threads=1, max_batch=4, initial_capacity=16), 0.01) for _ in range(2)
    ]
    for e in engines:
        real = e.submit
        e.submit = lambda r, real=real: generated.append(r.request_id) or real(r)
        make_worker(e)
    wait_until(lambda: queue_depth(stack) == 0, timeout=30)
    assert generated == [job_id] and job(stack, job_id).status == Status.DONE


def generating(engine: Engine) -> list[str]:
    """-> the job ids the engine is asked to generate, in order (a regeneration shows twice)."""
    asked, real = [], engine.submit
    engine.submit = lambda r: asked.append(r.request_id) or real(r)
    return asked


@pytest.mark.parametrize(
    "code, failures, generations",
    [
        ("ProvisionedThroughputExceededException", 2, 1),  # passing: tried again with the result in hand
        ("ValidationException", 1, 2),  # the same write cannot pass: back to the queue at once, generated again
    ],
)
def test_a_failed_result_write_is_tried_again_only_when_it_may_pass(
    stack, key, make_worker, tiny, code, failures, generations
):
    engine = Engine.from_dir(tiny.dirs["int4"], threads=1, max_batch=4, initial_capacity=16)
    asked = generating(engine)
    w = make_worker(engine)
    real_complete, calls = w.store.complete, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) <= failures:
            raise ClientError({"Error": {"Code": code, "Message": "no"}}, "UpdateItem")
        return real_complete(*args, **kwargs)

    w.store.complete = failing
    job_id = submit(stack, key, chat(f"write me ({code})"))
    j = wait_until(lambda: (x := job(stack, job_id)).status == Status.DONE and x)
    wait_until(lambda: queue_depth(stack) == 0)
    assert len(calls) == failures + 1 and asked == [job_id] * generations and j.attempts == generations


def test_a_result_write_that_landed_though_its_call_failed_counts_once(stack, key, make_worker, caplog):
    w = make_worker()
    real_complete, calls = w.store.complete, []

    def answer_lost(*args, **kwargs):
        calls.append(1)
        written = real_complete(*args, **kwargs)
        if len(calls) == 1:  # the write landed; its answer did not
            raise ReadTimeoutError(endpoint_url="http://dynamodb")
        return written

    w.store.complete = answer_lost
    job_id = submit(stack, key, chat("did it land?"))
    wait_until(lambda: job(stack, job_id).status == Status.DONE)
    wait_until(lambda: queue_depth(stack) == 0)
    said = [r.getMessage() for r in caplog.records if getattr(r, "job_id", None) == job_id]
    assert len(calls) == 2 and job(stack, job_id).attempts == 1
    assert said.count("generated") == 1 and "result not written: the job is no longer ours" not in said


def test_requests_a_client_may_send_never_stop_a_worker(stack, key, make_worker):
    # (a negative seed made numpy refuse the generator; a tiny temperature gave NaN probabilities
    # and the engine thread died, with every job it held)
    w = make_worker()
    ids = [
        submit(stack, key, chat("negative seed", seed=-1, temperature=0.9)),
        submit(stack, key, chat("tiny temperature", temperature=1e-320)),
        submit(stack, key, chat("tiny penalty", temperature=0.7, repetition_penalty=1e-300)),
    ]
    wait_until(lambda: all(job(stack, j).status == Status.DONE for j in ids), timeout=30)
    assert w.failure is None and not w.stopping.is_set()


def test_a_job_the_engine_refuses_to_start_goes_back_and_is_not_held(stack, key, make_worker, tiny):
    engine = Engine.from_dir(tiny.dirs["int4"], threads=1, max_batch=4, initial_capacity=16)
    real, calls = engine.submit, []

    def refuses_once(r):
        calls.append(r.request_id)
        if len(calls) == 1:
            raise ValueError("cannot start")
        return real(r)

    engine.submit = refuses_once
    w = make_worker(engine)
    job_id = submit(stack, key, chat("start me"))
    wait_until(lambda: job(stack, job_id).status == Status.DONE)  # the message came back at once
    assert calls == [job_id, job_id] and "ValueError: cannot start" in job(stack, job_id).last_error
    wait_until(lambda: not w.held)  # let go: the message, received again, is not taken for the one held


def test_a_worker_whose_engine_dies_gives_its_jobs_back_and_stops(stack, key, make_worker, tiny):
    # Given a worker generating a job, whose engine's next step raises
    engine = Engine.from_dir(tiny.dirs["int4"], threads=1, max_batch=4, initial_capacity=16)
    real_step, steps = engine.step, []

    def dies_on_the_third_step():
        steps.append(1)
        if len(steps) == 3:
            raise MemoryError("out of memory")
        return real_step()

    engine.step = dies_on_the_third_step
    w = make_worker(engine)
    job_id = submit(stack, key, chat("the engine dies under me", max_tokens=40))
    # Then the worker stops with the failure, and the job is QUEUED again with its message visible
    wait_until(lambda: isinstance(w.failure, MemoryError) and not w.held, timeout=30)
    assert job(stack, job_id).status == Status.QUEUED and wait_until(lambda: queue_depth(stack) == 1)
    assert "EngineFailed" in (job(stack, job_id).last_error or "")


def test_a_message_whose_request_is_not_its_jobs_is_dropped_not_generated(stack, key, make_worker):
    # Given a queued job, and a message naming it that carries another request (forged, or a bug)
    job_id = submit(stack, key, chat("what is 2+2?"))
    m = stack.sqs.receive_message(QueueUrl=stack.refs["JobsQueue"], AttributeNames=["All"])["Messages"][0]
    forged = QueueMessage.from_body(m["Body"])
    other = parse_request(
        "chat", {**chat("say something else"), "model": forged.request.model}, max_messages=8, max_tokens_limit=64
    )
    m["Body"] = dataclasses.replace(forged, request=other).to_body()
    w = make_worker(run=False)
    # When a worker receives it
    w.admit(m, Receipt(stack.refs["JobsQueue"], m["ReceiptHandle"]))
    # Then nothing is generated under the job's key: it stays QUEUED, the message is spent
    assert job(stack, job_id).status == Status.QUEUED and not w.held
    assert wait_until(lambda: queue_depth(stack) == 0)


def test_a_message_back_after_its_deadline_leaves_a_job_another_worker_runs(stack, key, make_worker):
    job_id = submit(stack, key, chat("long running"))
    assert JobStore(stack.table).transition(job_id, [Status.QUEUED], Status.RUNNING, worker="w-alive")
    w = make_worker(run=False)
    w.jobs.clock = lambda: time.time() + 1000  # its lease lapsed: the message is back, past its deadline
    m = stack.sqs.receive_message(QueueUrl=stack.refs["JobsQueue"], AttributeNames=["All"])["Messages"][0]
    w.admit(m, Receipt(stack.refs["JobsQueue"], m["ReceiptHandle"]))
    # Then the message is kept: should the worker running the job die, another takes it over
    assert job(stack, job_id).status == Status.RUNNING and queue_depth(stack) == 1


def test_a_job_made_again_after_a_cancel_is_run_from_its_own_message(stack, key, make_worker, tiny):
    engine = slow(Engine.from_dir(tiny.dirs["int4"], threads=1, max_batch=4, initial_capacity=16), 0.02)
    body = chat("cancel and send again", max_tokens=60, stop=None)  # greedy: the same id both times
    job_id = submit(stack, key, body)
    w = make_worker(engine)
    enqueued, deleted, real_admit, real_delete = {}, [], w.admit, w.leases.delete

    def admit(m, receipt):
        enqueued[receipt.handle] = json.loads(m["Body"])["enqueued_at"]
        return real_admit(m, receipt)

    w.admit = admit
    w.leases.delete = lambda receipt: deleted.append(enqueued.get(receipt.handle)) or real_delete(receipt)
    wait_until(lambda: job(stack, job_id).status == Status.RUNNING)
    assert stack.call("api_cancel_job.json", key=key, job_id=job_id)[0] == 200
    assert submit(stack, key, body) == job_id  # made again: same id, a new message
    done = wait_until(lambda: (x := job(stack, job_id)).status == Status.DONE and x, timeout=30)
    # Then the new job ran from the new message, soon: the old generation does not delete the new
    # message, which would leave the job waiting a lease for the old one, past its deadline
    wait_until(lambda: len(deleted) == 2)
    first, second = sorted(set(enqueued.values()))
    assert deleted == [first, second] and done.attempts >= 1


def test_a_cancel_read_as_the_writer_lets_go_does_not_stop_the_job_made_again(stack, key, make_worker, tiny):
    engine = slow(Engine.from_dir(tiny.dirs["int4"], threads=1, max_batch=4, initial_capacity=16), 0.05)
    body = chat("cancel then ask again", max_tokens=200, stop=None)  # greedy: the same id both times
    job_id = submit(stack, key, body)
    w = make_worker(engine)
    real_states, real_record = w.store.states, w.results.record

    def late_states(ids):  # a read of the cancel still in flight when the writer lets the job go
        got = real_states(ids)
        if job_id in ids and job_id in w.cancelled:
            wait_until(lambda: job_id not in w.held and job_id not in w.cancelled, timeout=5)
        return got

    def slow_record(*args, **kwargs):
        time.sleep(1.5)
        return real_record(*args, **kwargs)

    w.store.states, w.results.record = late_states, slow_record
    wait_until(lambda: job(stack, job_id).status == Status.RUNNING)
    assert stack.call("api_cancel_job.json", key=key, job_id=job_id)[0] == 200
    wait_until(lambda: queue_depth(stack) == 0 and not w.held)
    time.sleep(0.3)
    w.store.states, w.results.record = real_states, real_record
    assert job_id not in w.cancelled  # (the late read left nothing there)
    # When the client asks again: the job is made again under the same id, and runs to its end
    assert submit(stack, key, body) == job_id
    wait_until(lambda: job(stack, job_id).status == Status.DONE, timeout=30)


def test_sigterm_leaves_the_job_whose_result_is_being_written_to_the_writer(stack, key, make_worker):
    import threading

    w = make_worker(drain_s=0.2)
    store, real_complete, real_release = JobStore(stack.table), w.store.complete, w.release_all
    writing, released = threading.Event(), threading.Event()

    def slow_complete(*args, **kwargs):  # a write that outlasts the drain and the writer's join (10 s)
        writing.set()
        released.wait(30)
        return real_complete(*args, **kwargs)

    w.store.complete = slow_complete
    w.release_all = lambda: (real_release(), released.set())
    job_id = submit(stack, key, chat("drain me"))
    writing.wait(20)
    w.stop()
    # Then the job is not given back under the write (requeued, its write refused and its message
    # deleted anyway, it would stay QUEUED with no message for ever)
    done = wait_until(lambda: (x := store.get(job_id)).status == Status.DONE and x, timeout=20)
    assert done.attempts == 1
    wait_until(lambda: queue_depth(stack) == 0)  # (its message is deleted just after the write)


def test_sigterm_releases_unfinished_work_at_once(stack, key, make_worker, tiny):
    engine = slow(Engine.from_dir(tiny.dirs["int4"], threads=1, max_batch=4, initial_capacity=16), 0.05)
    job_id = submit(stack, key, chat("interrupted", max_tokens=200))
    w = make_worker(engine, drain_s=0.2)
    wait_until(lambda: job(stack, job_id).status == Status.RUNNING)
    w.stop()
    wait_until(lambda: job(stack, job_id).status == Status.QUEUED)
    # (short receives: moto's long poll wakes for new messages, not for one made visible again)
    got = wait_until(lambda: stack.sqs.receive_message(QueueUrl=stack.refs["JobsQueue"]).get("Messages"), timeout=1.5)
    assert [QueueMessage.from_body(m["Body"]).job_id for m in got] == [job_id]  # visible again, not in 3 s


def test_a_poison_job_reaches_the_dlq_and_fails_visibly(stack, key, make_worker):
    # Given a message for a real job that no worker can process (its request does not parse)
    job_id = submit(stack, key, chat("poison"))
    good = stack.sqs.receive_message(QueueUrl=stack.refs["JobsQueue"])["Messages"][0]  # take the good one away
    stack.sqs.delete_message(QueueUrl=stack.refs["JobsQueue"], ReceiptHandle=good["ReceiptHandle"])
    stack.sqs.send_message(
        QueueUrl=stack.refs["JobsQueue"],
        MessageBody=json.dumps({"job_id": job_id, "tenant": "acme", "request": {"route": "chat"}}),
    )
    make_worker()
    dead = wait_until(
        lambda: stack.sqs.receive_message(QueueUrl=stack.refs["JobsDeadLetterQueue"], AttributeNames=["All"]).get(
            "Messages"
        ),
        timeout=30,
    )
    handler, _ = load_handler(load_template(), "DlqFunction")
    event = json.loads((ROOT / "events/dlq_message.json").read_text())
    record = event["Records"][0]
    record.update(body=dead[0]["Body"], messageId=dead[0]["MessageId"], receiptHandle=dead[0]["ReceiptHandle"])
    assert handler(event, LambdaContext()) == {"batchItemFailures": []}
    _status, view, _ = stack.call("api_get_job.json", key=key, job_id=job_id)
    assert view["status"] == "FAILED" and view["error"]["code"] == "job_failed"
    assert "dead-letter queue" in view["error"]["message"]


def test_a_failing_receive_does_not_stop_the_worker(stack, key, make_worker):
    job_id = submit(stack, key, chat("after a hiccup"))
    sqs, failures = boto3.client("sqs"), []
    real = sqs.receive_message

    def flaky_receive(**kwargs):  # SQS unavailable for the first two calls
        if len(failures) < 2:
            failures.append(1)
            raise ClientError({"Error": {"Code": "ServiceUnavailable", "Message": "try again"}}, "ReceiveMessage")
        return real(**kwargs)

    sqs.receive_message = flaky_receive
    make_worker(sqs=sqs)
    assert wait_until(lambda: job(stack, job_id).status == Status.DONE) and len(failures) == 2


def test_a_result_that_does_not_fit_beside_its_request_goes_to_s3(stack):
    # Given a job whose stored request takes 200 KB (escaped non-ASCII text)
    from stratus.contracts import InferenceRequest, Job
    from stratus.params import SamplingParams

    store = JobStore(stack.table)
    req = InferenceRequest("completion", MODEL, SamplingParams(max_tokens=8), prompt="é" * 33_000)
    assert 190_000 < req.stored_bytes < 210_000
    now = time.time()
    store.create(Job("j" + "1" * 32, "acme", Status.QUEUED, req, False, created_at=now, expires_at=int(now + 600)))
    store.transition("j" + "1" * 32, [Status.QUEUED], Status.RUNNING, worker="w")
    # When a 200 KB result is written (under the 300 KB inline cap, but not beside the request)
    done = store.complete(
        "j" + "1" * 32,
        "w",
        {"text": "x" * 200_000, "finish_reason": "length"},
        s3=boto3.client("s3"),
        bucket=stack.refs["ResultsBucket"],
        request_bytes=req.stored_bytes,
    )
    # Then it went to S3 and the item kept a pointer
    assert done.result is None and done.result_s3.endswith("/results/j" + "1" * 32 + ".json")


def test_the_dlq_never_fails_a_job_a_worker_is_still_running(stack, key):
    # Given a job RUNNING on a worker whose heartbeat is fresh, and its message in the DLQ
    job_id = submit(stack, key, chat("still going"))
    store = JobStore(stack.table)
    store.transition(job_id, [Status.QUEUED], Status.RUNNING, worker="w-alive")
    handler, _ = load_handler(load_template(), "DlqFunction")
    event = json.loads((ROOT / "events/dlq_message.json").read_text())
    event["Records"][0]["body"] = json.dumps({"job_id": job_id})
    # Then the dead letter is kept for later (a partial failure) and the job goes on
    assert handler(event, LambdaContext()) == {
        "batchItemFailures": [{"itemIdentifier": event["Records"][0]["messageId"]}]
    }
    assert job(stack, job_id).status == Status.RUNNING
    # And once its heartbeat is stale (the worker died), the same dead letter fails it
    from stratus.deadletter import fail_dead_letter

    assert fail_dead_letter(
        json.dumps({"job_id": job_id}),
        store,
        sqs=stack.sqs,
        s3=boto3.client("s3"),
        heartbeat_s=30.0,
        now=time.time() + 120,
    )
    assert job(stack, job_id).status == Status.FAILED and "Traceback" not in job(stack, job_id).error["message"]


def test_a_lease_sqs_refuses_to_extend_is_reported_not_ignored(stack, key, make_worker, caplog):
    # ChangeMessageVisibilityBatch reports refused entries in its answer instead of raising
    from stratus_worker.worker import Held

    w = make_worker()
    bad = Receipt(stack.refs["JobsQueue"], "not-a-receipt")
    assert w.leases.extend([bad]) == [bad]
    msg = QueueMessage(
        "j" + "2" * 32,
        "acme",
        parse_request("chat", chat("held"), max_messages=8, max_tokens_limit=64),
        enqueued_at=time.time(),
        deadline=time.time() + 60,
    )
    with w._lock:
        w.held[msg.job_id] = Held(msg, bad, time.time())  # a message whose lease SQS refuses
    w.heartbeat()
    with w._lock:
        w.held.pop(msg.job_id)
    assert any(r.getMessage() == "could not extend a message's visibility" for r in caplog.records)


def test_messages_from_a_newer_api_are_left_for_a_newer_worker_and_optional_fields_are_ignored(stack, key, make_worker):
    job_id = submit(stack, key, chat("from the future"))
    [body] = stack.queued()
    newer = {**body, "version": 2, "priority": "interactive"}  # a version this worker does not know
    stack.sqs.send_message(QueueUrl=stack.refs["JobsQueue"], MessageBody=json.dumps(newer))
    w = make_worker()
    time.sleep(1.5)
    assert job(stack, job_id).status == Status.QUEUED and w.failure is None  # not served, not crashed
    assert queue_depth(stack) == 2  # the newer one hidden for a newer worker (not deleted), beside the one we read
    same = {**body, "priority": "interactive"}  # an optional field this version does not know
    assert QueueMessage.from_body(json.dumps(same)) == QueueMessage.from_body(json.dumps(body))


def test_throttled_batch_reads_back_off_and_finish(stack, key, monkeypatch):
    ids = [submit(stack, key, chat(f"state {i}")) for i in range(3)]
    store = JobStore(stack.table)
    client = stack.table.meta.client
    real, calls, pauses = client.batch_get_item, [], []

    def throttled(RequestItems):
        calls.append(RequestItems)
        got = real(RequestItems=RequestItems)
        if len(calls) == 1:  # the first round: every key comes back unprocessed
            return {"Responses": {}, "UnprocessedKeys": RequestItems}
        return got

    monkeypatch.setattr(client, "batch_get_item", throttled)
    monkeypatch.setattr("stratus.jobstore.time.sleep", pauses.append)
    assert set(store.states(ids)) == set(ids) and len(calls) == 2 and pauses == [0.05]


def test_a_finished_job_that_is_not_cacheable_forgets_its_prompt(stack, key, make_worker):
    sampled = submit(stack, key, {**chat("forget me"), "temperature": 0.8})  # no seed: not cacheable
    greedy = submit(stack, key, chat("keep me"))  # the cache needs the request it answers
    make_worker()
    wait_until(lambda: all(job(stack, j).status == Status.DONE for j in (sampled, greedy)))
    items = {j: stack.table.get_item(Key={"pk": j})["Item"] for j in (sampled, greedy)}
    assert "prompt" not in items[sampled] and "forget me" not in json.dumps(items[sampled], default=str)
    assert "keep me" in items[greedy]["prompt"]
    status, view, _ = stack.call("api_get_job.json", key=key, job_id=sampled)
    assert status == 200 and view["status"] == "DONE" and view["response"]["choices"][0]["message"]["content"]


def test_a_message_redelivered_while_held_is_deleted_with_its_newest_receipt(stack, make_worker):
    # Given a worker holding a message whose lease lapsed, so SQS delivered it again
    from stratus_worker.worker import Held

    w = make_worker(run=False)  # this test drives admit() itself
    msg = QueueMessage(
        "j" + "3" * 32,
        "acme",
        parse_request("chat", chat("held twice"), max_messages=8, max_tokens_limit=64),
        enqueued_at=time.time(),
        deadline=time.time() + 60,
    )
    stack.sqs.send_message(QueueUrl=stack.refs["JobsQueue"], MessageBody=msg.to_body())
    first = stack.sqs.receive_message(QueueUrl=stack.refs["JobsQueue"], VisibilityTimeout=1)["Messages"][0]
    again = wait_until(
        lambda: stack.sqs.receive_message(
            QueueUrl=stack.refs["JobsQueue"], VisibilityTimeout=30, AttributeNames=["All"]
        ).get("Messages"),
        timeout=10,
    )[0]
    url = stack.refs["JobsQueue"]
    with w._lock:
        w.held[msg.job_id] = Held(msg, Receipt(url, first["ReceiptHandle"]), time.time(), message_id=first["MessageId"])
    # When the worker sees the second delivery (the same message: its MessageId)
    w.admit(again, Receipt(url, again["ReceiptHandle"]))
    # Then the held generation owns the newest receipt, whose delete removes the message
    assert w.held[msg.job_id].receipt.handle == again["ReceiptHandle"] != first["ReceiptHandle"]
    w.leases.delete(w.held.pop(msg.job_id).receipt)
    assert queue_depth(stack) == 0


def test_several_prompts_echo_logprobs_and_n_come_back_as_openai_choices(stack, key, make_worker, monkeypatch):
    # Given a completions request with a text prompt and a token-id prompt, echo, logprobs and n=2,
    # and a chat request asking for top_logprobs
    make_worker()
    long_wait(stack, monkeypatch)
    ids = [1, 40, 90, 120]
    body = {
        "model": MODEL,
        "prompt": ["Once upon", ids],
        "max_tokens": 3,
        "temperature": 0,
        "echo": True,
        "logprobs": 2,
        "n": 2,
    }
    status, reply, _ = stack.call("api_completion.json", key=key, body=body)
    assert status == 200, reply
    # then there are prompts x n choices in order, each echoing its prompt with a logprob per token
    choices = reply["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    assert choices[0]["text"].startswith("Once upon") and choices[0]["text"] == choices[1]["text"]
    by_id = choices[2]["logprobs"]
    assert by_id["token_logprobs"][0] is None and by_id["top_logprobs"][0] is None
    assert len(by_id["tokens"]) == len(ids) + 3 and all(len(t) == 2 for t in by_id["top_logprobs"][1:])
    assert "".join(by_id["tokens"]) == choices[2]["text"]
    assert by_id["text_offset"][1] == len(by_id["tokens"][0])
    assert reply["usage"]["completion_tokens"] == 12
    # and max_tokens 0 with echo scores the prompt alone
    status, scored, _ = stack.call(
        "api_completion.json",
        key=key,
        body={"model": MODEL, "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 0},
    )
    assert status == 200 and scored["choices"][0]["logprobs"]["token_logprobs"][1:] == by_id["token_logprobs"][1:4]
    status, reply, _ = stack.call(
        "api_chat_completion.json", key=key, body=chat("hello", logprobs=True, top_logprobs=3)
    )
    content = reply["choices"][0]["logprobs"]["content"]
    assert status == 200 and len(content) >= 1
    assert {"token", "logprob", "bytes", "top_logprobs"} <= set(content[0]) and len(content[0]["top_logprobs"]) == 3
    assert (
        bytes(b for e in content for b in e["bytes"])
        .decode(errors="replace")
        .startswith(reply["choices"][0]["message"]["content"])
    )


def test_token_ids_outside_the_vocabulary_fail_the_job_with_a_400(stack, key, make_worker, monkeypatch):
    make_worker()
    long_wait(stack, monkeypatch)
    status, reply, _ = stack.call(
        "api_completion.json", key=key, body={"model": MODEL, "prompt": [1, 10**9], "max_tokens": 2}
    )
    assert status == 400 and "token id 1000000000 is not in this model's vocabulary" in reply["error"]["message"], reply


def test_a_worker_takes_interactive_work_first_and_batch_work_into_spare_room(stack, key, make_worker):
    from stratus import submission
    from stratus.deps import deps_from_env
    from stratus.keys import Tenant

    # Given a worker (driven by hand) and batch lines queued before an interactive request
    w = make_worker(max_batch=2, run=False)
    deps = deps_from_env()
    for i in range(4):
        sub = submission.submit(
            "chat", chat(f"line {i}"), Tenant("acme", 10**6, 10**9), deps, submission.batch_line(deps.settings)
        )
        submission.send(sub.message, deps)
    interactive = submit(stack, key, chat("me first"))
    # When it polls: the interactive queue first; the batch queue only when that had nothing
    w.poll()
    assert [h.message.job_id for h in w.held.values()] == [interactive]
    w.poll()
    tiers = [h.message.tier for h in w.held.values()]
    assert tiers == ["interactive", "batch", "batch", "batch"]  # 2 x max_batch held in all
    assert queue_depth(stack, "BatchJobsQueue") == 4  # one still waiting (the others are in flight)
    # and the engine orders its waiting rows by tier
    assert [g.req.priority for g in w.engine._waiting] == [0, 1, 1, 1]
    w.release_all()


def test_a_running_worker_serves_both_tiers(stack, key, make_worker):
    from stratus import submission
    from stratus.deps import deps_from_env
    from stratus.keys import Tenant

    deps = deps_from_env()
    lines = []
    for i in range(3):
        sub = submission.submit(
            "chat", chat(f"batch {i}"), Tenant("acme", 10**6, 10**9), deps, submission.batch_line(deps.settings)
        )
        submission.send(sub.message, deps)
        lines.append(sub.job_id)
        assert sub.message.deadline - sub.message.enqueued_at == deps.settings.batch_window_s
    ids = lines + [submit(stack, key, chat("interactive"))]
    make_worker()
    assert wait_until(lambda: all(job(stack, j).status == Status.DONE for j in ids), timeout=60)
    assert wait_until(lambda: queue_depth(stack) == queue_depth(stack, "BatchJobsQueue") == 0)


def test_a_cancel_read_for_one_generation_never_stops_the_next(stack, key, make_worker):
    # Given a worker holding a generation of a job that was then cancelled
    from stratus_worker.worker import Held

    w = make_worker(run=False)
    job_id = submit(stack, key, chat("held twice"))
    [message] = stack.queued()
    msg = QueueMessage.from_body(json.dumps(message))
    first, second = Held(msg, None, 0.0), Held(msg, None, 0.0)
    w.held[job_id] = first
    JobStore(stack.table).cancel(job_id)
    real = w.store.states

    def read_then_swapped(ids):
        got = real(ids)
        w.held[job_id] = second  # meanwhile that generation ended, and the job, made again, is held anew
        return got

    # When the cancel check's read (CANCELLED) lands after the swap
    w.store.states = read_then_swapped
    w.check_cancelled()
    # Then the new generation goes on; a cancel read while it is held does stop it
    assert job_id not in w.cancelled
    w.store.states = real
    w.check_cancelled()
    assert job_id in w.cancelled


def test_replies_that_cannot_be_posted_now_are_posted_when_the_message_comes_back(
    stack, key, make_worker, monkeypatch, caplog
):
    # Given a job watched by a reply queue that throttles the first reply
    from stratus_worker import worker as worker_module

    monkeypatch.setattr(worker_module, "REPLIES_AGAIN_S", 1)
    replies = stack.sqs.create_queue(QueueName="late-replies")["QueueUrl"]
    job_id = submit(stack, key, chat("reply to me later"))
    JobStore(stack.table).watch(job_id, {"queue_url": replies, "id": "r1"})
    from support.faults import aws_error, failing_first

    sqs, calls = boto3.client("sqs"), []
    sqs.send_message = failing_first(
        sqs.send_message,
        aws_error("ThrottlingException", 400, "SendMessage"),
        calls,
        when=lambda kw: kw["QueueUrl"] == replies,
    )
    make_worker(sqs=sqs)
    # Then the job is generated once, its message comes back a moment later and the reply is posted
    assert wait_until(lambda: job(stack, job_id).notified, timeout=20)
    got = stack.sqs.receive_message(QueueUrl=replies, MaxNumberOfMessages=10).get("Messages", [])
    assert [json.loads(m["Body"])["id"] for m in got] == ["r1"] and len(calls) == 2
    assert calls[1] - calls[0] >= 0.9  # (kept hidden a while, not given back at once to a throttled queue)
    said = [r.getMessage() for r in caplog.records]  # (not a failed finish, its generation given back)
    assert "replies not posted; the message comes back for them" in said
    assert not [m for m in said if m.startswith("could not finish a job")]
    assert job(stack, job_id).status == Status.DONE and job(stack, job_id).attempts == 1
    assert wait_until(lambda: queue_depth(stack) == 0)
