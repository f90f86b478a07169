"""The whole system on one machine (`stratus serve`, what `make serve` runs), called over loopback
with the official openai SDK (only base_url and api_key set) and plain HTTP for our own routes.

Runs the real SmolLM2 int8 model on two single-threaded workers. The workers hold messages for
4 s and heartbeat every second, so the redelivery paths take seconds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import pytest
from openai import AsyncOpenAI, OpenAI
from pydantic import BaseModel

from stratus_local.serve import free_port
from support import serve

pytestmark = pytest.mark.slow
KEY = "sk-stratus-local-test-key"


class Running:
    def __init__(self, proc: subprocess.Popen, url: str, aws: str, logs: Path, model: str) -> None:
        self.proc, self.url, self.aws, self.logs, self.model = proc, url, aws, logs, model
        self.client = OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=60)

    def table(self):
        session = boto3.Session(aws_access_key_id="local", aws_secret_access_key="local", region_name="us-east-1")
        return session.resource("dynamodb", endpoint_url=self.aws).Table("stratus-JobsTable")

    def item(self, job_id: str) -> dict:
        return self.table().get_item(Key={"pk": job_id}, ConsistentRead=True)["Item"]

    def generated(self, job_id: str, wait_s: float = 10.0) -> int:
        """How many times any worker wrote a result for this job (its logs say "generated"). The
        worker logs just after its DONE write lands, so a caller that has just seen DONE waits up
        to wait_s for the first line."""
        deadline = time.monotonic() + wait_s
        while True:
            lines = [ln for f in self.logs.glob("worker-*.log") for ln in f.read_text().splitlines()]
            count = sum(1 for ln in lines if '"generated"' in ln and job_id in ln)
            if count or time.monotonic() >= deadline:
                return count
            time.sleep(0.05)

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        """Our own routes (/v1/jobs ...) over plain HTTP."""
        req = urllib.request.Request(
            self.url + path,
            method=method,
            data=json.dumps(body).encode() if body else None,
            headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def job(self, job_id: str) -> dict:
        return self.call("GET", f"/jobs/{job_id}")[1]

    def wait_status(self, job_id: str, statuses: set[str], timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            view = self.job(job_id)
            if view["status"] in statuses:
                return view
            time.sleep(0.05)
        raise AssertionError(f"job {job_id} never reached {statuses}: {view}")


@pytest.fixture(scope="module")
def stack(real_models, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    port = free_port()
    timings = {"STRATUS_VISIBILITY_S": "4", "STRATUS_HEARTBEAT_S": "1", "STRATUS_SYNC_WAIT_S": "20"}
    proc, aws, model = serve.start(real_models["int8"], logs, port, KEY, workers=2, threads=1, env=timings)
    yield Running(proc, f"http://127.0.0.1:{port}/v1", aws, logs, model)
    before = {log: log.stat().st_size for log in logs.glob("worker-*.log")}
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole foreground process group
    assert proc.wait(timeout=60) == 0
    # Then every worker stopped in order, storage (moto) still up while they drained so that their
    # last writes succeed, and nothing is left running
    for log, size in before.items():
        said = log.read_bytes()[size:].decode()
        assert '"worker stopped"' in said and "could not" not in said, said
    assert left_running(logs) == []


def left_running(logs: Path, wait_s: float = 10.0) -> list[str]:
    """The command lines of processes `stratus serve` started that are still running after wait_s
    (they may take a moment to exit after their parent)."""
    deadline = time.monotonic() + wait_s
    while (pids := started_with(logs)) and time.monotonic() < deadline:
        time.sleep(0.1)
    out = []
    for pid in pids:
        try:
            out.append(f"{pid}: " + Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:
            continue  # gone meanwhile
    return out


def started_with(logs: Path) -> list[int]:
    """Processes whose environment names this log folder (what `stratus serve` started)."""
    out = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and str(logs).encode() in (d / "environ").read_bytes():
                out.append(int(d.name))
        except OSError:
            continue
    return out


def test_sigterm_while_starting_stops_what_was_started(real_models, tmp_path):
    env = {**os.environ, "STRATUS_LOCAL_LOG_DIR": str(tmp_path)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stratus_cli.main",
            "serve",
            "--model",
            str(real_models["int8"]),
            "--port",
            str(free_port()),
            "--workers",
            "1",
            "--threads",
            "1",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob("worker-*.log")) and time.monotonic() < deadline:
        time.sleep(0.05)  # moto is up, a worker is loading the model
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 130
    assert left_running(tmp_path) == []  # (neither moto nor the worker is left running for init to adopt)


def chat(stack, content: str, **kw):
    return stack.client.chat.completions.with_raw_response.create(
        model=stack.model, messages=[{"role": "user", "content": content}], temperature=0, **kw
    )


def test_openai_sdk_models_chat_and_completion(stack):
    assert [m.id for m in stack.client.models.list().data] == [stack.model]
    reply = chat(stack, "What is the capital of France?", max_tokens=24)
    body = reply.parse()
    assert reply.headers["x-stratus-cache"] == "miss"
    assert body.choices[0].message.content == "The capital of France is Paris."  # on every kind of host
    assert body.usage.prompt_tokens > 10 and body.usage.completion_tokens >= 1
    done = stack.client.completions.create(model=stack.model, prompt="The sky is", max_tokens=8, temperature=0)
    assert done.choices[0].text and done.usage.completion_tokens == 8 and done.choices[0].finish_reason == "length"


def test_benchmark_fields_fix_the_output_length_and_stream_the_usage(stack):
    # What GuideLLM and `vllm bench serve --ignore-eos` send, through the openai SDK as they do
    ask = [{"role": "user", "content": "Answer with one word: what colour is the sky?"}]
    plain = stack.client.chat.completions.create(model=stack.model, messages=ask, max_tokens=48, temperature=0)
    assert plain.usage.completion_tokens < 30  # the model's own end comes early
    fixed = stack.client.chat.completions.create(
        model=stack.model, messages=ask, max_tokens=48, temperature=0, extra_body={"ignore_eos": True}
    )
    assert fixed.usage.completion_tokens == 48 and fixed.choices[0].finish_reason == "length"
    held = stack.client.chat.completions.create(
        model=stack.model, messages=ask, max_tokens=48, temperature=0, extra_body={"min_tokens": 30}
    )
    assert held.usage.completion_tokens >= 30
    chunks = list(
        stack.client.chat.completions.create(
            model=stack.model,
            messages=ask,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True},
            extra_body={"ignore_eos": True},
        )
    )
    counts = [c.usage.completion_tokens for c in chunks[1:]]
    assert counts == sorted(counts) and counts[-1] == 24 and chunks[-1].choices == []


def test_a_repeated_request_is_a_cache_hit(stack):
    first = chat(stack, "Name a primary colour.", max_tokens=12)
    again = chat(stack, "Name a primary colour.", max_tokens=12)
    assert again.headers["x-stratus-cache"] == "hit"
    assert again.parse().choices[0].message.content == first.parse().choices[0].message.content


def test_20_concurrent_identical_requests_generate_once(stack):
    with ThreadPoolExecutor(20) as pool:
        replies = list(pool.map(lambda _: chat(stack, "Count from one to five.", max_tokens=24).parse(), range(20)))
    assert len({r.id for r in replies}) == 1 and len({r.choices[0].message.content for r in replies}) == 1
    job_id = replies[0].id.removeprefix("chatcmpl-")
    time.sleep(0.5)
    assert stack.generated(job_id) == 1


def test_errors_use_openai_bodies(stack):
    with pytest.raises(Exception) as err:
        stack.client.chat.completions.create(model=stack.model, messages=[{"role": "user", "content": "hi"}], n=17)
    assert err.value.status_code == 400 and "n must be an integer in [1, 16], got 17" in str(err.value)
    bad = OpenAI(base_url=stack.url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(Exception) as err:
        bad.models.list()
    assert err.value.status_code == 401


def test_cancel_a_running_job(stack):
    status, job = stack.call(
        "POST",
        "/jobs",
        {
            "model": stack.model,
            "max_tokens": 400,
            "temperature": 0,
            "messages": [{"role": "user", "content": "Write a long story about a lighthouse."}],
        },
    )
    assert status == 202
    job_id = job["id"]
    stack.wait_status(job_id, {"RUNNING"})
    assert stack.call("DELETE", f"/jobs/{job_id}")[1]["status"] == "CANCELLED"
    time.sleep(2)
    assert stack.job(job_id)["status"] == "CANCELLED" and stack.generated(job_id, wait_s=1.0) == 0


def streamed(stack, content: str, route: str = "chat", **kw) -> tuple[list[str], list]:
    """Stream one request through the openai SDK -> (text deltas, every chunk)."""
    if route == "chat":
        chunks = list(
            stack.client.chat.completions.create(
                model=stack.model, messages=[{"role": "user", "content": content}], stream=True, **kw
            )
        )
        return [c.choices[0].delta.content or "" for c in chunks if c.choices], chunks
    chunks = list(stack.client.completions.create(model=stack.model, prompt=content, stream=True, **kw))
    return [c.choices[0].text for c in chunks if c.choices], chunks


def test_streamed_chat_and_completion_are_the_whole_text_in_pieces(stack):
    parts, chunks = streamed(
        stack,
        "Write three sentences about rivers.",
        temperature=0,
        max_tokens=60,
        stream_options={"include_usage": True},
    )
    whole = chat(stack, "Write three sentences about rivers.", max_tokens=60).parse()  # the cached result
    assert "".join(parts) == whole.choices[0].message.content and len([p for p in parts if p]) >= 2
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1]) and len({c.id for c in chunks}) == 1
    parts, _ = streamed(stack, "The river", route="completion", temperature=0, max_tokens=40)
    done = stack.client.completions.create(model=stack.model, prompt="The river", max_tokens=40, temperature=0)
    assert "".join(parts) == done.choices[0].text != ""


def test_a_cached_answer_streams_at_once(stack):
    first, _ = streamed(stack, "Name a large ocean.", temperature=0, max_tokens=16)
    started = time.monotonic()
    again, chunks = streamed(stack, "Name a large ocean.", temperature=0, max_tokens=16)
    assert time.monotonic() - started < 0.5 and "".join(again) == "".join(first) != ""
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_8_concurrent_streams_each_get_their_own_text(stack):
    prompts = [f"Write one sentence about the number {i}." for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(lambda p: "".join(streamed(stack, p, temperature=0, max_tokens=24)[0]), prompts))
    for p, text in zip(prompts, texts):
        assert chat(stack, p, max_tokens=24).parse().choices[0].message.content == text != ""


def test_multibyte_characters_and_stop_strings_stream_intact(stack):
    prompt = "Translate to French: I would like a coffee at the café near the école."
    parts, _ = streamed(stack, prompt, temperature=0, max_tokens=40)
    text = "".join(parts)
    assert any(ord(ch) > 127 for ch in text) and not any("\ufffd" in p for p in parts)
    stop = text[len(text) // 2 : len(text) // 2 + 3]  # a stop string in the middle of the answer
    cut, chunks = streamed(stack, prompt, temperature=0, max_tokens=40, stop=[stop])
    fresh = chat(stack, prompt, max_tokens=40, stop=[stop], extra_headers={"Cache-Control": "no-store"}).parse()
    assert "".join(cut) == fresh.choices[0].message.content == text[: text.index(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_a_client_that_disconnects_cancels_its_job(stack):
    # (end-of-text and end-of-turn barred: a sampled answer could otherwise end before the client goes)
    stream = stack.client.chat.completions.create(
        model=stack.model,
        temperature=0.9,
        max_tokens=400,
        stream=True,
        logit_bias={"0": -100, "2": -100},
        messages=[{"role": "user", "content": "Tell a very long story."}],
    )
    first = next(iter(stream))
    job_id = first.id.removeprefix("chatcmpl-")
    stream.close()  # the client goes away: nobody else can be waiting on an unseeded sampled job
    view = stack.wait_status(job_id, {"CANCELLED", "DONE"}, timeout=30)
    assert view["status"] == "CANCELLED"


def test_a_worker_killed_mid_stream_the_client_gets_the_whole_text_once(stack):
    content = "Write a long poem about the sea."
    pool = ThreadPoolExecutor(1)
    reading = pool.submit(streamed, stack, content, temperature=0, max_tokens=160)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the job is the cache key's: find it by its chunks' id later
        running = [i for i in stack.table().scan()["Items"] if i.get("status") == "RUNNING" and "worker" in i]
        if running:
            break
        time.sleep(0.05)
    job_id = running[0]["pk"]
    time.sleep(0.3)  # some text is out
    victim = int(running[0]["worker"].split("-")[-2])  # worker ids are host-pid-random
    os.kill(victim, signal.SIGKILL)
    parts, chunks = reading.result(timeout=180)
    view = stack.wait_status(job_id, {"DONE", "FAILED"}, timeout=10)
    assert view["status"] == "DONE" and view["usage"]["completion_tokens"] >= 1
    assert chunks[0].id == f"chatcmpl-{job_id}"
    assert "".join(parts) == view["response"]["choices"][0]["message"]["content"]  # each character once
    item = stack.item(job_id)
    assert int(item["attempts"]) == 2 and f"-{victim}-" not in item["worker"]
    assert stack.generated(job_id) == 1


def test_a_poison_job_reaches_the_dlq_and_is_failed_for_the_client(stack):
    from stratus.contracts import Job, Status
    from stratus.jobstore import JobStore
    from stratus.wire import parse_request

    req = parse_request(
        "chat",
        {"model": stack.model, "messages": [{"role": "user", "content": "poison"}], "max_tokens": 8},
        max_messages=8,
        max_tokens_limit=64,
    )
    now, poison = time.time(), "j" + uuid.uuid4().hex  # a job id of the real shape
    JobStore(stack.table()).create(Job(poison, "local", Status.QUEUED, req, False, now, int(now + 3600)))
    session = boto3.Session(aws_access_key_id="local", aws_secret_access_key="local", region_name="us-east-1")
    sqs = session.client("sqs", endpoint_url=stack.aws)
    url = sqs.get_queue_url(QueueName="stratus-JobsQueue")["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody=json.dumps({"job_id": poison, "tenant": "local", "request": {}}))
    view = stack.wait_status(poison, {"FAILED"}, timeout=60)
    assert view["error"]["code"] == "job_failed" and "dead-letter queue" in view["error"]["message"]


def test_a_message_on_the_requests_queue_gets_a_reply(stack):
    session = boto3.Session(aws_access_key_id="local", aws_secret_access_key="local", region_name="us-east-1")
    sqs = session.client("sqs", endpoint_url=stack.aws)
    replies = sqs.create_queue(QueueName="stratus-replies-test")["QueueUrl"]
    requests = sqs.get_queue_url(QueueName="stratus-RequestsQueue")["QueueUrl"]
    body = {
        "model": stack.model,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 12,
        "temperature": 0,
    }
    sqs.send_message(
        QueueUrl=requests,
        MessageBody=json.dumps({"id": "req-1", "url": "/v1/chat/completions", "body": body, "reply_to": replies}),
    )
    sqs.send_message(
        QueueUrl=requests,
        MessageBody=json.dumps({"id": "req-2", "body": {**body, "temperature": 7}, "reply_to": replies}),
    )
    got: dict[str, dict] = {}
    deadline = time.monotonic() + 60
    while len(got) < 2 and time.monotonic() < deadline:
        for m in sqs.receive_message(QueueUrl=replies, WaitTimeSeconds=1, MaxNumberOfMessages=10).get("Messages", []):
            reply = json.loads(m["Body"])
            got[reply["id"]] = reply
    assert got["req-1"]["status"] == "DONE" and got["req-1"]["response"]["choices"][0]["message"]["content"]
    assert got["req-2"]["status"] == "FAILED" and "temperature" in got["req-2"]["error"]["message"]
    # the same request again is answered from the cache, straight from the trigger function
    sqs.send_message(
        QueueUrl=requests,
        MessageBody=json.dumps({"id": "req-3", "url": "/v1/chat/completions", "body": body, "reply_to": replies}),
    )
    again = wait_for_message(sqs, replies)
    assert again["id"] == "req-3" and again["response"] == got["req-1"]["response"]


def wait_for_message(sqs, url: str, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = sqs.receive_message(QueueUrl=url, WaitTimeSeconds=1).get("Messages", [])
        if got:
            return json.loads(got[0]["Body"])
    raise AssertionError("no message")


def test_an_uploaded_batch_file_produces_output_and_error_files(stack):
    session = boto3.Session(aws_access_key_id="local", aws_secret_access_key="local", region_name="us-east-1")
    s3 = session.client("s3", endpoint_url=stack.aws)
    lines = [
        {
            "custom_id": f"q{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": stack.model,
                "messages": [{"role": "user", "content": f"What is {i} plus {i}?"}],
                "max_tokens": 12,
                "temperature": 0,
            },
        }
        for i in range(3)
    ]
    body = "\n".join(json.dumps(x) for x in lines) + '\n{"custom_id": "broken"\n'
    s3.put_object(Bucket="stratus-resultsbucket", Key="batches/input/local/sums.jsonl", Body=body.encode())
    deadline, batch = time.monotonic() + 90, None
    while time.monotonic() < deadline:
        listed = stack.call("GET", "/batches")[1]["data"]
        batch = next((b for b in listed if b["input_file_id"].endswith("sums.jsonl")), None)
        if batch and batch["status"] == "completed":
            break
        time.sleep(0.5)
    assert batch and batch["status"] == "completed", batch
    assert batch["request_counts"] == {"total": 4, "completed": 3, "failed": 1}

    def read(uri: str) -> list[dict]:
        bucket, key = uri.removeprefix("s3://").split("/", 1)
        return [json.loads(x) for x in s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode().splitlines()]

    out = read(batch["output_file_uri"])
    assert sorted(o["custom_id"] for o in out) == ["q0", "q1", "q2"]
    assert all(
        o["response"]["status_code"] == 200 and o["response"]["body"]["choices"][0]["message"]["content"] for o in out
    )
    [error] = read(batch["error_file_uri"])
    assert error["line"] == 4 and "not valid JSON" in error["error"]["message"]


def sdk_batch(stack, path: Path, questions: list[str], max_tokens: int, **create):
    """files.create -> batches.create for a file of chat lines (custom ids c0, c1, ...)."""
    lines = [
        {
            "custom_id": f"c{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": stack.model,
                "messages": [{"role": "user", "content": q}],
                "max_tokens": max_tokens,
                "temperature": 0,
            },
        }
        for i, q in enumerate(questions)
    ]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    uploaded = stack.client.files.create(file=path.open("rb"), purpose="batch")
    return stack.client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h", **create
    )


def test_the_openai_sdk_batch_flow(stack, tmp_path):
    # files.create -> batches.create -> batches.retrieve until completed -> files.content
    tags = {"team": "search", "run": "nightly-7"}
    batch = sdk_batch(stack, tmp_path / "colours.jsonl", [f"Name a colour, {i}." for i in range(2)], 8, metadata=tags)
    assert batch.metadata == tags and batch.endpoint == "/v1/chat/completions"
    deadline = time.monotonic() + 90
    while batch.status not in ("completed", "failed") and time.monotonic() < deadline:
        time.sleep(0.5)
        batch = stack.client.batches.retrieve(batch.id)
    assert batch.status == "completed" and batch.request_counts.completed == 2, batch
    assert batch.metadata == tags  # (kept through the upload's ingest, which replaces the record)
    out = [json.loads(x) for x in stack.client.files.content(batch.output_file_id).text.splitlines()]
    assert sorted(o["custom_id"] for o in out) == ["c0", "c1"]
    assert all(o["response"]["body"]["choices"][0]["message"]["content"] for o in out)


def test_the_openai_sdk_cancels_a_batch(stack, tmp_path):
    # Given a batch of 80 lines that are still running
    batch = sdk_batch(stack, tmp_path / "long.jsonl", [f"Count to {i}." for i in range(80)], 32)
    deadline = time.monotonic() + 60
    while batch.status == "validating" and time.monotonic() < deadline:
        time.sleep(0.2)
        batch = stack.client.batches.retrieve(batch.id)
    # When it is cancelled (batches.cancel)
    batch = stack.client.batches.cancel(batch.id)
    assert batch.status == "cancelling" and batch.cancelling_at
    deadline = time.monotonic() + 120
    while batch.status == "cancelling" and time.monotonic() < deadline:
        time.sleep(0.5)
        batch = stack.client.batches.retrieve(batch.id)
    # Then it ends cancelled: the lines that ran are in its output, each of the others is an error line
    assert batch.status == "cancelled" and batch.cancelled_at, batch
    counts = batch.request_counts
    assert counts.total == 80 and counts.failed > 0 and counts.completed + counts.failed == 80, counts
    out = [json.loads(x) for x in stack.client.files.content(batch.output_file_id).text.splitlines()]
    assert len(out) == counts.completed and all(o["response"]["body"]["choices"][0]["message"]["content"] for o in out)
    errors = [json.loads(x) for x in stack.client.files.content(batch.error_file_id).text.splitlines()]
    assert len(errors) == counts.failed and {e["error"]["code"] for e in errors} == {"batch_cancelled"}


def test_the_openai_sdk_pages_through_batches(stack, tmp_path):
    made = {sdk_batch(stack, tmp_path / f"p{i}.jsonl", [f"Say {i}."], 1).id for i in range(2)}
    # auto-pagination: limit 1, then after=<the last id> until has_more is false
    listed = [b.id for b in stack.client.batches.list(limit=1)]
    assert made <= set(listed) and len(listed) == len(set(listed))
    assert listed == [b.id for b in stack.client.batches.list(limit=100).data]  # newest first, as one page


def children(pid: int, needle: str) -> list[int]:
    """Child processes of `pid` whose command line holds `needle` (read from /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and needle in cmd:
            out.append(int(d.name))
    return out


def submit_jobs(stack, n: int, tag: str, max_tokens: int = 48) -> list[str]:
    ids = []
    for i in range(n):
        status, job = stack.call(
            "POST",
            "/jobs",
            {
                "model": stack.model,
                "max_tokens": max_tokens,
                "temperature": 0,
                "messages": [{"role": "user", "content": f"[{tag} {i}] Describe a harbour."}],
            },
        )
        assert status == 202, job
        ids.append(job["id"])
    return ids


def test_every_worker_killed_with_8_jobs_in_flight_each_job_finishes_once(stack):
    ids = submit_jobs(stack, 8, "massacre")
    stack.wait_status(ids[0], {"RUNNING", "DONE"})
    victims = children(stack.proc.pid, "stratus_worker")
    assert len(victims) == 2
    for pid in victims:
        os.kill(pid, signal.SIGKILL)  # `stratus serve` replaces them, as the ECS service would
    views = [stack.wait_status(j, {"DONE", "FAILED"}, timeout=240) for j in ids]
    assert [v["status"] for v in views] == ["DONE"] * 8
    assert [stack.generated(j) for j in ids] == [1] * 8
    assert not set(children(stack.proc.pid, "stratus_worker")) & set(victims)


def test_storage_frozen_for_10_s_is_a_503_then_nothing_is_lost(stack):
    before = submit_jobs(stack, 3, "freeze", max_tokens=160)
    for j in before:  # generating (160 tokens take seconds) when storage freezes
        stack.wait_status(j, {"RUNNING", "DONE"})
    [moto] = children(stack.proc.pid, "stratus_local.moto_server")
    os.kill(moto, signal.SIGSTOP)
    try:
        started = time.monotonic()
        req = urllib.request.Request(
            stack.url + "/chat/completions",
            method="POST",
            data=json.dumps(
                {"model": stack.model, "messages": [{"role": "user", "content": "During the freeze?"}]}
            ).encode(),
            headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=30)
        assert err.value.code == 503 and err.value.headers["Retry-After"]
        assert json.loads(err.value.read())["error"]["code"] == "service_unavailable"
        assert time.monotonic() - started < 10
        time.sleep(max(0.0, 10 - (time.monotonic() - started)))
    finally:
        os.kill(moto, signal.SIGCONT)
    after = submit_jobs(stack, 2, "thaw", max_tokens=24)
    for j in before + after:  # every job ends, once
        assert stack.wait_status(j, {"DONE", "FAILED"}, timeout=240)["status"] == "DONE"
        assert stack.generated(j) == 1


def test_the_same_message_delivered_twice_at_once_is_generated_once(stack):
    from stratus.contracts import Job, QueueMessage

    _status, job = stack.call(
        "POST",
        "/jobs",
        {"model": stack.model, "max_tokens": 32, "temperature": 0, "messages": [{"role": "user", "content": "Twice?"}]},
    )
    item = Job.from_item(stack.item(job["id"]))
    body = QueueMessage(
        item.job_id, item.tenant, item.request, enqueued_at=time.time(), deadline=time.time() + 600
    ).to_body()
    sqs = boto3.client(
        "sqs", endpoint_url=stack.aws, region_name="us-east-1", aws_access_key_id="local", aws_secret_access_key="local"
    )
    url = sqs.get_queue_url(QueueName="stratus-JobsQueue")["QueueUrl"]
    sqs.send_message_batch(QueueUrl=url, Entries=[{"Id": "a", "MessageBody": body}, {"Id": "b", "MessageBody": body}])
    assert stack.wait_status(job["id"], {"DONE", "FAILED"}, timeout=120)["status"] == "DONE"
    time.sleep(2)  # the duplicates are drained
    assert stack.generated(job["id"]) == 1


class Person(BaseModel):
    name: str
    age: int


ASK_PERSON = "Give me a person as JSON with name and age."


def test_openai_sdk_parse_returns_a_schema_valid_object(stack):
    # the openai SDK's structured-output helper sends response_format json_schema (strict) from the model class
    done = stack.client.chat.completions.parse(
        model=stack.model,
        messages=[{"role": "user", "content": ASK_PERSON}],
        response_format=Person,
        temperature=0,
        max_tokens=64,
    )
    person = done.choices[0].message.parsed
    assert isinstance(person, Person) and person.name and done.choices[0].finish_reason == "stop"
    sampled = [
        stack.client.chat.completions.parse(
            model=stack.model,
            messages=[{"role": "user", "content": ASK_PERSON}],
            response_format=Person,
            temperature=1.0,
            seed=s,
            max_tokens=64,
        )
        for s in range(3)
    ]
    assert all(isinstance(r.choices[0].message.parsed, Person) for r in sampled)


def test_langchain_with_structured_output_returns_a_valid_object(stack):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=stack.url, api_key=KEY, model=stack.model, temperature=0, max_tokens=64, max_retries=0)
    person = llm.with_structured_output(Person).invoke(ASK_PERSON)
    assert isinstance(person, Person) and person.name


def test_openai_sdk_streams_the_same_logprobs_as_the_whole_response(stack):
    kw = dict(
        model=stack.model,
        messages=[{"role": "user", "content": "Name a fruit."}],
        temperature=0,
        max_tokens=12,
        logprobs=True,
        top_logprobs=2,
    )
    streamed = [
        e
        for chunk in stack.client.chat.completions.create(stream=True, **kw)
        for c in chunk.choices
        if c.logprobs and c.logprobs.content
        for e in c.logprobs.content
    ]
    whole = stack.client.chat.completions.create(**kw).choices[0].logprobs.content
    assert [(e.token, e.logprob, e.bytes) for e in streamed] == [(e.token, e.logprob, e.bytes) for e in whole]
    assert len(whole) >= 2 and all(len(e.top_logprobs) == 2 for e in whole)


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city"],
        },
    },
}
ASK_WEATHER = [{"role": "user", "content": "What is the weather like in Paris today?"}]


def test_openai_sdk_tool_calls_required_named_auto_and_streamed(stack):
    import jsonschema

    kw = dict(model=stack.model, messages=ASK_WEATHER, tools=[WEATHER_TOOL], temperature=0, max_tokens=48)
    named = {"type": "function", "function": {"name": "get_weather"}}
    # Streamed first (the worker writes chunks; the whole request after it is a cache hit)
    for choice in ("required", named):
        calls: dict[int, dict] = {}
        finish = None
        for chunk in stack.client.chat.completions.create(stream=True, tool_choice=choice, **kw):
            for c in chunk.choices:
                finish = c.finish_reason or finish
                for d in c.delta.tool_calls or []:
                    call = calls.setdefault(d.index, {"id": d.id, "name": d.function.name, "arguments": ""})
                    call["arguments"] += d.function.arguments or ""
                assert not c.delta.content
        whole = stack.client.chat.completions.create(tool_choice=choice, **kw).choices[0]
        assert whole.finish_reason == finish == "tool_calls" and whole.message.content is None
        assert [(t.id, t.function.name, t.function.arguments) for t in whole.message.tool_calls] == [
            (c["id"], c["name"], c["arguments"]) for c in calls.values()
        ]
        args = json.loads(whole.message.tool_calls[0].function.arguments)
        jsonschema.validate(args, WEATHER_TOOL["function"]["parameters"])
        assert whole.message.tool_calls[0].function.name == "get_weather" and "Paris" in args["city"]
    # auto: a greeting needs no tool, and the 135M model answers in text
    hello = stack.client.chat.completions.create(
        **{**kw, "messages": [{"role": "user", "content": "Say hello."}]}, tool_choice="auto"
    ).choices[0]
    assert hello.finish_reason == "stop" and hello.message.content and not hello.message.tool_calls


def test_openai_sdk_continues_a_conversation_with_a_tool_result(stack):
    first = stack.client.chat.completions.create(
        model=stack.model,
        messages=ASK_WEATHER,
        tools=[WEATHER_TOOL],
        tool_choice="required",
        temperature=0,
        max_tokens=48,
    ).choices[0]
    call = first.message.tool_calls[0]
    history = [
        *ASK_WEATHER,
        first.message.model_dump(exclude_none=True),  # as agent loops send it back: content null dropped
        {"role": "tool", "tool_call_id": call.id, "content": "18 degrees Celsius and sunny"},
    ]
    reply = stack.client.chat.completions.create(
        model=stack.model, messages=history, tools=[WEATHER_TOOL], tool_choice="none", temperature=0, max_tokens=32
    ).choices[0]
    assert reply.message.content and reply.message.tool_calls is None
    # the same history with no tools offered is read too
    plain = stack.client.chat.completions.create(model=stack.model, messages=history, temperature=0, max_tokens=8)
    assert plain.choices[0].message.content


def test_langchain_bind_tools_gets_a_tool_call(stack):
    from langchain_openai import ChatOpenAI

    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        return "sunny"

    llm = ChatOpenAI(base_url=stack.url, api_key=KEY, model=stack.model, temperature=0, max_tokens=48, max_retries=0)
    msg = llm.bind_tools([get_weather], tool_choice="get_weather").invoke("What is the weather like in Paris today?")
    assert (
        msg.tool_calls
        and msg.tool_calls[0]["name"] == "get_weather"
        and isinstance(msg.tool_calls[0]["args"]["city"], str)
    )


def test_openai_sdk_responses_plain_structured_and_continued(stack):
    first = stack.client.responses.create(
        model=stack.model, input="What is the capital of France?", max_output_tokens=24, temperature=0
    )
    assert first.status == "completed" and first.id.startswith("resp_")
    assert first.output_text == "The capital of France is Paris."  # the chat's own answer, on every kind of host
    assert first.usage.input_tokens > 10 and first.usage.output_tokens >= 1
    assert stack.client.responses.retrieve(first.id).output_text == first.output_text
    # a second turn continues the first: its input holds the whole conversation
    second = stack.client.responses.create(
        model=stack.model,
        previous_response_id=first.id,
        input="And of Germany?",
        instructions="Answer in one short sentence.",
        max_output_tokens=24,
        temperature=0,
    )
    assert second.status == "completed" and second.output_text and second.previous_response_id == first.id
    items = stack.client.responses.input_items.list(second.id, order="asc").data
    texts = [(i.role, i.content[0].text) for i in items if i.type == "message"]
    assert texts == [
        ("user", "What is the capital of France?"),
        ("assistant", first.output_text),
        ("user", "And of Germany?"),
    ]
    # structured output through text.format
    fmt = {
        "format": {
            "type": "json_schema",
            "name": "city",
            "schema": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
                "additionalProperties": False,
            },
        }
    }
    city = stack.client.responses.create(
        model=stack.model, input="Name a city in Italy.", text=fmt, max_output_tokens=32, temperature=0
    )
    assert isinstance(json.loads(city.output_text)["city"], str)
    # deleted: gone
    stack.client.responses.delete(city.id)
    with pytest.raises(Exception) as err:
        stack.client.responses.retrieve(city.id)
    assert err.value.status_code == 404


def test_openai_sdk_responses_background_streamed_and_tools(stack):
    queued = stack.client.responses.create(
        model=stack.model, input="What is the capital of France?", background=True, max_output_tokens=48, temperature=0
    )
    assert queued.status in ("queued", "in_progress", "completed") and queued.background
    deadline = time.monotonic() + 60
    while (got := stack.client.responses.retrieve(queued.id)).status in ("queued", "in_progress"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert got.status == "completed" and got.output_text, (got.output_text, got.usage)
    # streamed with the SDK's helper: the deltas make the final text
    with stack.client.responses.stream(
        model=stack.model, input="What is the capital of Spain?", max_output_tokens=48, temperature=0
    ) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text != "" and final.status in ("completed", "incomplete")
    # a function tool, called with valid arguments, streamed and whole
    tool = {
        "type": "function",
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": WEATHER_TOOL["function"]["parameters"],
    }
    kw = dict(
        model=stack.model,
        input="What is the weather like in Paris today?",
        tools=[tool],
        tool_choice="required",
        max_output_tokens=48,
        temperature=0,
    )
    with stack.client.responses.stream(**kw) as stream:
        pieces = [e.delta for e in stream if e.type == "response.function_call_arguments.delta"]
        streamed = stream.get_final_response()
    whole = stack.client.responses.create(**kw)
    [call] = [o for o in whole.output if o.type == "function_call"]
    assert call.name == "get_weather" and "Paris" in json.loads(call.arguments)["city"]
    assert "".join(pieces) == call.arguments == next(o for o in streamed.output if o.type == "function_call").arguments
    # the call's output goes back as the next input
    answer = stack.client.responses.create(
        model=stack.model,
        previous_response_id=whole.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "18 degrees Celsius and sunny"}],
        max_output_tokens=32,
        temperature=0,
    )
    assert answer.status == "completed" and answer.output_text


def test_the_openai_agents_sdk_runs_an_agent_with_a_function_tool(stack):
    # The Agents SDK as a team would first run it: its default model (the Responses API) on our
    # client, tracing off (it would post to OpenAI), one function tool it must call.
    from agents import Agent, ModelSettings, Runner, function_tool, set_default_openai_client, set_tracing_disabled

    called = []

    @function_tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        called.append(city)
        return f"18 degrees Celsius and sunny in {city}"

    set_tracing_disabled(True)
    set_default_openai_client(AsyncOpenAI(base_url=stack.url, api_key=KEY, max_retries=0), use_for_tracing=False)
    agent = Agent(
        name="weather",
        instructions="Use the get_weather tool to answer questions about the weather.",
        model=stack.model,
        tools=[get_weather],
        model_settings=ModelSettings(temperature=0, max_tokens=48, tool_choice="get_weather"),
        reset_tool_choice=True,  # (after the call, the model answers in text)
    )
    result = Runner.run_sync(agent, "What is the weather like in Paris today?")
    assert called and "Paris" in called[0]  # the tool ran with valid arguments
    assert isinstance(result.final_output, str) and result.final_output


def test_the_openai_sdk_lists_retrieves_and_deletes_files(stack, tmp_path):
    path = tmp_path / "lines.jsonl"
    path.write_text('{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}}\n')
    made = [stack.client.files.create(file=path.open("rb"), purpose="batch") for _ in range(3)]
    listed = stack.client.files.list(limit=2)
    ids = [f.id for f in listed.data]
    assert len(ids) == 2 and set(ids) <= {f.id for f in made}
    everything = [f.id for f in stack.client.files.list(limit=2)]  # (the SDK's auto-pagination: after=)
    assert set(everything) >= {f.id for f in made}
    got = stack.client.files.retrieve(made[0].id)
    assert (got.id, got.filename, got.bytes, got.purpose) == (made[0].id, "lines.jsonl", path.stat().st_size, "batch")
    assert stack.client.files.delete(made[0].id).deleted
    with pytest.raises(Exception) as err:
        stack.client.files.retrieve(made[0].id)
    assert err.value.status_code == 404
    assert made[0].id not in [f.id for f in stack.client.files.list()]
