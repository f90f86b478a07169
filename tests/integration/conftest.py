"""The api function under moto, with the table and queues created from template.yaml itself
(stratus_local.template, the same code local mode uses)."""

from __future__ import annotations

import copy
import dataclasses
import json
import threading
from dataclasses import dataclass

import boto3
import pytest

from stratus.keys import create_key
from stratus.settings import Settings
from stratus_engine.engine import Engine
from stratus_local.template import (
    ROOT,
    LambdaContext,
    apply_environment,
    create_resources,
    function_environment,
    load_handler,
    load_template,
)

EVENTS = ROOT / "events"


@dataclass
class Stack:
    refs: dict
    table: object
    sqs: object
    handler: object
    module: object

    def event(
        self, name: str, *, body=None, key: str | None = None, job_id: str | None = None, headers: dict | None = None
    ) -> dict:
        e = copy.deepcopy(json.loads((EVENTS / name).read_text()))
        if body is not None:
            e["body"] = json.dumps(body) if not isinstance(body, str) else body
        if key is not None:
            e["headers"]["authorization"] = f"Bearer {key}"
        if job_id is not None:
            e["rawPath"] = e["rawPath"].replace("JOB_ID", job_id)
            e["requestContext"]["http"]["path"] = e["rawPath"]
            e["pathParameters"] = {"id": job_id}
        e["headers"].update(headers or {})
        return e

    def call(self, name: str, **kwargs) -> tuple[int, dict, dict]:
        out = self.handler(self.event(name, **kwargs), LambdaContext())
        return out["statusCode"], json.loads(out["body"]), {k.lower(): v for k, v in out.get("headers", {}).items()}

    def queued(self, queue: str = "JobsQueue") -> list[dict]:
        """The messages waiting in a jobs queue (JobsQueue: interactive; BatchJobsQueue: batch)."""
        url = self.refs[queue]
        msgs = []
        while True:
            got = self.sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=300).get(
                "Messages", []
            )
            if not got:
                return msgs
            msgs += [json.loads(m["Body"]) for m in got]


@pytest.fixture
def stack(monkeypatch):
    from moto import mock_aws

    region = "us-east-1"
    for k, v in {
        "AWS_DEFAULT_REGION": region,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "POWERTOOLS_TRACE_DISABLED": "1",
        "POWERTOOLS_METRICS_NAMESPACE": "Stratus",
        "POWERTOOLS_SERVICE_NAME": "stratus",
    }.items():
        monkeypatch.setenv(k, v)
    with mock_aws():
        template = load_template()
        refs = create_resources(template)
        env = function_environment(template, "ApiFunction", refs)
        env.update({"STRATUS_SYNC_WAIT_S": "0.3", "STRATUS_POLL_INTERVAL_S": "0.05"})  # keep tests quick
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        apply_environment({})
        handler, module = load_handler(template, "ApiFunction")
        table = boto3.resource("dynamodb", region_name=region).Table(refs["JobsTable"])
        yield Stack(refs, table, boto3.client("sqs", region_name=region), handler, module)
        module.shut_down()  # (its wake queue's reader stops)
        apply_environment({})


@pytest.fixture
def key(stack):
    return create_key(stack.table, "acme", rpm=10_000, tpm=10_000_000)


@pytest.fixture
def make_worker(stack, tiny):
    """Start workers in threads; stop and join them at the end of the test."""
    from stratus_worker.worker import Worker

    started: list[tuple[Worker, threading.Thread]] = []
    settings = dataclasses.replace(
        Settings.from_env(),
        model_dir=str(tiny.dirs["int4"]),
        max_batch=4,
        visibility_s=3,
        heartbeat_s=0.5,
        cancel_check_s=0.05,
        drain_s=5.0,
    )

    def start(engine: Engine | None = None, sqs=None, run: bool = True, **overrides) -> Worker:
        """A worker serving in a thread; with run=False, one the test drives by hand (poll, ...)."""
        engine = engine or Engine.from_dir(tiny.dirs["int4"], threads=1, max_batch=4, initial_capacity=16)
        w = Worker(
            engine,
            dataclasses.replace(settings, **overrides),
            sqs=sqs or boto3.client("sqs"),
            table=boto3.resource("dynamodb").Table(stack.refs["JobsTable"]),
            s3=boto3.client("s3"),
            stream_table=boto3.resource("dynamodb").Table(stack.refs["StreamTable"]),
            worker_id=f"w{len(started)}",
        )
        if run:
            t = threading.Thread(target=w.run, daemon=True)
            t.start()
            started.append((w, t))
        return w

    yield start
    for w, _ in started:
        w.stop()
    for _, t in started:
        t.join(timeout=15)
