"""What the worker container does besides the queue loop: fetch a published model from S3
(verified, cached) and honour SageMaker's /ping + /invocations contract."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import boto3
import pytest

from stratus.chunks import ChunkStore, stream_key
from stratus.contracts import InferenceRequest, Status
from stratus.errors import ModelLoadError
from stratus.jobstore import JobStore
from stratus.keys import create_key
from stratus.settings import Settings
from stratus_engine.artifact import fetch, publish
from stratus_engine.engine import Engine
from stratus_local.serve import free_port
from stratus_worker import sagemaker
from stratus_worker.invocations import drop_if_stale
from stratus_worker.sagemaker import invoke
from stratus_worker.worker import Worker
from support.graphs import corrupt, rehash


def test_a_published_model_is_fetched_verified_and_reused(stack, tiny, tmp_path):
    s3, bucket = boto3.client("s3"), stack.refs["ResultsBucket"]
    uri = publish(tiny.dirs["int4"], s3, bucket)
    manifest = json.loads((tiny.dirs["int4"] / "manifest.json").read_text())
    assert uri == f"s3://{bucket}/models/{manifest['model_id']}/{manifest['digest'][:16]}/"
    local = fetch(uri, s3, tmp_path / "cache", expected_digest=manifest["digest"])
    assert (
        local.name == manifest["digest"]
        and (local / "model.onnx").read_bytes() == (tiny.dirs["int4"] / "model.onnx").read_bytes()
    )
    Engine.from_dir(local, threads=1)  # loads
    before = (local / "model.onnx").stat().st_mtime_ns
    assert fetch(uri, s3, tmp_path / "cache") == local and (local / "model.onnx").stat().st_mtime_ns == before
    with pytest.raises(ModelLoadError, match="expected"):
        fetch(uri, s3, tmp_path / "other", expected_digest="0" * 64)


def test_a_corrupted_upload_is_refused(stack, tiny, tmp_path):
    s3, bucket = boto3.client("s3"), stack.refs["ResultsBucket"]
    uri = publish(tiny.dirs["int4"], s3, bucket, prefix="m/")
    key = uri.removeprefix(f"s3://{bucket}/") + "tokenizer.json"
    s3.put_object(Bucket=bucket, Key=key, Body=b"{}")
    with pytest.raises(ModelLoadError, match="tokenizer.json: missing or different"):
        fetch(uri, s3, tmp_path / "cache")
    assert not any((tmp_path / "cache").iterdir())  # nothing half-made is left to be trusted


def test_invocations_runs_a_queue_message_through_the_job_store(stack, tiny):
    key = create_key(stack.table, "acme", rpm=100, tpm=100_000)
    body = {
        "model": "smollm2-135m-instruct-int4",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 5,
        "temperature": 0,
    }
    assert stack.call("api_create_job.json", key=key, body=body)[0] == 202
    [message] = stack.queued()
    settings = dataclasses.replace(Settings.from_env(), model_dir=str(tiny.dirs["int4"]))
    engine = Engine.from_dir(tiny.dirs["int4"], threads=1, max_batch=2)
    worker = Worker(
        engine,
        settings,
        sqs=boto3.client("sqs"),
        table=stack.table,
        s3=boto3.client("s3"),
        stream_table=boto3.resource("dynamodb").Table(stack.refs["StreamTable"]),
        worker_id="sagemaker-1",
    )
    import threading

    halt = threading.Event()
    threading.Thread(target=engine.run, args=(halt,), daemon=True).start()
    try:
        status, view = invoke(worker, message)
        assert status == 200 and view["status"] == "DONE" and view["usage"]["completion_tokens"] >= 1
        assert JobStore(stack.table).get(message["job_id"]).worker == "sagemaker-1"
        status, again = invoke(worker, message)  # a repeated invocation never writes a second result
        assert again["status"] == "DONE" and again["response"] == view["response"]
    finally:
        halt.set()


def _call(port: int, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", method=method, data=json.dumps(body).encode() if body is not None else None
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def container_env(port: int, model_dir) -> dict:
    return {
        **os.environ,
        "SAGEMAKER_BIND_TO_PORT": str(port),
        "STRATUS_MODEL_DIR": str(model_dir),
        "AWS_DEFAULT_REGION": "us-east-1",
        "STRATUS_TABLE": "t",
        "STRATUS_QUEUE_URL": "q",
        "STRATUS_BUCKET": "b",
        "STRATUS_MODEL_ID": "tiny",
        "STRATUS_CONTEXT_LENGTH": "256",
        "STRATUS_MODEL_DIGEST": json.loads((Path(model_dir) / "manifest.json").read_text())["digest"],
        "STRATUS_CACHE_TTL_S": "60",
        "STRATUS_SYNC_WAIT_S": "1",
        "STRATUS_JOB_DEADLINE_S": "60",
        "STRATUS_MAX_BODY_BYTES": "100000",
        "STRATUS_MAX_MESSAGES": "8",
        "STRATUS_MAX_TOKENS": "64",
        "STRATUS_SHARED_CACHE": "false",
        "STRATUS_DEFAULT_RPM": "10",
        "STRATUS_DEFAULT_TPM": "1000",
    }


def test_the_container_serves_sagemakers_contract_and_stops_on_sigterm(tiny, tmp_path):
    port = free_port()
    env = container_env(port, tiny.dirs["int4"])
    proc = subprocess.Popen(
        [sys.executable, "-m", "stratus_worker", "serve", "--threads", "1"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if _call(port, "GET", "/ping")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, proc.stdout.read()
            time.sleep(0.1)
        status, body = _call(
            port, "POST", "/invocations", {"model": "tiny", "prompt": "hello", "max_tokens": 4, "temperature": 0}
        )
        assert status == 200 and body["object"] == "text_completion" and body["usage"]["completion_tokens"] >= 1
        status, body = _call(port, "POST", "/invocations", {"model": "tiny", "prompt": "x", "max_tokens": 0})
        assert status == 400 and "max_tokens" in body["error"]["message"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_model_that_misses_its_golden_outputs_never_gets_a_healthy_container(tiny, tmp_path):
    # Given a model whose weights were damaged after the build, when the SageMaker container
    # starts, then it exits 2 before /ping ever answers, naming the model, the host and the error.
    broken = tmp_path / "broken"
    shutil.copytree(tiny.dirs["int4"], broken)
    corrupt(broken, "model.embed_tokens.gather_scales", 1.5)
    rehash(broken)  # (its manifest describing the damaged files: only the golden outputs can tell)
    port = free_port()
    proc = subprocess.run(
        [sys.executable, "-m", "stratus_worker", "serve", "--threads", "1"],
        env=container_env(port, broken),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "error: model tiny-int4" in proc.stderr and "does not compute its golden outputs" in proc.stderr
    assert "max logprob error" in proc.stderr and "sagemaker server listening" not in proc.stdout
    with pytest.raises(OSError):
        _call(port, "GET", "/ping")


def test_stratus_model_publish_prints_the_uri_workers_use(stack, tiny, capsys):
    from stratus_cli.main import main as stratus

    bucket = stack.refs["ResultsBucket"]
    assert stratus(["model", "publish", "--model", str(tiny.dirs["int8"]), "--bucket", bucket]) == 0
    uri = capsys.readouterr().out.strip()
    manifest = json.loads((tiny.dirs["int8"] / "manifest.json").read_text())
    assert uri.startswith(f"s3://{bucket}/models/{manifest['model_id']}/")
    listed = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=uri.removeprefix(f"s3://{bucket}/"))
    assert {o["Key"].rsplit("/", 1)[1] for o in listed["Contents"]} == {*manifest["files"], "manifest.json"}


def test_a_failed_invocation_fails_its_job_visibly(stack, tiny, monkeypatch):
    key = create_key(stack.table, "acme", rpm=100, tpm=100_000)
    body = {"model": "smollm2-135m-instruct-int4", "prompt": "boom", "max_tokens": 3, "temperature": 0}
    assert stack.call("api_create_job.json", key=key, body=body)[0] == 202
    [message] = stack.queued()
    settings = dataclasses.replace(Settings.from_env(), model_dir=str(tiny.dirs["int4"]))
    worker = Worker(
        Engine.from_dir(tiny.dirs["int4"], threads=1),
        settings,
        sqs=boto3.client("sqs"),
        table=stack.table,
        s3=boto3.client("s3"),
        worker_id="sm",
        stream_table=boto3.resource("dynamodb").Table(stack.refs["StreamTable"]),
    )
    monkeypatch.setattr(worker.engine, "submit", lambda req: (_ for _ in ()).throw(RuntimeError("GPU fell off")))
    status, reply = invoke(worker, message)
    job = JobStore(stack.table).get(message["job_id"])
    assert status == 500 and job.status == Status.FAILED and job.error["code"] == "worker_failed"
    assert "GPU fell off" not in json.dumps([reply, job.error]) and "RuntimeError" not in json.dumps([reply, job.error])


@pytest.mark.parametrize("digest, says", [("unset", "STRATUS_MODEL_DIGEST is unset"), ("0" * 64, "differs from")])
def test_a_worker_whose_model_digest_is_unset_or_wrong_refuses_to_start(tiny, digest, says):
    env = {**container_env(free_port(), tiny.dirs["int4"]), "STRATUS_MODEL_DIGEST": digest}
    proc = subprocess.run(
        [sys.executable, "-m", "stratus_worker", "--threads", "1"], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and says in proc.stderr


@pytest.fixture
def container(stack, tiny, monkeypatch):
    """The SageMaker container in-process: serve() on a free port (engine, housekeeping, /ping,
    /invocations) over moto -> (worker, port, a queued message maker). Stopped at the end."""
    port = free_port()
    monkeypatch.setenv("SAGEMAKER_BIND_TO_PORT", str(port))
    settings = dataclasses.replace(
        Settings.from_env(), model_dir=str(tiny.dirs["int4"]), cancel_check_s=0.05, stream_flush_s=0.02
    )
    worker = Worker(
        Engine.from_dir(tiny.dirs["int4"], threads=1, max_batch=2),
        settings,
        sqs=boto3.client("sqs"),
        table=stack.table,
        s3=boto3.client("s3"),
        worker_id="sm-1",
        stream_table=boto3.resource("dynamodb").Table(stack.refs["StreamTable"]),
    )
    stop = threading.Event()
    server = threading.Thread(target=sagemaker.serve, args=(worker, stop), daemon=True)
    server.start()
    key = create_key(stack.table, "acme", rpm=100, tpm=100_000)

    def queued(max_tokens: int = 5, **params) -> dict:
        """A job as the API queues it (its message, as the dispatcher would invoke the endpoint)."""
        body = {
            "model": "smollm2-135m-instruct-int4",
            "prompt": f"p{time.monotonic_ns()}",
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        assert stack.call("api_create_job.json", key=key, body=body)[0] == 202
        [message] = stack.queued()
        message["request"]["params"].update(params)
        return as_its_job(stack, message)

    deadline = time.monotonic() + 30
    while _ping(port) is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    yield worker, port, queued, server
    stop.set()
    server.join(timeout=30)


def as_its_job(stack, message: dict) -> dict:
    """A message whose request a test changed (ignore_eos: a long generation), its job's item made to
    match (a worker generates only the request a job was made for)."""
    store = JobStore(stack.table)
    job = store.get(message["job_id"])
    job.request = InferenceRequest.from_json(message["request"])
    stack.table.put_item(Item=job.to_item())
    return message


def _ping(port: int) -> int | None:
    try:
        return _call(port, "GET", "/ping")[0]
    except OSError:
        return None


def _slow_tokens(worker: Worker, after: int, then) -> list[int]:
    """Each job's tokens come 5 ms apart; after `after` of them, then(job_id) once -> the tokens seen."""
    seen, real_open = [], worker.results.open

    def open_(msg, run, attempt, now, prompt_tokens=0):
        on_token = real_open(msg, run, attempt, now, prompt_tokens)

        def counted(token_id, logprob=None):
            seen.append(token_id)
            if len(seen) == after:
                then(msg.job_id)
            time.sleep(0.005)
            on_token(token_id, logprob)

        return counted

    worker.results.open = open_
    return seen


def invoked_at_once(worker: Worker, message: dict) -> list[tuple[int, dict]]:
    """Two invocations of one message at once -> their (status, body) replies."""
    replies: list = [None, None]
    threads = [threading.Thread(target=lambda i=i: replies.__setitem__(i, invoke(worker, message))) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return replies


@pytest.mark.parametrize("event", ["cancel", "stream"])
def test_a_sagemaker_container_keeps_its_jobs_housekeeping(stack, container, event):
    # Given the container generating a 200-token job, when a client cancels it (DELETE /v1/jobs/{id})
    # or a streaming request joins it after its 3rd token
    worker, _, queued, _ = container
    store = JobStore(stack.table)
    message = queued(max_tokens=200, ignore_eos=True)
    act = {"cancel": store.cancel, "stream": store.mark_streamed}[event]
    seen = _slow_tokens(worker, 3, act)
    status, view = invoke(worker, message)
    job = store.get(message["job_id"])
    if event == "cancel":  # then the engine drops the row at its next step: the job ends CANCELLED
        assert status == 200 and view["status"] == job.status.value == "CANCELLED"
        assert len(seen) < 200
    else:  # then its text is written as chunks from the first token, ending with the final chunk
        chunks = ChunkStore(boto3.resource("dynamodb").Table(stack.refs["StreamTable"])).after(
            stream_key(job.job_id, job.run), 0
        )
        assert view["status"] == "DONE" and chunks and chunks[-1].final["usage"]["completion_tokens"] == 200
        assert "".join(c.text for c in chunks) == view["response"]["choices"][0]["text"]


def test_a_second_invocation_for_a_job_generating_here_waits_for_its_result(stack, container):
    # Given one job invoked twice at once (a promoted or adopted job has two queue messages)
    worker, _, queued, _ = container
    message = queued(max_tokens=20, ignore_eos=True)
    submitted, real_submit = [], worker.engine.submit
    worker.engine.submit = lambda r: submitted.append(r) or real_submit(r)
    _slow_tokens(worker, 1, lambda _job: None)
    replies = invoked_at_once(worker, message)
    # Then it is generated once, and both invocations answer with its one result
    assert len(submitted) == 1
    assert [r[0] for r in replies] == [200, 200] and replies[0][1] == replies[1][1]
    assert replies[0][1]["status"] == "DONE"


def test_a_message_from_a_newer_api_fails_its_job_with_a_clear_error(stack, container):
    worker, _, queued, _ = container
    message = {**queued(), "version": 99}
    status, reply = invoke(worker, message)
    job = JobStore(stack.table).get(message["job_id"])
    assert status == 500 and job.status == Status.FAILED and job.error == reply["error"]
    assert job.error["code"] == "worker_outdated" and "new worker image" in job.error["message"]


def test_an_engine_that_dies_fails_its_jobs_turns_ping_unhealthy_and_stops_the_server(stack, container, monkeypatch):
    # Given a serving container whose engine's next step raises
    worker, _port, queued, server = container
    waiting = queued(max_tokens=200, ignore_eos=True)
    monkeypatch.setattr(worker.engine, "step", lambda: (_ for _ in ()).throw(MemoryError("out of GPU memory")))
    # When a job is invoked: its job fails visibly (no async invocation is ever retried)
    status, _reply = invoke(worker, waiting)
    job = JobStore(stack.table).get(waiting["job_id"])
    assert status == 500 and job.status == Status.FAILED and job.error["code"] == "worker_failed"
    # and the next one fails at once, not waiting for ever
    started = time.monotonic()
    again = queued()
    assert invoke(worker, again)[0] == 500 and time.monotonic() - started < 5
    assert JobStore(stack.table).get(again["job_id"]).status == Status.FAILED
    # and the server stops (the process exits 1 and SageMaker replaces the instance); /ping said 503 meanwhile
    server.join(timeout=10)
    assert not server.is_alive() and isinstance(worker.failure, MemoryError)
    probe = sagemaker.make_server(worker, free_port(), host="127.0.0.1")
    threading.Thread(target=probe.serve_forever, daemon=True).start()
    try:
        assert _ping(probe.server_address[1]) == 503
    finally:
        probe.shutdown()
        probe.server_close()


def test_a_job_made_again_while_its_stale_generation_runs_here_is_generated_anew(stack, container):
    # Given the container generating a 200-token job that a client cancels at its 3rd token, and an
    # identical request that then makes the job again (a new run, QUEUED, a new message)
    worker, _, _, _ = container
    key = create_key(stack.table, "acme2", rpm=100, tpm=100_000)
    body = {"model": "smollm2-135m-instruct-int4", "prompt": "twice made", "max_tokens": 200, "temperature": 0}
    assert stack.call("api_create_job.json", key=key, body=body)[0] == 202
    [first] = stack.queued()
    first["request"]["params"]["ignore_eos"] = True
    as_its_job(stack, first)
    store, again = JobStore(stack.table), []

    def cancel_and_ask_again(job_id):
        store.cancel(job_id)
        assert stack.call("api_create_job.json", key=key, body={**body, "max_tokens": 200})[0] == 202
        again.extend(stack.queued())

    seen = _slow_tokens(worker, 3, cancel_and_ask_again)
    replies = []
    t = threading.Thread(target=lambda: replies.append(invoke(worker, first)))
    t.start()
    deadline = time.monotonic() + 30
    while not again:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    remade = store.get(first["job_id"])
    # When its new message is invoked while the stale generation is still held here
    status, view = invoke(worker, again[0])
    t.join(timeout=30)
    # Then the stale generation is dropped early and the new run is generated and written
    job = store.get(first["job_id"])
    assert status == 200 and view["status"] == job.status.value == "DONE" and job.run == remade.run
    assert job.usage["completion_tokens"] == 200 and len(seen) < 400


def test_an_invocation_waiting_on_a_job_that_fails_reports_it_failed(stack, container, monkeypatch):
    worker, _, queued, _ = container
    message = queued()
    calls = []

    def fails_slowly(req):
        calls.append(1)
        time.sleep(0.3)  # (the second invocation is waiting by now)
        raise RuntimeError("GPU fell off")

    monkeypatch.setattr(worker.engine, "submit", fails_slowly)
    replies = invoked_at_once(worker, message)
    assert len(calls) == 1 and JobStore(stack.table).get(message["job_id"]).status == Status.FAILED
    assert sorted(r[0] for r in replies) == [200, 500]
    assert [r[1]["status"] for r in replies if r[0] == 200] == ["FAILED"]  # (read after the fail, not RUNNING)


def test_only_a_generation_whose_run_was_made_again_is_dropped(stack, container):
    # Given a job held here by an invocation that has not claimed it yet, then by one that claimed run r1
    from stratus.contracts import QueueMessage
    from stratus_worker.worker import Held

    worker, _, queued, _ = container
    message = queued()
    msg, job = QueueMessage.from_body(json.dumps(message)), JobStore(stack.table).get(message["job_id"])
    first = Held(msg, None, 0.0)
    worker.held[msg.job_id] = first
    # When a second invocation looks: not claimed, nothing is stale (it will claim whatever run the job has)
    drop_if_stale(worker, first)
    assert msg.job_id not in worker.cancelled
    first.run = job.run
    drop_if_stale(worker, first)  # its run is the job's own
    assert msg.job_id not in worker.cancelled
    first.run = "an-earlier-run"  # the job was made again after it claimed
    drop_if_stale(worker, first)
    assert msg.job_id in worker.cancelled
    worker.held.pop(msg.job_id)
    worker.cancelled.clear()


def test_a_failed_invocation_of_a_run_made_again_leaves_the_new_run_queued(stack, container, monkeypatch):
    # Given an invocation generating run r1 when the job is cancelled and made again (r2, QUEUED, its own
    # invocation to come), and whose result write then fails
    worker, _, _, _ = container
    key = create_key(stack.table, "acme3", rpm=100, tpm=100_000)
    body = {"model": "smollm2-135m-instruct-int4", "prompt": "fails after a remake", "max_tokens": 20, "temperature": 0}
    assert stack.call("api_create_job.json", key=key, body=body)[0] == 202
    [first] = stack.queued()
    store = JobStore(stack.table)

    def cancel_and_ask_again(job_id):
        store.cancel(job_id)
        assert stack.call("api_create_job.json", key=key, body=body)[0] == 202

    _slow_tokens(worker, 3, cancel_and_ask_again)
    monkeypatch.setattr(worker.results, "record", lambda *a: (_ for _ in ()).throw(RuntimeError("S3 is down")))
    # When that invocation fails
    assert invoke(worker, first)[0] == 500
    # Then the new run stays QUEUED for its own invocation, not FAILED by the old one
    assert store.get(first["job_id"]).status == Status.QUEUED


def test_a_waiting_invocation_that_cannot_read_the_job_fails_it_only_when_queued(stack, container, monkeypatch):
    from stratus.contracts import QueueMessage
    from stratus_worker.worker import Held

    worker, _, queued, _ = container
    message = queued()
    msg = QueueMessage.from_body(json.dumps(message))
    first = Held(msg, None, 0.0)
    first.settled.set()  # (it has ended, and not yet let go of the job)
    worker.held[msg.job_id] = first
    monkeypatch.setattr(worker.store, "get", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("throttled")))
    status, _reply = invoke(worker, message)
    worker.held.pop(msg.job_id)
    monkeypatch.undo()
    assert status == 500 and JobStore(stack.table).get(msg.job_id).status == Status.FAILED  # (not QUEUED for ever)
