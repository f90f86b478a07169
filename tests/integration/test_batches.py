"""Batch files under moto: upload -> batch function (events/batch_upload.json) -> jobs -> scheduled
pass (events/batch_schedule.json) -> output and error files; the /v1/batches routes."""

from __future__ import annotations

import dataclasses
import json

import boto3
import pytest

from stratus.batches import output
from stratus.contracts import Status
from stratus.jobstore import JobStore
from stratus.keys import create_key
from stratus_local.template import ROOT, LambdaContext, load_handler, load_template

MODEL = "smollm2-135m-instruct-int4"
EVENTS = ROOT / "events"


def line(custom_id: str, content: str, **kw) -> str:
    return json.dumps(
        {
            "custom_id": custom_id,
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": MODEL,
                "messages": [{"role": "user", "content": content}],
                "max_tokens": 16,
                "temperature": 0,
                **kw,
            },
        }
    )


FILE = (
    "\n".join(
        [
            line("q1", "What is 2+2?"),
            line("q2", "What is 2+2?"),  # identical to q1: one job serves both
            "{not json",
            line("q4", "Too hot", temperature=9),
            json.dumps(
                {"recordId": "r5", "modelInput": {"prompt": "Once upon a time", "max_gen_len": 8, "temperature": 0}}
            ),
            line("q6", "Name a colour."),
        ]
    )
    + "\n"
)


@pytest.fixture
def batch_fn(stack):
    handler, _ = load_handler(load_template(), "BatchFunction")
    s3, bucket = boto3.client("s3"), stack.refs["ResultsBucket"]

    def upload(key: str, body: str | None) -> dict:
        """Put the file (None: it is there already), then deliver its Object Created event."""
        if body is not None:
            s3.put_object(Bucket=bucket, Key=key, Body=body.encode())
        event = json.loads((EVENTS / "batch_upload.json").read_text())
        event["detail"]["bucket"]["name"] = bucket
        event["detail"]["object"].update(key=key, etag=s3.head_object(Bucket=bucket, Key=key)["ETag"].strip('"'))
        return handler(event, LambdaContext())

    def tick() -> dict:
        return handler(json.loads((EVENTS / "batch_schedule.json").read_text()), LambdaContext())

    def read(uri: str) -> list[dict]:
        key = uri.removeprefix(f"s3://{bucket}/")
        return [json.loads(x) for x in s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode().splitlines()]

    return upload, tick, read


def work_all(stack, text: str = "4", messages: list[dict] | None = None) -> int:
    """Play the worker for every queued job (or for these messages, taken from the queue already)."""
    store, n = JobStore(stack.table), 0
    for m in stack.queued("BatchJobsQueue") if messages is None else messages:
        store.transition(m["job_id"], [Status.QUEUED], Status.RUNNING, worker="w")
        store.complete(
            m["job_id"],
            "w",
            {"text": f"{text}:{m['job_id'][:6]}", "finish_reason": "stop"},
            usage={"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
        )
        n += 1
    return n


def test_an_uploaded_file_becomes_a_batch_with_output_and_error_files(stack, batch_fn):
    upload, tick, read = batch_fn
    created = upload("batches/input/acme/questions.jsonl", FILE)
    assert created["status"] == "in_progress" and created["request_counts"] == {"total": 6, "completed": 0, "failed": 2}
    assert stack.queued() == []  # batch lines wait in the batch tier's queue, never the interactive one
    assert work_all(stack) == 3  # q1 and q2 share one job; the bad JSON and bad temperature never queue
    assert tick()["completed"] == [created["batch"]]
    key = create_key(stack.table, "acme", rpm=100, tpm=100_000)
    status, view, _ = stack.call("api_get_batch.json", key=key, job_id=created["batch"])
    assert status == 200 and view["status"] == "completed"
    assert view["request_counts"] == {"total": 6, "completed": 4, "failed": 2}
    out = read(view["output_file_uri"])
    by_id = {o.get("custom_id") or o.get("recordId"): o for o in out}
    assert set(by_id) == {"q1", "q2", "r5", "q6"}
    assert by_id["q1"]["response"]["body"] == by_id["q2"]["response"]["body"]
    assert (
        by_id["q1"]["response"]["status_code"] == 200 and by_id["q1"]["response"]["body"]["object"] == "chat.completion"
    )
    assert by_id["r5"]["modelInput"]["prompt"] == "Once upon a time"
    assert by_id["r5"]["modelOutput"]["object"] == "text_completion"
    errors = read(view["error_file_uri"])
    assert [(e["line"], e["custom_id"]) for e in errors] == [(3, None), (4, "q4")]
    assert "not valid JSON" in errors[0]["error"]["message"] and "temperature" in errors[1]["error"]["message"]
    # and its outbox (the lines' queued prompts) is gone; the record of which job served each line stays
    assert state_files(stack, created["batch"]) == ["lines/00000.json"]


def test_responses_lines_run_as_chats_and_answer_response_objects(stack, batch_fn):
    upload, tick, read = batch_fn

    def response_line(custom_id: str, **body) -> str:
        body = {"model": MODEL, "input": "What is 2+2?", "max_output_tokens": 16, "temperature": 0, **body}
        return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/responses", "body": body})

    # Given Responses lines (plain, with instructions, and three a batch cannot run) beside a chat line
    text = "\n".join(
        [
            response_line("r1"),
            response_line("r2", instructions="Answer in one word."),
            response_line("r3", previous_response_id="resp_0123"),
            response_line("r4", stream=True),
            response_line("r5", tools=[{"type": "web_search"}]),
            line("c6", "What is 3+3?"),
        ]
    )
    created = upload("batches/input/acme/responses.jsonl", text)
    assert created["request_counts"] == {"total": 6, "completed": 0, "failed": 3}
    # Then each runs as a chat job (instructions first, as a system turn)
    queued = stack.queued("BatchJobsQueue")
    assert sorted(len(m["request"]["messages"]) for m in queued) == [1, 1, 2]
    assert {"role": "system", "content": "Answer in one word."} in [m["request"]["messages"][0] for m in queued]
    work_all(stack, messages=queued)
    assert tick()["completed"] == [created["batch"]]
    key = create_key(stack.table, "acme", rpm=100, tpm=100_000)
    view = stack.call("api_get_batch.json", key=key, job_id=created["batch"])[1]
    out = {o["custom_id"]: o["response"]["body"] for o in read(view["output_file_uri"])}
    # and a Responses line's output body is a response object, a chat line's a chat completion
    assert out["r1"]["object"] == "response" and out["r1"]["status"] == "completed"
    assert out["r1"]["id"].startswith("resp_") and out["r1"]["output"][0]["content"][0]["text"].startswith("4:")
    assert out["r1"]["usage"]["input_tokens"] == 5 and out["r1"]["max_output_tokens"] == 16
    assert out["c6"]["object"] == "chat.completion"
    errors = {e["custom_id"]: e["error"]["param"] for e in read(view["error_file_uri"])}
    assert errors == {"r3": "previous_response_id", "r4": "stream", "r5": "tools[0]"}


def test_lines_of_any_shape_become_error_lines_and_the_rest_of_the_file_goes_on(stack, batch_fn):
    upload, tick, read = batch_fn
    # Given a file whose lines put lists and objects where strings go, or a number past float range
    shaped = [json.loads(line(f"q{i}", "What is 2+2?")) for i in range(6)]
    shaped[1]["url"] = ["/v1/chat/completions"]
    shaped[2]["url"] = {"path": "/v1/chat/completions"}
    shaped[3]["method"] = ["POST"]
    shaped[4]["custom_id"] = {"id": "q4"}
    text = "".join(json.dumps(d) + "\n" for d in shaped)
    text += line("q6", "hot", temperature=1).replace('"temperature": 1', '"temperature": 1' + "0" * 400) + "\n"
    created = upload("batches/input/acme/shapes.jsonl", text)
    # Then each bad line is an error line naming its field, and the good one runs
    assert created["status"] == "in_progress"
    assert created["request_counts"] == {"total": 7, "completed": 0, "failed": 5}
    work_all(stack)
    assert tick()["completed"] == [created["batch"]]
    key = create_key(stack.table, "acme", rpm=100, tpm=100_000)
    view = stack.call("api_get_batch.json", key=key, job_id=created["batch"])[1]
    assert [o["custom_id"] for o in read(view["output_file_uri"])] == ["q0", "q5"]
    errors = {e["line"]: e["error"] for e in read(view["error_file_uri"])}
    assert {n: e["param"] for n, e in errors.items()} == {
        2: "url",
        3: "url",
        4: "method",
        5: "custom_id",
        7: "temperature",
    }


def state_files(stack, batch_id: str) -> list[str]:
    prefix = f"batches/state/{batch_id}/"
    listed = boto3.client("s3").list_objects_v2(Bucket=stack.refs["ResultsBucket"], Prefix=prefix)
    return sorted(o["Key"].removeprefix(prefix) for o in listed.get("Contents", []))


def test_a_tenant_has_at_most_max_open_batches_open(stack, batch_fn, batch_deps, monkeypatch):
    upload, _, _ = batch_fn
    batch_deps(max_open_batches=2)
    api = stack.module.get_deps()
    monkeypatch.setattr(api, "settings", dataclasses.replace(api.settings, max_open_batches=2))
    # Given a tenant with two batches open
    for name in ("a", "b"):
        assert upload(f"batches/input/acme/{name}.jsonl", lines(name, 3))["status"] == "in_progress"
    # When it uploads a third, or posts one
    third = upload("batches/input/acme/c.jsonl", lines("c", 3))
    key = create_key(stack.table, "acme", rpm=100, tpm=100_000)
    boto3.client("s3").put_object(Bucket=stack.refs["ResultsBucket"], Key="batches/files/acme/d.jsonl", Body=b"{}")
    status, body, headers = stack.call("api_create_batch.json", key=key, body={"input_file_id": "d.jsonl"})
    # Then the upload's batch fails saying why (none of its lines read), and the post is a 429
    view = stack.call("api_get_batch.json", key=key, job_id=third["batch"])[1]
    assert view["status"] == "failed" and view["errors"]["data"][0]["code"] == "too_many_open_batches"
    assert view["request_counts"]["total"] == 0
    assert status == 429 and body["error"]["code"] == "too_many_open_batches" and headers["retry-after"] == "60"
    # and another tenant is not held back
    assert upload("batches/input/initech/e.jsonl", lines("e", 3))["status"] == "in_progress"


def test_a_redelivered_upload_event_does_not_create_a_second_batch(stack, batch_fn):
    upload, _, _ = batch_fn
    first = upload("batches/input/acme/a.jsonl", line("x", "hello") + "\n")
    again = upload("batches/input/acme/a.jsonl", line("x", "hello") + "\n")
    assert first["batch"] == again["batch"] and len(stack.queued("BatchJobsQueue")) == 1


def test_identical_lines_reuse_the_cache(stack, batch_fn):
    upload, tick, _read = batch_fn
    upload("batches/input/acme/first.jsonl", line("a", "cached?") + "\n")
    work_all(stack, "first")
    tick()
    second = upload("batches/input/acme/second.jsonl", line("b", "cached?") + "\n")
    assert stack.queued("BatchJobsQueue") == []  # answered from the cache
    assert tick()["completed"] == [second["batch"]]


def test_a_batch_is_pending_until_its_last_line_finishes(stack, batch_fn):
    upload, tick, _ = batch_fn
    created = upload("batches/input/acme/slow.jsonl", line("a", "one") + "\n" + line("b", "two") + "\n")
    msgs = stack.queued("BatchJobsQueue")
    store = JobStore(stack.table)
    store.transition(msgs[0]["job_id"], [Status.QUEUED], Status.RUNNING, worker="w")
    store.complete(msgs[0]["job_id"], "w", {"text": "1", "finish_reason": "stop"})
    assert tick()["completed"] == []
    key = create_key(stack.table, "acme", rpm=100, tpm=100_000)
    view = stack.call("api_get_batch.json", key=key, job_id=created["batch"])[1]
    assert view["status"] == "in_progress" and view["request_counts"] == {"total": 2, "completed": 1, "failed": 0}
    store.transition(msgs[1]["job_id"], [Status.QUEUED], Status.FAILED, error={"message": "x", "code": "job_failed"})
    assert tick()["completed"] == [created["batch"]]


def test_post_batches_points_at_a_tenant_file_and_other_tenants_get_404(stack, batch_fn):
    upload, _, _ = batch_fn
    bucket = stack.refs["ResultsBucket"]
    boto3.client("s3").put_object(Bucket=bucket, Key="batches/files/acme/questions.jsonl", Body=FILE.encode())
    acme = create_key(stack.table, "acme", rpm=100, tpm=100_000)
    status, view, _ = stack.call("api_create_batch.json", key=acme)
    # answered at once: the file was copied under the input prefix, where the batch function ingests it
    assert status == 200 and view["status"] == "validating" and stack.queued("BatchJobsQueue") == []
    copied = view["input_file_uri"].removeprefix(f"s3://{bucket}/")
    assert copied.startswith("batches/input/acme/posted/") and copied.endswith("/questions.jsonl")
    assert view["input_file_id"] == "questions.jsonl"
    assert stack.call("api_get_batch.json", key=acme, job_id=view["id"])[1]["status"] == "validating"
    ingested = upload(copied, None)
    assert ingested["batch"] == view["id"] and ingested["request_counts"]["total"] == 6
    view = stack.call("api_get_batch.json", key=acme, job_id=view["id"])[1]
    assert view["status"] == "in_progress" and view["request_counts"]["total"] == 6
    listed = stack.call("api_list_batches.json", key=acme)[1]
    assert [b["id"] for b in listed["data"]] == [view["id"]]
    other = create_key(stack.table, "globex", rpm=100, tpm=100_000)
    assert stack.call("api_get_batch.json", key=other, job_id=view["id"])[0] == 404
    assert stack.call("api_list_batches.json", key=other)[1]["data"] == []
    assert stack.call("api_create_batch.json", key=other)[0] == 404  # globex has no such file
    bad = stack.call("api_create_batch.json", key=acme, body={"endpoint": "/v1/chat/completions"})
    assert bad[0] == 400 and "input_file_id is required" in bad[1]["error"]["message"]


def test_a_posted_batch_keeps_its_endpoint_and_metadata_through_its_ingest(stack, batch_fn):
    upload, _, _ = batch_fn
    bucket = stack.refs["ResultsBucket"]
    boto3.client("s3").put_object(Bucket=bucket, Key="batches/files/acme/q.jsonl", Body=FILE.encode())
    acme = create_key(stack.table, "acme", rpm=100, tpm=100_000)
    body = {
        "input_file_id": "q.jsonl",
        "endpoint": "/v1/completions",
        "completion_window": "24h",
        "metadata": {"run": "7"},
    }
    status, view, _ = stack.call("api_create_batch.json", key=acme, body=body)
    assert status == 200 and view["endpoint"] == "/v1/completions" and view["metadata"] == {"run": "7"}
    upload(view["input_file_uri"].removeprefix(f"s3://{bucket}/"), None)  # (the ingest writes the record anew)
    view = stack.call("api_get_batch.json", key=acme, job_id=view["id"])[1]
    assert view["endpoint"] == "/v1/completions" and view["metadata"] == {"run": "7"}
    # metadata past S3's room for it (or not pairs of strings) is refused before anything is copied
    for wrong in ({str(i): "v" * 200 for i in range(10)}, {"a": 1}, ["a"]):
        status, err, _ = stack.call("api_create_batch.json", key=acme, body={**body, "metadata": wrong})
        assert status == 400 and err["error"]["param"] == "metadata"


def test_a_file_over_the_line_limit_fails_with_a_clear_error(batch_limits, stack, batch_fn, monkeypatch):

    batch_limits(max_lines=3)
    upload, _, _ = batch_fn
    created = upload("batches/input/acme/big.jsonl", "\n".join(line(f"q{i}", f"question {i}") for i in range(4)))
    assert created["status"] == "failed" and stack.queued("BatchJobsQueue") == []
    key = create_key(stack.table, "acme", rpm=100, tpm=100_000)
    view = stack.call("api_get_batch.json", key=key, job_id=created["batch"])[1]
    assert view["errors"]["data"] == [
        {"code": "too_many_lines", "message": "the file has 4 lines; at most 3 per batch: split it"}
    ]


def test_a_file_over_the_size_limit_fails_before_a_line_is_read(batch_limits, stack, batch_fn, monkeypatch):

    batch_limits(max_file_bytes=100)
    upload, _, _ = batch_fn
    created = upload("batches/input/acme/big.jsonl", line("q1", "question") + "\n" + line("q2", "another"))
    assert created["status"] == "failed" and stack.queued("BatchJobsQueue") == []
    view = stack.call(
        "api_get_batch.json", key=create_key(stack.table, "acme", rpm=100, tpm=100_000), job_id=created["batch"]
    )[1]
    [error] = view["errors"]["data"]
    assert error["code"] == "file_too_large" and "at most 100 per batch" in error["message"]


def test_lines_end_at_newlines_only_and_keep_their_numbers(stack, batch_fn):
    upload, tick, read = batch_fn
    # Given a file with CRLF line ends, blank lines, a line whose JSON holds a raw U+2028 and U+0085
    # (JSON allows both in strings), a line that is not UTF-8, and a last line with no line end
    odd = json.dumps(
        {
            "custom_id": "b",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": MODEL,
                "messages": [{"role": "user", "content": "two\u2028three\u0085four"}],
                "max_tokens": 4,
            },
        },
        ensure_ascii=False,
    )
    data = (
        (line("a", "one") + "\r\n\r\n" + odd + "\n\n").encode() + b'{"custom_id": "c\xff"}\n' + line("d", "x").encode()
    )
    boto3.client("s3").put_object(Bucket=stack.refs["ResultsBucket"], Key="batches/input/acme/odd.jsonl", Body=data)
    # When it is read
    created = upload("batches/input/acme/odd.jsonl", None)
    # Then it has four lines, numbered as the file's lines are, the one that is not UTF-8 an error line
    assert created["request_counts"] == {"total": 4, "completed": 0, "failed": 1}
    assert work_all(stack) == 3
    assert tick()["completed"] == [created["batch"]]
    view = stack.call(
        "api_get_batch.json", key=create_key(stack.table, "acme", rpm=100, tpm=100_000), job_id=created["batch"]
    )[1]
    assert [(o["id"], o["custom_id"]) for o in read(view["output_file_uri"])] == [
        ("batch_req_1", "a"),
        ("batch_req_3", "b"),
        ("batch_req_6", "d"),
    ]
    [error] = read(view["error_file_uri"])
    assert error["line"] == 5 and "not UTF-8" in error["error"]["message"]


@pytest.mark.parametrize(
    "bad, says",
    [
        ('{"custom_id": "deep", "body": ' + "[" * 5000 + "]" * 5000 + "}", "more than 128 deep"),
        ('{"custom_id": "long", "body": {"seed": ' + "7" * 5000 + "}}", "not valid JSON here"),  # past 4,300 digits
    ],
)
def test_a_line_python_cannot_read_is_an_error_line_not_a_stuck_batch(stack, batch_fn, bad, says):
    upload, tick, read = batch_fn
    created = upload("batches/input/acme/deep.jsonl", line("ok", "Fine.") + "\n" + bad + "\n")
    assert created["status"] == "in_progress" and created["request_counts"] == {"total": 2, "completed": 0, "failed": 1}
    work_all(stack)
    assert tick()["completed"] == [created["batch"]]
    key = create_key(stack.table, "acme", rpm=100, tpm=100_000)
    [error] = read(stack.call("api_get_batch.json", key=key, job_id=created["batch"])[1]["error_file_uri"])
    assert error["line"] == 2 and says in error["error"]["message"]


@pytest.mark.parametrize("then", ["replaced", "deleted"])
def test_bedrock_records_never_carry_another_files_input(stack, batch_fn, then):
    upload, tick, read = batch_fn
    record = lambda i, text: json.dumps({"recordId": f"r{i}", "modelInput": {"prompt": text, "max_gen_len": 4}})
    key = "batches/input/acme/daily.jsonl"
    created = upload(key, record(1, "first file, line one") + "\n" + record(2, "first file, line two") + "\n")
    # Given its input file replaced under the same name (the next day's file), or deleted, before the output
    if then == "replaced":
        upload(key, record(1, "the second file's prompt") + "\n")
    else:
        boto3.client("s3").delete_object(Bucket=stack.refs["ResultsBucket"], Key=key)
    work_all(stack)
    # Then the batch completes, its records without a modelInput it can no longer read (never another
    # file's prompt under this batch's recordIds, nor a batch stuck in progress on NoSuchKey)
    assert created["batch"] in tick()["completed"]
    out = read(f"s3://{stack.refs['ResultsBucket']}/batches/output/{created['batch']}/output.jsonl")
    assert [(o["recordId"], o["modelInput"]) for o in out] == [("r1", None), ("r2", None)]


def test_a_line_past_the_line_limit_is_an_error_line_never_held_whole(batch_limits, stack, batch_fn, monkeypatch):
    from stratus.batches import lines as batch_lines

    upload, tick, read = batch_fn
    batch_limits(max_line_bytes=300, read_chunk=64)  # (scaled down, with reads of 64 bytes: a line spans many)
    long = json.dumps(
        {
            "custom_id": "long",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": [{"role": "user", "content": "x" * 500}]},
        }
    )
    seen = []
    real = batch_lines.rows
    monkeypatch.setattr(batch_lines, "rows", lambda *a, **kw: (seen.append(len(r.raw)) or r for r in real(*a, **kw)))
    created = upload("batches/input/acme/long.jsonl", line("a", "Short?") + "\n" + long + "\n" + line("b", "Also?"))
    assert created["request_counts"] == {"total": 3, "completed": 0, "failed": 1}
    assert max(seen) == 301  # the long line's first 301 bytes only
    work_all(stack)
    assert tick()["completed"] == [created["batch"]]
    key = create_key(stack.table, "acme", rpm=100, tpm=100_000)
    view = stack.call("api_get_batch.json", key=key, job_id=created["batch"])[1]
    [error] = read(view["error_file_uri"])
    assert error["line"] == 2 and "more than 300 bytes" in error["error"]["message"]
    assert [o["custom_id"] for o in read(view["output_file_uri"])] == ["a", "b"]


def test_uploads_outside_a_tenant_folder_are_ignored(stack, batch_fn):
    upload, _, _ = batch_fn
    assert upload("batches/input/loose.jsonl", line("a", "b")) == {"ignored": "batches/input/loose.jsonl"}


def test_the_files_api_carries_a_batch_in_and_out(stack, batch_fn):
    # POST /v1/files (multipart, events/api_upload_file.json) -> POST /v1/batches -> ingest -> work
    # -> scheduled pass -> GET /v1/files/{output file id}/content; another tenant sees none of it
    upload, tick, _ = batch_fn
    acme = create_key(stack.table, "acme", rpm=100, tpm=100_000)
    status, file, _ = stack.call("api_upload_file.json", key=acme)
    assert status == 200 and file["id"].startswith("file-") and file["purpose"] == "batch" and file["bytes"] > 100
    status, batch, _ = stack.call(
        "api_create_batch.json",
        key=acme,
        body={"input_file_id": file["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"},
    )
    assert status == 200 and batch["input_file_id"] == file["id"]
    upload(batch["input_file_uri"].removeprefix(f"s3://{stack.refs['ResultsBucket']}/"), None)
    work_all(stack)
    tick()
    batch = stack.call("api_get_batch.json", key=acme, job_id=batch["id"])[1]
    assert batch["status"] == "completed" and batch["output_file_id"] == f"file-{batch['id']}-output"
    out = stack.handler(stack.event("api_file_content.json", key=acme, job_id=batch["output_file_id"]), LambdaContext())
    assert out["statusCode"] == 200 and out["headers"]["Content-Type"] == "application/jsonl"
    [line_out] = [json.loads(x) for x in out["body"].splitlines()]
    assert line_out["custom_id"] == "q1" and line_out["response"]["status_code"] == 200
    globex = create_key(stack.table, "globex", rpm=100, tpm=100_000)
    for file_id in (file["id"], batch["output_file_id"]):
        assert stack.call("api_file_content.json", key=globex, job_id=file_id)[0] == 404
    assert stack.call("api_file_content.json", key=acme, job_id="file-../../etc")[0] == 404


def test_uploads_must_be_batch_files_within_the_size_limit(stack):
    acme = create_key(stack.table, "acme", rpm=100, tpm=100_000)
    event = stack.event("api_upload_file.json", key=acme)
    import base64

    wrong = base64.b64decode(event["body"]).replace(b"\r\n\r\nbatch\r\n", b"\r\n\r\nfine-tune\r\n")
    status, body, _ = stack.call("api_upload_file.json", key=acme, body=base64.b64encode(wrong).decode())
    assert status == 400 and "purpose must be 'batch'" in body["error"]["message"]
    status, body, _ = stack.call("api_upload_file.json", key=acme, headers={"content-type": "application/json"})
    assert status == 400 and "multipart/form-data" in body["error"]["message"]
    # a purpose field of another content type is read as text, or refused as unreadable (never a 500)
    for part_type, wanted in (
        ("text/plain; charset=bogus-xx", {200}),
        ("message/rfc822", {400}),
        ("multipart/mixed; boundary=zz", {200, 400}),
    ):  # (a defective multipart reads as text)
        odd = base64.b64decode(event["body"]).replace(
            b'name="purpose"\r\n\r\n', f'name="purpose"\r\nContent-Type: {part_type}\r\n\r\n'.encode()
        )
        status, body, _ = stack.call("api_upload_file.json", key=acme, body=base64.b64encode(odd).decode())
        assert status in wanted, (part_type, body)


def test_any_filename_and_any_bytes_upload_and_come_back_as_they_were(stack):
    import base64

    acme = create_key(stack.table, "acme", rpm=100, tpm=100_000)
    event = stack.event("api_upload_file.json", key=acme)
    raw = base64.b64decode(event["body"])
    name = raw.split(b'filename="', 1)[1].split(b'"', 1)[0]
    content = b'\xff\xfe{"not": "utf-8"}\n'
    start = raw.index(b"\r\n\r\n", raw.index(b'name="file"')) + 4
    body = raw.replace(name, "données-月.jsonl".encode()).replace(raw[start : raw.index(b"\r\n--", start)], content)
    status, file, _ = stack.call("api_upload_file.json", key=acme, body=base64.b64encode(body).decode())
    assert status == 200 and file["filename"] == "données-月.jsonl" and file["bytes"] == len(content)
    out = stack.handler(stack.event("api_file_content.json", key=acme, job_id=file["id"]), LambdaContext())
    assert out["statusCode"] == 200 and out["isBase64Encoded"] and base64.b64decode(out["body"]) == content


def test_a_list_limit_in_other_digits_is_a_400(stack):
    acme = create_key(stack.table, "acme", rpm=100, tpm=100_000)
    event = stack.event("api_list_batches.json", key=acme)
    event["queryStringParameters"], event["rawQueryString"] = {"limit": "²"}, "limit=%C2%B2"
    out = stack.handler(event, LambdaContext())
    assert out["statusCode"] == 400 and "limit" in json.loads(out["body"])["error"]["message"]


def test_a_line_with_a_lone_surrogate_is_an_error_line_not_a_failed_batch(stack, batch_fn):
    upload, tick, read = batch_fn
    created = upload("batches/input/acme/surrogate.jsonl", line("ok", "Fine.") + "\n" + line("bad", "a\ud800b") + "\n")
    assert created["status"] == "in_progress" and created["request_counts"]["failed"] == 1
    work_all(stack)
    assert tick()["completed"] == [created["batch"]]
    key = create_key(stack.table, "acme", rpm=100, tpm=100_000)
    _, view, _ = stack.call("api_get_batch.json", key=key, job_id=created["batch"])
    [error] = read(view["error_file_uri"])
    assert error["custom_id"] == "bad" and "lone UTF-16 surrogate" in error["error"]["message"]


def test_a_line_too_big_to_queue_is_an_error_line(stack, batch_fn):
    upload, tick, read = batch_fn
    created = upload("batches/input/acme/big.jsonl", line("ok", "Fine.") + "\n" + line("big", "é" * 50_000) + "\n")
    assert created["request_counts"]["failed"] == 1
    assert work_all(stack) == 1  # only the small line was queued
    tick()
    key = create_key(stack.table, "acme", rpm=100, tpm=100_000)
    _, view, _ = stack.call("api_get_batch.json", key=key, job_id=created["batch"])
    [error] = read(view["error_file_uri"])
    assert error["custom_id"] == "big" and error["error"]["code"] == "request_too_large"


@pytest.mark.parametrize("tenant", ["..", "a#b", "-x", "a" * 65, "caf\u00e9"])
def test_uploads_under_a_malformed_tenant_folder_are_ignored(stack, batch_fn, tenant):
    upload, _, _ = batch_fn
    out = upload(f"batches/input/{tenant}/q.jsonl", line("q1", "Hi"))
    assert out.get("status") != "in_progress" and stack.queued("BatchJobsQueue") == []


def test_a_redelivered_upload_after_a_crash_between_writes_resumes_the_batch(stack, batch_fn, monkeypatch):
    # Given a run that created the jobs and then died before storing their messages
    from stratus import release

    upload, tick, _read = batch_fn
    monkeypatch.setattr(release, "write_outbox", lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("killed")))
    with pytest.raises(RuntimeError):
        upload("batches/input/acme/crash.jsonl", line("a", "One?") + "\n" + line("b", "Two?") + "\n")
    assert stack.queued("BatchJobsQueue") == []
    monkeypatch.undo()
    # When the event is delivered again
    again = upload("batches/input/acme/crash.jsonl", None)
    # Then the batch resumes: its jobs' messages go out, and it completes
    assert again["status"] == "in_progress" and work_all(stack) == 2
    assert tick()["completed"] == [again["batch"]]


def test_a_transient_s3_error_is_retried_not_a_failed_batch(stack, batch_fn, monkeypatch):
    import sys

    from botocore.exceptions import ClientError

    upload, _tick, _read = batch_fn
    deps = sys.modules["stratus_fn_BatchFunction"].get_deps()  # the batch function's own clients
    calls = []
    original = deps.s3.get_object

    def flaky(**kw):
        calls.append(kw)
        if len(calls) == 1:
            raise ClientError({"Error": {"Code": "SlowDown", "Message": "reduce your request rate"}}, "GetObject")
        return original(**kw)

    monkeypatch.setattr(deps.s3, "get_object", flaky)
    with pytest.raises(ClientError):  # the function fails: EventBridge retries the event
        upload("batches/input/acme/flaky.jsonl", line("a", "Hello?") + "\n")
    again = upload("batches/input/acme/flaky.jsonl", None)
    assert again["status"] == "in_progress" and again["request_counts"]["total"] == 1


def test_one_broken_batch_does_not_stop_the_scheduled_pass(stack, batch_fn):
    upload, tick, _read = batch_fn
    first = upload("batches/input/acme/one.jsonl", line("a", "First?") + "\n")
    second = upload("batches/input/acme/two.jsonl", line("b", "Second?") + "\n")
    work_all(stack)
    boto3.client("s3").delete_object(
        Bucket=stack.refs["ResultsBucket"], Key=f"batches/state/{min(first['batch'], second['batch'])}/lines/00000.json"
    )
    assert tick()["completed"] == [max(first["batch"], second["batch"])]  # the broken one stays open, logged


def test_batches_are_listed_and_found_open_through_indexes_not_growing_items(stack, batch_fn):
    upload, tick, _read = batch_fn
    made = [upload(f"batches/input/acme/f{i}.jsonl", line(f"q{i}", f"Question {i}?") + "\n")["batch"] for i in range(3)]
    upload("batches/input/other/f.jsonl", line("x", "Other tenant?") + "\n")
    key = create_key(stack.table, "acme", rpm=100, tpm=100_000)
    status, listing, _ = stack.call("api_list_batches.json", key=key)
    assert status == 200 and {b["id"] for b in listing["data"]} == set(made)  # only this tenant's
    assert [b["created_at"] for b in listing["data"]] == sorted(
        (b["created_at"] for b in listing["data"]), reverse=True
    )
    assert not [i for i in stack.table.scan()["Items"] if i["pk"].startswith("batches#")]  # no list or set items
    work_all(stack)
    assert sorted(tick()["completed"]) == sorted(made + [upload("batches/input/other/f.jsonl", None)["batch"]])
    assert tick()["completed"] == []  # completed batches leave the open index


# ---- metered release: the batch queue holds a few steps of work, shared evenly between tenants ----


@pytest.fixture
def batch_deps(stack, batch_fn, monkeypatch):
    """The batch function's own Deps, with release settings a test sets (floor 20 by default)."""
    import dataclasses
    import sys

    deps = sys.modules["stratus_fn_BatchFunction"].get_deps()

    def configure(**settings):
        monkeypatch.setattr(deps, "settings", dataclasses.replace(deps.settings, **settings))
        return deps

    configure(batch_release_floor=20)
    return configure


@pytest.fixture
def batch_limits(stack, batch_fn, monkeypatch):
    """Scale the batch function's BatchLimits down for a test: batch_limits(slice_lines=10, ...)."""
    import dataclasses
    import sys

    deps = sys.modules["stratus_fn_BatchFunction"].get_deps()

    def scale(**limits):
        scaled = dataclasses.replace(deps.settings.batches, **limits)
        monkeypatch.setattr(deps, "settings", dataclasses.replace(deps.settings, batches=scaled))
        return deps

    return scale


def take(stack, n: int) -> list[str]:
    """Play a worker that takes up to n batch messages, finishes their jobs and deletes them:
    the tenants of the jobs taken, in order."""
    store, url, tenants = JobStore(stack.table), stack.refs["BatchJobsQueue"], []
    while len(tenants) < n:
        got = stack.sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=min(10, n - len(tenants))).get("Messages", [])
        if not got:
            return tenants
        for m in got:
            body = json.loads(m["Body"])
            if store.transition(body["job_id"], [Status.QUEUED], Status.RUNNING, worker="w"):
                store.complete(body["job_id"], "w", {"text": "ok", "finish_reason": "stop"})
                tenants.append(body["tenant"])
            stack.sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])
    return tenants


def lines(prefix: str, n: int, **kw) -> str:
    return "".join(line(f"{prefix}{i}", f"{prefix} question {i}?", **kw) + "\n" for i in range(n))


def test_released_lines_name_their_tenant_for_sqs_fair_queues(stack, batch_fn):
    upload, _, _ = batch_fn
    upload("batches/input/acme/few.jsonl", lines("a", 3))
    got = stack.sqs.receive_message(
        QueueUrl=stack.refs["BatchJobsQueue"], MaxNumberOfMessages=10, MessageSystemAttributeNames=["All"]
    )
    assert [m["Attributes"]["MessageGroupId"] for m in got["Messages"]] == ["acme"] * 3


def test_two_tenants_batch_files_share_the_queue_evenly(stack, batch_fn, batch_deps):
    upload, tick, _ = batch_fn
    # Given tenant acme's 200-line file (its first 20 lines released: the floor), of which workers
    # took 10, then tenant other's 40-line file
    first = upload("batches/input/acme/big.jsonl", lines("a", 200))
    order = take(stack, 10)
    second = upload("batches/input/other/small.jsonl", lines("b", 40))
    # When workers take ten lines between scheduled passes
    completed = []
    while got := take(stack, 10):
        order += got
        completed += tick()["completed"]
    # Then acme's lines queued before other's file came go first, and from then on the tenants take
    # turns: other's 40 lines are done after ~100 lines in all, not after 240
    assert order[:20] == ["acme"] * 20
    last_other = max(i for i, t in enumerate(order) if t == "other")
    assert last_other < 20 + 2 * 40 + 10, last_other
    window = order[20:100]
    assert 0.4 <= window.count("other") / len(window) <= 0.6, window
    # and every line of both files ran exactly once, and both batches complete
    assert sorted(order) == ["acme"] * 200 + ["other"] * 40
    assert sorted(completed) == sorted([first["batch"], second["batch"]])


def test_tenants_share_the_queue_by_tokens_not_lines(stack, batch_fn, batch_deps):
    upload, tick, _ = batch_fn
    # Given tenant acme's file of long answers (max_tokens 160) draining, then tenant other's file of
    # short ones (max_tokens 16): a line of acme's weighs ~8.6 of other's
    upload(
        "batches/input/acme/long.jsonl",
        "".join(line(f"a{i}", f"a question {i}?", max_tokens=160) + "\n" for i in range(200)),
    )
    order = take(stack, 10)
    upload("batches/input/other/short.jsonl", lines("b", 100))
    # When workers take ten lines between scheduled passes
    while got := take(stack, 10):
        order += got
        tick()
    # Then, once acme's lines queued before other's file are gone, other gets most of the lines
    # (about as many tokens as acme), and every line of both files ran once
    window = order[30:90]
    assert window.count("other") / len(window) >= 0.75, window
    assert sorted(order) == ["acme"] * 200 + ["other"] * 100


def test_a_tenants_batch_budget_meters_its_lines_a_minute_at_a_time(stack, batch_fn, batch_deps, monkeypatch):
    from stratus.keys import set_batch_tpm

    upload, tick, _ = batch_fn
    now = [1_800_000_000.0 + 5]  # five seconds into a minute
    monkeypatch.setattr(batch_deps(), "clock", lambda: now[0])
    # Given tenant acme with a batch budget of 1 token a minute (a line a minute: a fresh minute
    # pays one line, whatever it costs) and tenant other on the stack's budget
    set_batch_tpm(stack.table, "acme", 1)
    upload("batches/input/acme/metered.jsonl", lines("a", 5))
    upload("batches/input/other/free.jsonl", lines("b", 30))
    # When workers take what is queued, and a pass runs within the same minute
    order = take(stack, 100)
    tick()
    order += take(stack, 100)
    # Then acme sent one line and other took the rest of the room
    assert order.count("acme") == 1 and order.count("other") == 30
    # and each new minute sends acme one line more
    for minute in range(1, 5):
        now[0] += 60
        tick()
        assert take(stack, 100) == ["acme"], minute
    # and the charges stand in counters that expire
    counter = stack.table.get_item(Key={"pk": f"brl#acme#{int(now[0] // 60)}"})["Item"]
    assert counter["tokens"] >= 1 and counter["expires_at"] > now[0]


def test_a_pass_reads_the_status_of_released_lines_only(stack, batch_fn, batch_deps, monkeypatch):
    from stratus import batches

    upload, _, _ = batch_fn
    # Given a 30-line batch of which 20 lines were released, 5 of them finished
    upload("batches/input/acme/big.jsonl", lines("a", 30))
    assert len(take(stack, 5)) == 5
    deps = batch_deps(batch_release_floor=0)  # the pass releases nothing more
    read = []
    real = deps.store.statuses
    monkeypatch.setattr(deps.store, "statuses", lambda ids: read.extend(ids) or real(ids))
    # When the pass counts its lines
    batches.advance(deps)
    # Then it read 20 jobs, not 30, and the counts are right
    assert len(read) == 20
    [b], _ = batches.list_recent("acme", deps)
    assert b.counts == {"total": 30, "completed": 5, "failed": 0}


def test_a_pass_reads_only_the_lines_past_those_settled(stack, batch_fn, batch_deps, sliced, monkeypatch):
    from stratus import batches

    upload, tick, read = batch_fn
    # Given a 30-line file read 10 lines a slice, 20 lines released, the first 15 of them finished
    created = upload("batches/input/acme/big.jsonl", lines("a", 30))
    tick(), tick()
    assert len(take(stack, 15)) == 15
    deps = batch_deps(batch_release_floor=0)
    batches.advance(deps)  # counts them: the first 15 lines are settled
    # When the next pass counts
    statuses, parts = [], []
    real_statuses, real_get = deps.store.statuses, deps.s3.get_object
    monkeypatch.setattr(deps.store, "statuses", lambda ids: statuses.extend(ids) or real_statuses(ids))
    monkeypatch.setattr(deps.s3, "get_object", lambda **kw: parts.append(kw["Key"]) or real_get(**kw))
    batches.advance(deps)
    # Then it reads the statuses of the 5 released lines in flight and the two lines files past the
    # first, and the counts are those of every line
    assert len(statuses) == 5 and [p.rsplit("/", 1)[1] for p in parts] == ["00001.json", "00002.json"]
    b = batches.get_any(created["batch"], deps)
    assert (b.settled, b.settled_done) == (15, 15)
    assert b.counts == {"total": 30, "completed": 15, "failed": 0}
    # and the batch completes with every line's answer, in file order
    batch_deps(batch_release_floor=20)
    completed = []
    for _ in range(5):
        take_jobs(stack)
        completed += tick()["completed"]
    assert completed == [created["batch"]]
    view = stack.call("api_get_batch.json", key=sliced, job_id=created["batch"])[1]
    assert view["request_counts"] == {"total": 30, "completed": 30, "failed": 0}
    assert [o["custom_id"] for o in read(view["output_file_uri"])] == [f"a{i}" for i in range(30)]


def test_a_line_that_stays_pending_holds_back_the_reads_of_its_own_lines_file_only(
    stack, batch_fn, batch_deps, sliced, monkeypatch
):
    from stratus import batches

    upload, tick, read = batch_fn
    deps = batch_deps(batch_release_floor=100)  # every line goes as it is read
    # Given a 25-line file read 10 lines a slice (files of 10, 10 and 5 lines): a worker holds its
    # first line, and every other line has finished (one of them FAILED)
    created = upload("batches/input/acme/big.jsonl", lines("a", 25))
    tick(), tick()
    store = JobStore(stack.table)
    for job_id, custom_id in custom_ids(stack, created["batch"]).items():
        assert store.transition(job_id, [Status.QUEUED], Status.RUNNING, worker="w")
        if custom_id == "a7":
            store.transition(job_id, [Status.RUNNING], Status.FAILED, error={"message": "no", "code": "x"})
        elif custom_id != "a0":
            store.complete(job_id, "w", {"text": "ok", "finish_reason": "stop"})
    batches.advance(deps)  # counts them: the second and third files are settled
    # When the next passes count
    statuses, parts = [], []
    real_statuses, real_get = deps.store.statuses, deps.s3.get_object
    monkeypatch.setattr(deps.store, "statuses", lambda ids: statuses.extend(ids) or real_statuses(ids))
    monkeypatch.setattr(deps.s3, "get_object", lambda **kw: parts.append(kw["Key"]) or real_get(**kw))
    for _ in range(2):
        assert batches.advance(deps) == []
    # Then each reads the first lines file only, and the statuses of its 10 lines, and the counts
    # are those of every line
    assert [p.rsplit("/", 1)[1] for p in parts] == ["00000.json"] * 2 and len(statuses) == 20
    b = batches.get_any(created["batch"], deps)
    assert (b.settled, b.settled_parts) == (0, {1: 10, 2: 5})
    assert b.counts == {"total": 25, "completed": 23, "failed": 1}
    # When the held line finishes: the marks move over everything and the batch completes, in file order
    [first] = [j for j, c in custom_ids(stack, created["batch"]).items() if c == "a0"]
    store.complete(first, "w", {"text": "ok", "finish_reason": "stop"})
    assert batches.advance(deps) == [created["batch"]]
    view = stack.call("api_get_batch.json", key=sliced, job_id=created["batch"])[1]
    assert view["request_counts"] == {"total": 25, "completed": 24, "failed": 1}
    assert [o["custom_id"] for o in read(view["output_file_uri"])] == [f"a{i}" for i in range(25) if i != 7]
    assert [e["custom_id"] for e in read(view["error_file_uri"])] == ["a7"]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_counts_are_exact_whatever_order_lines_finish_in(stack, batch_fn, batch_deps, sliced, seed):
    import random

    from stratus import batches

    upload, tick, read = batch_fn
    deps = batch_deps(batch_release_floor=100)
    created = upload("batches/input/acme/big.jsonl", lines("a", 25))
    tick(), tick()
    store, rng = JobStore(stack.table), random.Random(seed)
    jobs = list(custom_ids(stack, created["batch"]).items())
    rng.shuffle(jobs)
    done, failed = set(), set()
    # Lines finish five at a time in a random order, DONE or FAILED; a pass counts after each round
    for round_start in range(0, 25, 5):
        for job_id, custom_id in jobs[round_start : round_start + 5]:
            store.transition(job_id, [Status.QUEUED], Status.RUNNING, worker="w")
            if rng.random() < 0.2:
                store.transition(job_id, [Status.RUNNING], Status.FAILED, error={"message": "no", "code": "x"})
                failed.add(custom_id)
            else:
                store.complete(job_id, "w", {"text": "ok", "finish_reason": "stop"})
                done.add(custom_id)
        finished = batches.advance(deps)
        b = batches.get_any(created["batch"], deps)
        assert b.counts == {"total": 25, "completed": len(done), "failed": len(failed)}
        assert finished == ([created["batch"]] if round_start == 20 else [])
    view = stack.call("api_get_batch.json", key=sliced, job_id=created["batch"])[1]
    order = [f"a{i}" for i in range(25)]
    assert [o["custom_id"] for o in read(view["output_file_uri"])] == [c for c in order if c in done]
    assert [e["custom_id"] for e in read(view["error_file_uri"])] == [c for c in order if c in failed]


def test_a_slower_pass_never_overwrites_a_finished_batchs_counts(stack, batch_fn, batch_deps, monkeypatch):
    from stratus import batches

    upload, _, read = batch_fn
    deps = batch_deps()
    created = upload("batches/input/acme/f.jsonl", lines("a", 6))
    acme = create_key(stack.table, "acme", rpm=100, tpm=100_000)
    real, fired = batches.BatchStore.record_progress, []

    def another_pass_finishes_first(store, batch, *args):
        if not fired:  # this pass has counted (6 pending); another runs to the end before it writes
            fired.append(1)
            take_jobs(stack)
            assert batches.advance(deps) == [created["batch"]]
        return real(store, batch, *args)

    monkeypatch.setattr(batches.BatchStore, "record_progress", another_pass_finishes_first)
    assert batches.advance(deps) == []
    view = stack.call("api_get_batch.json", key=acme, job_id=created["batch"])[1]
    assert view["status"] == "completed" and len(read(view["output_file_uri"])) == 6
    assert view["request_counts"] == {"total": 6, "completed": 6, "failed": 0}  # (not the slower pass's 0 of 6)


def test_a_settled_lines_job_run_again_holds_the_batch_until_it_finishes(stack, batch_fn, batch_deps):
    from stratus import batches

    upload, tick, read = batch_fn
    deps = batch_deps()
    acme = create_key(stack.table, "acme", rpm=100, tpm=100_000)
    created = upload("batches/input/acme/again.jsonl", lines("a", 3))
    # Given a batch whose first line finished and was counted as settled
    assert len(take(stack, 1)) == 1
    batches.advance(deps)
    assert batches.get_any(created["batch"], deps).settled == 1
    # When a no-cache request runs that line's job again, and the other lines finish
    job_id = {c: j for j, c in custom_ids(stack, created["batch"]).items()}["a0"]
    body = json.loads(lines("a", 1))["body"]
    status, reply, _ = stack.call("api_create_job.json", key=acme, body=body, headers={"cache-control": "no-cache"})
    assert status == 202 and reply["id"] == job_id
    assert len(take(stack, 2)) == 2
    # Then the batch waits for it, and completes with its new answer
    assert tick()["completed"] == []
    store = JobStore(stack.table)
    store.transition(job_id, [Status.QUEUED], Status.RUNNING, worker="w")
    store.complete(job_id, "w", {"text": "again", "finish_reason": "stop"})
    assert tick()["completed"] == [created["batch"]]
    output = read(stack.call("api_get_batch.json", key=acme, job_id=created["batch"])[1]["output_file_uri"])
    assert [o["custom_id"] for o in output] == ["a0", "a1", "a2"]
    assert output[0]["response"]["body"]["choices"][0]["message"]["content"] == "again"


def test_the_jobs_a_batch_reads_outlive_a_short_cache_ttl(stack, batch_fn, batch_deps):
    import time

    from stratus import submission
    from stratus.keys import Tenant

    upload, tick, read = batch_fn
    deps = batch_deps(cache_ttl_s=1)
    store = JobStore(stack.table)
    # Given results that stay cache hits for a second: one asked before the batch came, ...
    asked = submission.submit(
        "chat", json.loads(lines("a", 1))["body"], Tenant("acme", 100, 10**6), deps, submission.api(deps.settings)
    )
    store.transition(asked.job_id, [Status.QUEUED], Status.RUNNING, worker="w")
    store.complete(asked.job_id, "w", {"text": "cached", "finish_reason": "stop"})
    # ... and a batch whose first line hits it and whose second line runs
    created = upload("batches/input/acme/slow.jsonl", lines("a", 2))
    assert work_all(stack) == 1
    # When its output is written after the cache TTL has passed
    time.sleep(2.5)
    assert tick()["completed"] == [created["batch"]]
    # Then both answers are in it (the batch kept the jobs it read for its window and a day)
    view = stack.call(
        "api_get_batch.json", key=create_key(stack.table, "acme", rpm=100, tpm=100_000), job_id=created["batch"]
    )[1]
    assert view["request_counts"] == {"total": 2, "completed": 2, "failed": 0}
    assert (
        next(o["response"]["body"]["choices"][0]["message"]["content"] for o in read(view["output_file_uri"]))
        == "cached"
    )
    assert store.get(asked.job_id).expires_at >= time.time() + deps.settings.batch_window_s


def test_a_pass_keeps_stepping_and_sizes_the_queue_to_what_workers_take(stack, batch_fn, batch_deps):
    from stratus import batches

    upload, _, _ = batch_fn
    upload("batches/input/acme/big.jsonl", lines("a", 150))  # 20 released (the floor)
    # Given a pass of 40 s with a step every 10 s, and workers that take 30 lines between steps
    deps = batch_deps(batch_release_floor=20, batch_release_every_s=10.0)
    now = [1000.0]
    taken = []
    deps.clock = lambda: now[0]

    def sleep(seconds):
        now[0] += seconds
        taken.append(len(take(stack, 30)))

    deps.sleep = sleep
    # When the pass runs
    sent = batches.release_for(40, deps)
    # Then it stepped at 0, 10, 20, 30 and 40 s: nothing at first (the floor's 20 were there); after
    # workers took 20 (all there was) the target grew to 40, then to 60 (twice the 30 they took a
    # step), topped up by 40, 50, 30 and the last 10 lines; the queue never ran dry after the first
    assert taken == [20, 30, 30, 30]
    assert sent == 0 + 40 + 50 + 30 + 10
    assert len(take(stack, 1000)) == 20 + sent - sum(taken) == 150 - sum(taken)


def test_a_step_that_dies_before_moving_the_cursor_sends_those_lines_again_and_they_run_once(
    stack, batch_fn, batch_deps, monkeypatch
):
    from stratus import release

    upload, tick, _ = batch_fn
    # Given a batch whose first release step sent 20 lines and died before recording it
    real = release._move_cursor
    monkeypatch.setattr(release, "_move_cursor", lambda *a: (_ for _ in ()).throw(RuntimeError("killed")))
    created = upload("batches/input/acme/crash.jsonl", lines("a", 30))
    monkeypatch.setattr(release, "_move_cursor", real)
    # When the scheduled passes go on
    done, completed = [], []
    for _ in range(10):
        done += take(stack, 100)
        completed += tick()["completed"]
    # Then those 20 lines were sent twice, each job ran once, and the batch completed
    assert len(done) == 30 and completed == [created["batch"]]


# ---- cancelling ------------------------------------------------------------------------------------


def job_statuses(stack, created_batch: str) -> dict[str, str]:
    """custom_id -> its job's status, from the batch's lines file."""
    raw = (
        boto3.client("s3")
        .get_object(Bucket=stack.refs["ResultsBucket"], Key=f"batches/state/{created_batch}/lines/00000.json")["Body"]
        .read()
    )
    store = JobStore(stack.table)
    return {d["custom_id"]: store.get(d["job_id"]).status.value for d in json.loads(raw) if d["job_id"]}


def test_cancelling_a_batch_stops_its_lines_and_writes_the_finished_ones(stack, batch_fn, batch_deps):
    upload, tick, read = batch_fn
    acme = create_key(stack.table, "acme", rpm=100, tpm=100_000)
    # Given a 30-line batch whose first 20 lines were released: workers finished 3 and hold one
    created = upload("batches/input/acme/long.jsonl", lines("a", 30))
    assert len(take(stack, 3)) == 3
    url = stack.refs["BatchJobsQueue"]
    [held] = stack.sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=1, VisibilityTimeout=300)["Messages"]
    running = json.loads(held["Body"])["job_id"]
    store = JobStore(stack.table)
    assert store.transition(running, [Status.QUEUED], Status.RUNNING, worker="w")
    # When its owner cancels it
    status, view, _ = stack.call("api_cancel_batch.json", key=acme, job_id=created["batch"])
    # Then it is cancelling at once, and the next pass cancels every line that has not started
    # (released or not), waits for the running one and releases nothing more
    assert status == 200 and view["status"] == "cancelling" and view["cancelling_at"] > 0
    assert tick()["completed"] == []
    states = job_statuses(stack, created["batch"])
    assert sorted(states.values()) == ["CANCELLED"] * 26 + ["DONE"] * 3 + ["RUNNING"]
    view = stack.call("api_get_batch.json", key=acme, job_id=created["batch"])[1]
    assert view["status"] == "cancelling" and view["request_counts"] == {"total": 30, "completed": 3, "failed": 26}
    assert len(take(stack, 100)) == 0  # the released messages left are dropped: their jobs are cancelled
    # When the running line finishes
    store.complete(running, "w", {"text": "late", "finish_reason": "stop"})
    assert tick()["completed"] == [created["batch"]]
    # Then the batch is cancelled with the 4 finished answers and an error line for each of the 26 others
    view = stack.call("api_get_batch.json", key=acme, job_id=created["batch"])[1]
    assert view["status"] == "cancelled" and view["cancelled_at"] >= view["cancelling_at"]
    assert view["completed_at"] is None and view["request_counts"] == {"total": 30, "completed": 4, "failed": 26}
    assert len(read(view["output_file_uri"])) == 4
    errors = read(view["error_file_uri"])
    assert len(errors) == 26 and {e["error"]["code"] for e in errors} == {"batch_cancelled"}
    assert state_files(stack, created["batch"]) == ["lines/00000.json"]  # the unsent lines' prompts too
    # and cancelling again answers the batch as it is
    again = stack.call("api_cancel_batch.json", key=acme, job_id=created["batch"])
    assert again[0] == 200 and again[1]["status"] == "cancelled"


def test_a_batch_tier_request_that_joined_a_lines_job_keeps_it_through_the_batchs_cancel(stack, batch_fn, batch_deps):
    from stratus.trigger import handle_request

    upload, tick, _ = batch_fn
    deps = batch_deps(requests_tier="batch", trigger_tenant="acme", batch_release_floor=5)
    created = upload("batches/input/acme/f.jsonl", lines("a", 30))  # 5 lines released, 25 in the outbox
    replies = stack.sqs.create_queue(QueueName="orders-replies")["QueueUrl"]
    # Given a requests-queue message (batch tier) identical to a line not yet released
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "a question 25?"}],
        "max_tokens": 16,
        "temperature": 0,
    }
    job_id = handle_request(
        json.dumps({"id": "order-1", "url": "/v1/chat/completions", "body": body, "reply_to": replies}), deps
    )
    store = JobStore(stack.table)
    assert store.get(job_id).batch is None  # adopted: the batch no longer owns it, and it has its own message
    # When the batch is cancelled, and workers take what is queued
    stack.call(
        "api_cancel_batch.json", key=create_key(stack.table, "acme", rpm=100, tpm=100_000), job_id=created["batch"]
    )
    tick()
    assert job_id in take_jobs(stack)
    # Then the request's job ran, its reply still owed to the caller (not CANCELLED under it, which
    # would leave no message for a worker to run it or post the reply)
    done = store.get(job_id)
    assert done.status == Status.DONE and [n["id"] for n in done.notify] == ["order-1"]


def test_only_the_owner_cancels_and_only_an_open_batch(stack, batch_fn):
    upload, tick, _ = batch_fn
    acme, other = (create_key(stack.table, t, rpm=100, tpm=100_000) for t in ("acme", "other"))
    created = upload("batches/input/acme/one.jsonl", line("x", "hello") + "\n")
    assert stack.call("api_cancel_batch.json", key=other, job_id=created["batch"])[0] == 404
    assert stack.call("api_cancel_batch.json", key=acme, job_id="batch_nope")[0] == 404
    work_all(stack)
    assert tick()["completed"] == [created["batch"]]
    status, body, _ = stack.call("api_cancel_batch.json", key=acme, job_id=created["batch"])
    assert status == 409 and "already completed" in body["error"]["message"]


def test_a_job_an_interactive_request_joined_is_not_cancelled_with_the_batch(stack, batch_fn, batch_deps):
    upload, tick, _ = batch_fn
    acme = create_key(stack.table, "acme", rpm=100, tpm=100_000)
    created = upload("batches/input/acme/shared.jsonl", lines("a", 3))
    msgs = stack.queued("BatchJobsQueue")
    store = JobStore(stack.table)
    assert store.promote(msgs[0]["job_id"])  # an identical interactive request joined it
    stack.call("api_cancel_batch.json", key=acme, job_id=created["batch"])
    tick()
    assert store.get(msgs[0]["job_id"]).status == Status.QUEUED  # still runs, for the interactive caller
    assert [store.get(m["job_id"]).status for m in msgs[1:]] == [Status.CANCELLED] * 2


def test_cancelling_a_batch_leaves_another_batchs_identical_lines_to_run(stack, batch_fn):
    upload, tick, read = batch_fn
    acme = create_key(stack.table, "acme", rpm=100, tpm=100_000)
    # Given two batches of one tenant with the same three lines: the second's lines joined the
    # first's jobs (it made none)
    first = upload("batches/input/acme/first.jsonl", lines("a", 3))
    second = upload("batches/input/acme/second.jsonl", lines("a", 3))
    assert len(stack.queued("BatchJobsQueue")) == 3  # (taken out of sight for 300 s)
    # When the first is cancelled, its jobs with it
    stack.call("api_cancel_batch.json", key=acme, job_id=first["batch"])
    assert tick()["completed"] == [first["batch"]]
    tick()  # (the pass may have counted the second batch's lines before it cancelled the first's jobs)
    # Then the second batch runs those lines again, as jobs of its own, and completes with answers
    again = stack.queued("BatchJobsQueue")
    assert len(again) == 3 and {JobStore(stack.table).get(m["job_id"]).batch for m in again} == {second["batch"]}
    work_all_of(stack, again)
    assert tick()["completed"] == [second["batch"]]
    views = {b: stack.call("api_get_batch.json", key=acme, job_id=b)[1] for b in (first["batch"], second["batch"])}
    assert views[first["batch"]]["request_counts"] == {"total": 3, "completed": 0, "failed": 3}
    assert views[second["batch"]]["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
    assert [o["custom_id"] for o in read(views[second["batch"]]["output_file_uri"])] == ["a0", "a1", "a2"]


def test_a_line_whose_shared_job_a_caller_deletes_runs_again(stack, batch_fn):
    upload, tick, _ = batch_fn
    acme = create_key(stack.table, "acme", rpm=100, tpm=100_000)
    # Given a batch line whose job an identical interactive request joined, then deleted
    created = upload("batches/input/acme/one.jsonl", lines("a", 1))
    [msg] = stack.queued("BatchJobsQueue")
    status, reply, _ = stack.call("api_create_job.json", key=acme, body=json.loads(lines("a", 1))["body"])
    assert status == 202 and reply["id"] == msg["job_id"]
    assert stack.call("api_cancel_job.json", key=acme, job_id=msg["job_id"])[0] == 200
    # When the pass counts the batch's lines
    assert tick()["completed"] == []
    # Then the line runs again, as the batch's own job
    [again] = stack.queued("BatchJobsQueue")
    job = JobStore(stack.table).get(again["job_id"])
    assert again["job_id"] == msg["job_id"] and job.status == Status.QUEUED and job.batch == created["batch"]


def test_a_line_whose_job_expired_unstarted_runs_again_while_its_batch_is_young(stack, batch_fn, batch_deps):
    upload, tick, _read = batch_fn
    deps = batch_deps()
    # Given an old batch (its window has passed) and a young one with the same line, which joined
    # the old one's job; the job expired unstarted
    old = upload("batches/input/acme/old.jsonl", lines("a", 1))
    young = upload("batches/input/acme/young.jsonl", lines("a", 1))
    stack.table.update_item(
        Key={"pk": f"batch#{old['batch']}"},
        UpdateExpression="SET created_at = :t",
        ExpressionAttributeValues={":t": int(deps.clock()) - deps.settings.batch_window_s - 60},
    )
    [msg] = stack.queued("BatchJobsQueue")
    store = JobStore(stack.table)
    assert store.transition(
        msg["job_id"],
        [Status.QUEUED],
        Status.EXPIRED,
        error={"message": "waited past its deadline", "type": "server_error", "code": "expired"},
    )
    # When the pass counts their lines
    completed = tick()["completed"]
    # Then the old batch reports its line expired, and the young one runs it again as its own job
    assert completed == [old["batch"]]
    [again] = stack.queued("BatchJobsQueue")
    job = store.get(again["job_id"])
    assert again["job_id"] == msg["job_id"] and job.status == Status.QUEUED and job.batch == young["batch"]
    work_all_of(stack, [again])
    assert tick()["completed"] == [young["batch"]]


def work_all_of(stack, messages: list[dict]) -> None:
    """Play the worker for these (already received) messages."""
    store = JobStore(stack.table)
    for m in messages:
        assert store.transition(m["job_id"], [Status.QUEUED], Status.RUNNING, worker="w")
        store.complete(m["job_id"], "w", {"text": "ok", "finish_reason": "stop"})


def test_a_batch_cancelled_before_its_ingest_never_queues_a_line(stack, batch_fn):
    upload, tick, read = batch_fn
    bucket = stack.refs["ResultsBucket"]
    boto3.client("s3").put_object(Bucket=bucket, Key="batches/files/acme/questions.jsonl", Body=lines("a", 5).encode())
    acme = create_key(stack.table, "acme", rpm=100, tpm=100_000)
    # Given a posted batch (validating) cancelled before the batch function ingested it
    view = stack.call("api_create_batch.json", key=acme)[1]
    assert stack.call("api_cancel_batch.json", key=acme, job_id=view["id"])[1]["status"] == "cancelling"
    # When its upload event arrives, and the pass runs
    upload(view["input_file_uri"].removeprefix(f"s3://{bucket}/"), None)
    assert tick()["completed"] == [view["id"]]
    # Then no job was made, and the batch is cancelled with each line of the file an error line
    assert stack.queued("BatchJobsQueue") == []
    view = stack.call("api_get_batch.json", key=acme, job_id=view["id"])[1]
    assert view["status"] == "cancelled" and view["request_counts"] == {"total": 5, "completed": 0, "failed": 5}
    assert read(view["output_file_uri"]) == []
    assert [(e["custom_id"], e["error"]["code"]) for e in read(view["error_file_uri"])] == [
        (f"a{i}", "batch_cancelled") for i in range(5)
    ]


def test_a_batch_cancelled_while_ingesting_releases_nothing_and_cancels_its_jobs(stack, batch_fn, monkeypatch):
    from stratus import release

    upload, tick, read = batch_fn
    acme = create_key(stack.table, "acme", rpm=100, tpm=100_000)
    # Given an ingest during which the owner cancels (just before the outbox is written)
    real = release.write_outbox

    def cancel_then_write(batch_id, messages, deps, start=0):
        assert stack.call("api_cancel_batch.json", key=acme, job_id=batch_id)[1]["status"] == "cancelling"
        return real(batch_id, messages, deps, start)

    monkeypatch.setattr(release, "write_outbox", cancel_then_write)
    created = upload("batches/input/acme/racing.jsonl", lines("a", 4))
    monkeypatch.setattr(release, "write_outbox", real)
    # Then the ingest kept the cancel (released nothing), and the pass cancels all four jobs
    assert created["status"] == "cancelling" and stack.queued("BatchJobsQueue") == []
    assert tick()["completed"] == [created["batch"]]
    assert sorted(job_statuses(stack, created["batch"]).values()) == ["CANCELLED"] * 4
    view = stack.call("api_get_batch.json", key=acme, job_id=created["batch"])[1]
    assert view["status"] == "cancelled" and len(read(view["error_file_uri"])) == 4


def test_a_cancelled_batch_waits_for_an_ingest_step_that_holds_it(stack, batch_fn, batch_deps):
    from stratus import batches

    acme = create_key(stack.table, "acme", rpm=100, tpm=100_000)
    boto3.client("s3").put_object(
        Bucket=stack.refs["ResultsBucket"], Key="batches/files/acme/questions.jsonl", Body=lines("a", 2).encode()
    )
    # Given a batch whose ingest holds it (a run reading a slice), cancelled meanwhile
    view = stack.call("api_create_batch.json", key=acme)[1]
    deps = batch_deps()
    held_until = int(deps.clock()) + deps.settings.batches.lease_s
    stack.table.update_item(
        Key={"pk": f"batch#{view['id']}"},
        UpdateExpression="SET ingest_until = :u REMOVE pending",
        ExpressionAttributeValues={":u": held_until},
    )
    stack.call("api_cancel_batch.json", key=acme, job_id=view["id"])
    # Then passes wait while the lease lasts (that run may still record lines), and close it after
    assert batches.advance(deps) == []
    deps.clock = lambda: held_until + 1
    assert batches.advance(deps) == [view["id"]]
    assert stack.call("api_get_batch.json", key=acme, job_id=view["id"])[1]["status"] == "cancelled"


# ---- big files: read a slice at a time, over several runs ------------------------------------------


def take_jobs(stack) -> list[str]:
    """Play a worker that takes every batch message there is and finishes its job: the job ids."""
    store, url, ids = JobStore(stack.table), stack.refs["BatchJobsQueue"], []
    while got := stack.sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages", []):
        for m in got:
            job_id = json.loads(m["Body"])["job_id"]
            if store.transition(job_id, [Status.QUEUED], Status.RUNNING, worker="w"):
                store.complete(job_id, "w", {"text": "ok", "finish_reason": "stop"})
                ids.append(job_id)
            stack.sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])
    return ids


def custom_ids(stack, batch_id: str) -> dict[str, str]:
    """job id -> custom_id, from every lines file of the batch."""
    s3, out = boto3.client("s3"), {}
    for obj in s3.list_objects_v2(Bucket=stack.refs["ResultsBucket"], Prefix=f"batches/state/{batch_id}/lines/")[
        "Contents"
    ]:
        for d in json.loads(s3.get_object(Bucket=stack.refs["ResultsBucket"], Key=obj["Key"])["Body"].read()):
            out[d["job_id"]] = d["custom_id"]
    return out


@pytest.fixture
def sliced(batch_limits, stack, batch_deps, monkeypatch) -> str:
    """Files read 10 lines a slice, one slice a run -> tenant acme's key."""

    batch_limits(slice_lines=10)
    batch_deps(batch_ingest_s=0.0)
    return create_key(stack.table, "acme", rpm=100, tpm=100_000)


def test_a_big_file_is_read_a_slice_a_run_and_its_lines_run_while_the_rest_is_read(stack, batch_fn, sliced):
    upload, tick, read = batch_fn
    acme = sliced
    # Given a 25-line file: the upload's run reads its first slice, and its lines are released
    created = upload("batches/input/acme/big.jsonl", lines("a", 25))
    view = stack.call("api_get_batch.json", key=acme, job_id=created["batch"])[1]
    assert view["status"] == "in_progress" and view["request_counts"]["total"] == 25
    ran = take_jobs(stack)
    assert len(ran) == 10
    # When passes go on with the file (a slice each) while workers take what is released
    completed = []
    for _ in range(4):
        completed += tick()["completed"]
        ran += take_jobs(stack)
    completed += tick()["completed"]
    # Then every line ran once, in file order, and the batch completed with 25 answers
    names = custom_ids(stack, created["batch"])
    assert [names[j] for j in ran] == [f"a{i}" for i in range(25)]
    assert completed == [created["batch"]]
    view = stack.call("api_get_batch.json", key=acme, job_id=created["batch"])[1]
    assert view["status"] == "completed" and view["request_counts"] == {"total": 25, "completed": 25, "failed": 0}
    assert [o["custom_id"] for o in read(view["output_file_uri"])] == [f"a{i}" for i in range(25)]


def test_each_slice_reads_the_file_from_where_the_last_one_ended(stack, batch_fn, batch_deps, sliced, monkeypatch):
    upload, tick, _ = batch_fn
    deps = batch_deps()
    reads, real = [], deps.s3.get_object
    monkeypatch.setattr(
        deps.s3,
        "get_object",
        lambda **kw: (
            (reads.append(kw.get("Range", "whole")) if kw["Key"].startswith("batches/input/") else None) or real(**kw)
        ),
    )
    # Given a 25-line file read 10 lines a slice
    text = lines("a", 25)
    upload("batches/input/acme/big.jsonl", text)
    tick(), tick()
    # Then the first run streamed it once to count its lines and read the first slice from the
    # start; each later slice asked S3 for the bytes from the end of the slice before
    starts = [len("".join(text.splitlines(True)[:k]).encode()) for k in (10, 20)]
    assert reads == ["whole", "whole"] + [f"bytes={b}-" for b in starts]


def test_the_output_is_written_a_few_lines_at_a_time(stack, batch_fn, batch_deps, sliced, monkeypatch):
    upload, tick, read = batch_fn
    deps = batch_deps()
    jobs_read, real = [], deps.store.get_many
    monkeypatch.setattr(deps.store, "get_many", lambda ids, **kw: jobs_read.append(len(ids)) or real(ids, **kw))
    # Given a 25-line file read 10 lines a slice, every fourth line a Bedrock record
    bedrock = lambda i: json.dumps({"recordId": f"r{i}", "modelInput": {"prompt": f"Story {i}", "max_gen_len": 4}})
    text = "".join((bedrock(i) if i % 4 == 3 else line(f"a{i}", f"question {i}?")) + "\n" for i in range(25))
    created = upload("batches/input/acme/mixed.jsonl", text)
    # When every line has run
    completed = []
    for _ in range(6):
        completed += tick()["completed"]
        take_jobs(stack)
    # Then the output was written reading the jobs of a few lines (output.GROUP) of a slice at a time,
    # and each Bedrock record carries its own modelInput, read back from the file as the output reached it
    group = output.GROUP
    assert completed == [created["batch"]]
    assert jobs_read == [min(group, n - i) for n in (10, 10, 5) for i in range(0, n, group)]
    view = stack.call("api_get_batch.json", key=sliced, job_id=created["batch"])[1]
    out = read(view["output_file_uri"])
    assert [o.get("custom_id", o.get("recordId")) for o in out] == [
        f"r{i}" if i % 4 == 3 else f"a{i}" for i in range(25)
    ]
    assert [o["modelInput"]["prompt"] for o in out if "recordId" in o] == [f"Story {i}" for i in range(3, 25, 4)]


SAMPLED = {"temperature": 0.8}  # lines that are not cacheable: their jobs' ids come from the batch and the line


def a_run_dies_in_the_second_slice(upload, deps, monkeypatch, **kw) -> str:
    """An upload's run that read the first slice of an 18-line file (lines with `kw`) and died in
    the second, after making its jobs and before recording them -> the batch id."""
    from stratus import batches, release

    real, calls = release.write_outbox, []

    def dies_the_second_time(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("the run was killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(release, "write_outbox", dies_the_second_time)
    with pytest.raises(RuntimeError):
        upload("batches/input/acme/crash.jsonl", lines("a", 18, **kw))
    monkeypatch.setattr(release, "write_outbox", real)
    return batches.list_recent("acme", deps)[0][0].id


@pytest.mark.parametrize("kw", [{}, SAMPLED], ids=["cacheable", "sampled"])
def test_a_run_that_dies_mid_slice_is_taken_over_and_every_line_runs_once(
    batch_limits, stack, batch_fn, batch_deps, monkeypatch, kw
):
    from stratus import batches

    upload, tick, _read = batch_fn
    batch_limits(slice_lines=10)
    deps = batch_deps(batch_ingest_s=1000.0)
    # Given an upload's run that read one slice and died in the second, after creating its jobs
    batch_id = a_run_dies_in_the_second_slice(upload, deps, monkeypatch, **kw)
    # When a pass goes on with it (the run let go of its lease as it died)
    ran = take_jobs(stack)
    assert batches.run_pass(deps)["ingested"] == [batch_id]
    # Then the second slice is read again, its queued jobs go out once more, and each line runs once
    ran += take_jobs(stack)
    assert sorted(custom_ids(stack, batch_id)[j] for j in ran) == sorted(f"a{i}" for i in range(18))
    assert tick()["completed"] == [batch_id]
    # and no job the dead run made is left behind, sampled or not (none QUEUED, keeping its prompt a day)
    made = [i for i in stack.table.scan()["Items"] if i.get("batch_id") == batch_id]
    assert len(made) == 18 and {i["status"] for i in made} == {"DONE"}


def test_a_run_that_dies_before_its_last_write_leaves_a_batch_the_pass_starts(stack, batch_fn, batch_deps, monkeypatch):
    upload, tick, read = batch_fn
    deps = batch_deps()
    real = deps.table.update_item

    def dies_before_the_status(**kw):
        if kw.get("UpdateExpression") == "SET #s = :p":
            raise RuntimeError("the run was killed")
        return real(**kw)

    # Given a run that read the whole file (cursor at the end) and died before the batch went in progress
    monkeypatch.setattr(deps.table, "update_item", dies_before_the_status)
    with pytest.raises(RuntimeError):
        upload("batches/input/acme/small.jsonl", lines("a", 5))
    monkeypatch.setattr(deps.table, "update_item", real)
    # When passes run, they start it, rather than leave it validating for ever with nothing released
    tick()
    assert len(take_jobs(stack)) == 5
    done = tick()["completed"]
    assert (
        len(done) == 1 and len(read(f"s3://{stack.refs['ResultsBucket']}/batches/output/{done[0]}/output.jsonl")) == 5
    )


@pytest.mark.parametrize("kw", [{}, SAMPLED], ids=["cacheable", "sampled"])
def test_a_cancel_before_a_dead_slice_is_redone_cancels_that_slices_jobs(
    batch_limits, stack, batch_fn, batch_deps, monkeypatch, kw
):

    upload, tick, _read = batch_fn
    batch_limits(slice_lines=10)
    deps = batch_deps(batch_ingest_s=1000.0)
    # Given a run that made the second slice's jobs and died before recording them
    first = a_run_dies_in_the_second_slice(upload, deps, monkeypatch, **kw)
    acme = create_key(stack.table, "acme", rpm=100, tpm=100_000)
    # When its owner cancels it before any pass redoes that slice
    assert stack.call("api_cancel_batch.json", key=acme, job_id=first)[1]["status"] == "cancelling"
    take_jobs(stack)
    assert tick()["completed"] == [first]
    # Then none of the jobs that slice made is left QUEUED, never sent and never cancelled
    made = [i for i in stack.table.scan()["Items"] if i.get("batch_id") == first]
    assert not [i for i in made if i["status"] == "QUEUED"] and len(made) == 18
    # and another batch's identical line runs as its own, not joined to an orphan pending for days
    later = upload("batches/input/acme/later.jsonl", line("b", "a question 12?") + "\n")
    take_jobs(stack)
    assert tick()["completed"] == [later["batch"]]


def test_a_slice_never_moves_a_cursor_past_an_outbox_another_run_wrote(stack, batch_fn, batch_deps, monkeypatch):
    from stratus import batches, release

    upload, _, _ = batch_fn
    deps = batch_deps()
    real = release.write_outbox

    def another_run_appends_meanwhile(batch_id, messages, deps_, start):
        real(batch_id, messages, deps_, start=start)
        deps_.table.update_item(
            Key={"pk": f"batch#{batch_id}"},
            UpdateExpression="SET outbox = outbox + :n",
            ExpressionAttributeValues={":n": 3},
        )

    monkeypatch.setattr(release, "write_outbox", another_run_appends_meanwhile)
    # When a run's slice finds the outbox moved under it before it records the slice
    created = upload("batches/input/acme/raced.jsonl", lines("a", 4))
    # Then its cursor does not move: the slice is left to a run that sees the outbox as it is
    b = batches.get_any(created["batch"], deps)
    assert b.ingested == 0 and b.outbox == 3


def test_a_slice_that_outlasts_its_lease_writes_nothing_and_the_next_run_reads_it(
    stack, batch_fn, batch_deps, monkeypatch
):
    from stratus import batches, submission

    upload, tick, read = batch_fn
    deps = batch_deps(batch_ingest_s=0.0)
    now = [1_800_000_000.0]
    monkeypatch.setattr(deps, "clock", lambda: now[0])
    real = submission.submit

    def slow(*args, **kwargs):  # reading the slice's lines takes most of the lease
        now[0] += 6
        return real(*args, **kwargs)

    monkeypatch.setattr(submission, "submit", slow)
    # When a slice of 45 lines takes 270 s of a 310 s lease, past the write margin
    created = upload("batches/input/acme/slow.jsonl", lines("a", 45))
    # Then it wrote no object and did not move the cursor
    s3, prefix = boto3.client("s3"), f"batches/state/{created['batch']}/"
    assert s3.list_objects_v2(Bucket=stack.refs["ResultsBucket"], Prefix=prefix).get("KeyCount", 0) == 0
    assert batches.get_any(created["batch"], deps).ingested == 0
    # and a pass after the lease reads it all, every line queued once, and the batch completes
    monkeypatch.setattr(submission, "submit", real)
    now[0] += deps.settings.batches.lease_s
    tick()
    ran, completed = [], []
    while got := take_jobs(stack):
        ran += got
        completed += tick()["completed"]
    assert len(ran) == len(set(ran)) == 45 and completed == [created["batch"]]
    key = create_key(stack.table, "acme", rpm=100, tpm=100_000)
    view = stack.call("api_get_batch.json", key=key, job_id=created["batch"])[1]
    assert view["request_counts"] == {"total": 45, "completed": 45, "failed": 0}
    assert len(read(view["output_file_uri"])) == 45


def test_a_run_finds_a_batch_another_run_is_reading_and_leaves_it(stack, batch_fn, batch_deps):
    from stratus import batches

    upload, _, _ = batch_fn
    deps = batch_deps()
    boto3.client("s3").put_object(
        Bucket=stack.refs["ResultsBucket"], Key="batches/files/acme/questions.jsonl", Body=lines("a", 3).encode()
    )
    view = stack.call("api_create_batch.json", key=create_key(stack.table, "acme", rpm=100, tpm=100_000))[1]
    stack.table.update_item(
        Key={"pk": f"batch#{view['id']}"},
        UpdateExpression="SET ingest_until = :u, ingester = :other REMOVE pending",
        ExpressionAttributeValues={":u": int(deps.clock()) + deps.settings.batches.lease_s, ":other": "x"},
    )
    # When the upload event arrives while another run holds the batch
    created = upload(view["input_file_uri"].removeprefix(f"s3://{stack.refs['ResultsBucket']}/"), None)
    # Then this run reads nothing: no job, no message
    assert created["status"] == "validating" and stack.queued("BatchJobsQueue") == []
    assert batches.ingest_left(deps.clock() + 100, deps) == []  # nor does a pass while the lease lasts


def test_cancelling_a_big_file_part_read_accounts_for_every_line(stack, batch_fn, batch_deps, sliced):
    from stratus import batches

    upload, tick, read = batch_fn
    batch_deps(batch_ingest_s=0.0, batch_release_floor=0)  # nothing released
    acme = sliced
    # Given a 25-line file of which one slice was read
    created = upload("batches/input/acme/big.jsonl", lines("a", 25))
    # When it is cancelled
    stack.call("api_cancel_batch.json", key=acme, job_id=created["batch"])
    assert tick()["completed"] == [created["batch"]]
    # Then the rest of the file is never read, and each of its 25 lines is an error line, in file order
    assert batches.get_any(created["batch"], batch_deps()).ingested == 10
    view = stack.call("api_get_batch.json", key=acme, job_id=created["batch"])[1]
    assert view["status"] == "cancelled" and view["request_counts"] == {"total": 25, "completed": 0, "failed": 25}
    assert [e["custom_id"] for e in read(view["error_file_uri"])] == [f"a{i}" for i in range(25)]
    assert sorted(job_statuses(stack, created["batch"]).values()) == ["CANCELLED"] * 10


def test_a_cancelled_batch_reads_the_rest_of_its_file_once_when_it_writes_the_output(
    stack, batch_fn, batch_deps, sliced, monkeypatch
):
    from stratus import batches

    upload, _, read = batch_fn
    # Given a 25-line file of which one slice was read, one of its lines running, and a cancel
    created = upload("batches/input/acme/big.jsonl", lines("a", 25))
    [held] = stack.sqs.receive_message(
        QueueUrl=stack.refs["BatchJobsQueue"], MaxNumberOfMessages=1, VisibilityTimeout=300
    )["Messages"]
    running, store = json.loads(held["Body"])["job_id"], JobStore(stack.table)
    assert store.transition(running, [Status.QUEUED], Status.RUNNING, worker="w")
    stack.call("api_cancel_batch.json", key=sliced, job_id=created["batch"])
    deps = batch_deps()
    reads, real_get = [], deps.s3.get_object
    monkeypatch.setattr(deps.s3, "get_object", lambda **kw: reads.append(kw["Key"]) or real_get(**kw))
    # When passes run while the line runs
    for _ in range(3):
        assert batches.advance(deps) == []
    # Then none reads the input file, and the counts name every line of it
    assert not [k for k in reads if k.startswith("batches/input/")]
    view = stack.call("api_get_batch.json", key=sliced, job_id=created["batch"])[1]
    assert view["request_counts"] == {"total": 25, "completed": 0, "failed": 24}
    # When it finishes: the rest of the file is read once, and the output names all 25 lines
    store.complete(running, "w", {"text": "late", "finish_reason": "stop"})
    assert batches.advance(deps) == [created["batch"]]
    assert len([k for k in reads if k.startswith("batches/input/")]) == 1
    view = stack.call("api_get_batch.json", key=sliced, job_id=created["batch"])[1]
    assert view["request_counts"] == {"total": 25, "completed": 1, "failed": 24}
    assert len(read(view["output_file_uri"])) == 1 and len(read(view["error_file_uri"])) == 24


def test_a_pass_reads_the_open_batches_a_hundred_at_a_time_oldest_first(stack, batch_fn, batch_deps, monkeypatch):
    from stratus import batches

    upload, _, _ = batch_fn
    made = []
    for i in range(3):
        made.append(upload(f"batches/input/acme/o{i}.jsonl", lines(f"o{i}-", 2))["batch"])
        stack.table.update_item(
            Key={"pk": f"batch#{made[-1]}"},
            UpdateExpression="SET created_at = :t",
            ExpressionAttributeValues={":t": 1_000 + i},
        )  # distinct ages
    deps = batch_deps()
    calls = {"get_item": 0, "batch_get_item": 0}
    client = deps.table.meta.client
    for name in calls:
        real = getattr(client, name)
        monkeypatch.setattr(
            client, name, lambda real=real, name=name, **kw: calls.__setitem__(name, calls[name] + 1) or real(**kw)
        )
    assert [b.id for b in batches.open_batches(deps)] == made
    assert calls == {"get_item": 0, "batch_get_item": 1}


def test_a_file_past_the_limits_cancelled_before_it_was_read_is_not_read_whole(
    batch_limits, stack, batch_fn, monkeypatch
):
    from stratus.batches import lines as batch_lines

    upload, tick, _ = batch_fn
    batch_limits(max_lines=5, max_file_bytes=1000)  # (the limits scaled down)
    bucket = stack.refs["ResultsBucket"]
    boto3.client("s3").put_object(Bucket=bucket, Key="batches/files/acme/big.jsonl", Body=lines("a", 60).encode())
    acme = create_key(stack.table, "acme", rpm=100, tpm=100_000)
    view = stack.call("api_create_batch.json", key=acme, body={"input_file_id": "big.jsonl"})[1]
    assert stack.call("api_cancel_batch.json", key=acme, job_id=view["id"])[1]["status"] == "cancelling"
    upload(view["input_file_uri"].removeprefix(f"s3://{bucket}/"), None)
    read_rows = []
    real = batch_lines.rows
    monkeypatch.setattr(batch_lines, "rows", lambda *a, **kw: (read_rows.append(1) or r for r in real(*a, **kw)))
    tick()
    # Then the batch is cancelled without its lines read one by one (were all 60 read into one list,
    # past both limits, a 5 GB file copied into the files folder would stop every pass)
    view = stack.call("api_get_batch.json", key=acme, job_id=view["id"])[1]
    assert view["status"] == "cancelled" and view["request_counts"]["total"] == 0 and read_rows == []


def test_batches_are_listed_a_page_at_a_time(stack, batch_fn):
    upload, _, _ = batch_fn
    made = [upload(f"batches/input/acme/p{i}.jsonl", line(f"q{i}", f"Page {i}?") + "\n")["batch"] for i in range(5)]
    key = create_key(stack.table, "acme", rpm=100, tpm=100_000)

    def page(query: dict) -> tuple[int, dict]:
        event = stack.event("api_list_batches.json", key=key)
        event["queryStringParameters"] = query
        event["rawQueryString"] = "&".join(f"{k}={v}" for k, v in query.items())
        out = stack.handler(event, LambdaContext())
        return out["statusCode"], json.loads(out["body"])

    # Pages of two, each from the last id of the one before, give every batch once, newest first
    seen, after, pages = [], None, 0
    while True:
        status, body = page({"limit": "2", **({"after": after} if after else {})})
        assert status == 200 and len(body["data"]) <= 2
        seen += [b["id"] for b in body["data"]]
        pages += 1
        if not body["has_more"]:
            break
        after = body["last_id"]
    assert pages == 3 and sorted(seen) == sorted(made) and len(seen) == 5
    assert page({})[1]["has_more"] is False  # 20 by default
    assert page({"limit": "0"})[0] == 400 and page({"limit": "101"})[0] == 400
    assert page({"after": "batch_" + "0" * 24})[0] == 404


def test_a_file_replaced_while_it_is_read_fails_its_batch_instead_of_mixing_two_files(stack, batch_fn, sliced):
    upload, tick, _ = batch_fn
    acme = sliced
    # Given a 25-line file of which one slice was read, then a new version uploaded under its name
    created = upload("batches/input/acme/v.jsonl", lines("a", 25))
    boto3.client("s3").put_object(
        Bucket=stack.refs["ResultsBucket"], Key="batches/input/acme/v.jsonl", Body=lines("b", 25).encode()
    )
    # When a pass goes on reading it
    tick()
    # Then the batch fails saying why, and no line of the new version became one of its jobs
    view = stack.call("api_get_batch.json", key=acme, job_id=created["batch"])[1]
    assert view["status"] == "failed" and view["errors"]["data"][0]["code"] == "input_changed"
    assert set(custom_ids(stack, created["batch"]).values()) == {f"a{i}" for i in range(10)}
    # and the jobs its first slice made are cancelled, their queued prompts (the outbox) deleted
    assert sorted(job_statuses(stack, created["batch"]).values()) == ["CANCELLED"] * 10
    assert state_files(stack, created["batch"]) == ["lines/00000.json"]


def test_a_sampled_lines_job_its_tenant_cancelled_ends_its_line_and_leaves_no_other_job(stack, batch_fn, batch_deps):
    upload, tick, _read = batch_fn
    acme = create_key(stack.table, "acme", rpm=100, tpm=100_000)
    created = upload("batches/input/acme/sampled.jsonl", lines("s", 3, **SAMPLED))
    batch_id = created["batch"]
    # Given a sampled line's job, which its tenant cancels (its id is the line's own: the tenant may work it out)
    job_id = {c: j for j, c in custom_ids(stack, batch_id).items()}["s1"]
    assert stack.call("api_cancel_job.json", key=acme, job_id=job_id)[0] == 200
    # When the other lines finish and passes run
    assert len(take(stack, 3)) == 2
    for _ in range(2):
        tick()
    # Then the batch completes, that line an error, and no other job was made for it (not a job with
    # an empty prompt on every pass: a finished sampled job keeps no prompt to run again)
    view = stack.call("api_get_batch.json", key=acme, job_id=batch_id)[1]
    assert view["status"] == "completed" and view["request_counts"] == {"total": 3, "completed": 2, "failed": 1}
    made = [i for i in stack.table.scan()["Items"] if i.get("batch_id") == batch_id]
    assert sorted(i["status"] for i in made) == ["CANCELLED", "DONE", "DONE"]


def test_a_run_that_lags_behind_never_makes_a_finished_line_job_again(stack, batch_fn, batch_deps):
    from stratus import submission
    from stratus.keys import Tenant

    upload, _tick, _read = batch_fn
    deps = batch_deps()
    created = upload("batches/input/acme/lagging.jsonl", lines("s", 2, **SAMPLED))
    job_id = {c: j for j, c in custom_ids(stack, created["batch"]).items()}["s0"]
    store = JobStore(stack.table)
    store.transition(job_id, [Status.QUEUED], Status.FAILED, error={"message": "x", "code": "worker_failed"})
    # When a run that lost its lease long ago submits that line again
    sub = submission.submit(
        "chat",
        json.loads(lines("s", 1, **SAMPLED))["body"],
        Tenant("acme", 0, 0),
        deps,
        submission.batch_line(deps.settings, created["batch"], 1),
    )
    # Then it joins the finished job, which keeps its failure (not a fresh QUEUED job with no message,
    # which would hold the batch in progress until it expired)
    assert sub.job_id == job_id and not sub.created
    assert store.get(job_id).status == Status.FAILED and store.get(job_id).error["code"] == "worker_failed"


def test_a_batch_message_sqs_fails_on_its_side_is_sent_again_and_one_it_refuses_fails_its_job(
    stack, batch_fn, batch_deps, monkeypatch
):
    from stratus import release
    from stratus.contracts import QueueMessage
    from stratus.errors import Unavailable

    deps = batch_deps()
    upload, _, _ = batch_fn
    created = upload("batches/input/acme/sent.jsonl", lines("s", 3))
    while take(stack, 10):  # (the upload released the lines: drain them, they are sent again below)
        pass
    store = JobStore(stack.table)
    jobs = sorted(custom_ids(stack, created["batch"]), key=lambda j: custom_ids(stack, created["batch"])[j])
    for j in jobs:  # back to QUEUED, as lines not yet sent
        stack.table.update_item(
            Key={"pk": j},
            UpdateExpression="SET #s = :q",
            ExpressionAttributeNames={"#s": "status"},
            ExpressionAttributeValues={":q": "QUEUED"},
        )
    bodies = [QueueMessage(j, "acme", store.get(j).request, 0.0, 10**10, tier="batch").to_body() for j in jobs]
    real, rounds = deps.sqs.send_message_batch, []

    def faults(QueueUrl, Entries):
        rounds.append([e["Id"] for e in Entries])
        failed = [{"Id": "0", "SenderFault": False, "Code": "InternalError"}] if len(rounds) == 1 else []
        failed += [{"Id": "1", "SenderFault": True, "Code": "InvalidMessageContents"}] if len(rounds) == 1 else []
        sent = real(QueueUrl=QueueUrl, Entries=[e for e in Entries if e["Id"] not in {f["Id"] for f in failed}])
        return {**sent, "Failed": failed}

    monkeypatch.setattr(deps.sqs, "send_message_batch", faults)
    monkeypatch.setattr(deps, "sleep", lambda s: None)
    # When SQS fails line 0's message on its side once and refuses line 1's as the sender's fault
    release.send(bodies, deps, "acme")
    # Then line 0's is sent again (its job not FAILED, the line not an error), line 1's job fails visibly
    assert rounds == [["0", "1", "2"], ["0"]]
    assert [store.get(j).status for j in jobs] == [Status.QUEUED, Status.FAILED, Status.QUEUED]
    assert store.get(jobs[1]).error["code"] == "enqueue_failed"
    assert sorted(
        json.loads(m["Body"])["job_id"]
        for m in stack.sqs.receive_message(QueueUrl=stack.refs["BatchJobsQueue"], MaxNumberOfMessages=10)["Messages"]
    ) == sorted([jobs[0], jobs[2]])
    # and one that keeps failing raises: the step's cursor stays, the next step sends it again
    monkeypatch.setattr(
        deps.sqs,
        "send_message_batch",
        lambda QueueUrl, Entries: {
            "Successful": [],
            "Failed": [{"Id": e["Id"], "SenderFault": False, "Code": "InternalError"} for e in Entries],
        },
    )
    with pytest.raises(Unavailable):
        release.send(bodies[2:], deps, "acme")
    assert store.get(jobs[2]).status == Status.QUEUED
