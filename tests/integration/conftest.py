"""The api function under moto, with the table and queues created from template.yaml itself."""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest

from support.template import ROOT, load_template, resolve

EVENTS = ROOT / "events"


@dataclass
class LambdaContext:
    function_name: str = "stratus-api"
    memory_limit_in_mb: int = 512
    invoked_function_arn: str = "arn:aws:lambda:us-east-1:123456789012:function:stratus-api"
    aws_request_id: str = "test-request"


def create_resources(template: dict, region: str) -> dict:
    """Create every DynamoDB table and SQS queue the template declares; returns the Ref/GetAtt map."""
    refs: dict = {}
    ddb, sqs = boto3.client("dynamodb", region_name=region), boto3.client("sqs", region_name=region)
    for name, res in template["Parameters"].items():
        refs[name] = str(res.get("Default", ""))
    resources = template["Resources"]
    for name, res in resources.items():  # queues first: redrive policies point at DLQs
        if res["Type"] == "AWS::SQS::Queue" and "RedrivePolicy" not in res.get("Properties", {}):
            _queue(sqs, name, res["Properties"], refs)
    for name, res in resources.items():
        props = res.get("Properties", {})
        if res["Type"] == "AWS::SQS::Queue" and "RedrivePolicy" in props:
            _queue(sqs, name, props, refs)
        elif res["Type"] == "AWS::DynamoDB::Table":
            table = f"stratus-{name}"
            ddb.create_table(TableName=table, KeySchema=props["KeySchema"], BillingMode=props["BillingMode"],
                             AttributeDefinitions=props["AttributeDefinitions"])
            ttl = props["TimeToLiveSpecification"]
            ddb.update_time_to_live(TableName=table, TimeToLiveSpecification={
                "AttributeName": ttl["AttributeName"], "Enabled": ttl["Enabled"]})
            refs[name] = table
    return refs


def _queue(sqs, name: str, props: dict, refs: dict) -> None:
    attrs = {k: str(v) for k, v in props.items() if k in ("VisibilityTimeout", "MessageRetentionPeriod")}
    if "RedrivePolicy" in props:
        attrs["RedrivePolicy"] = json.dumps(resolve(props["RedrivePolicy"], refs))
    url = sqs.create_queue(QueueName=f"stratus-{name}", Attributes=attrs)["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    refs[name], refs[(name, "Arn")], refs[(name, "QueueName")] = url, arn, f"stratus-{name}"


def load_function(name: str):
    path = ROOT / "functions" / name / "app.py"
    spec = importlib.util.spec_from_file_location(f"functions_{name}_app", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@dataclass
class Stack:
    refs: dict
    table: object
    sqs: object
    handler: object
    module: object

    def event(self, name: str, *, body=None, key: str | None = None, job_id: str | None = None,
              headers: dict | None = None) -> dict:
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

    def queued(self) -> list[dict]:
        url = self.refs["JobsQueue"]
        msgs = []
        while True:
            got = self.sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=300).get("Messages", [])
            if not got:
                return msgs
            msgs += [json.loads(m["Body"]) for m in got]


@pytest.fixture
def stack(monkeypatch):
    from moto import mock_aws

    region = "us-east-1"
    for k, v in {"AWS_DEFAULT_REGION": region, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "POWERTOOLS_TRACE_DISABLED": "1", "POWERTOOLS_METRICS_NAMESPACE": "Stratus",
                 "POWERTOOLS_SERVICE_NAME": "stratus"}.items():
        monkeypatch.setenv(k, v)
    with mock_aws():
        template = load_template()
        refs = create_resources(template, region)
        env = resolve(template["Globals"]["Function"]["Environment"]["Variables"], refs)
        env.update({"STRATUS_SYNC_WAIT_S": "0.3", "STRATUS_POLL_INTERVAL_S": "0.05"})  # keep tests quick
        for k, v in env.items():
            monkeypatch.setenv(k, str(v))
        from stratus.settings import get_settings

        get_settings.cache_clear()
        module = load_function("api")
        module.get_deps.cache_clear()
        table = boto3.resource("dynamodb", region_name=region).Table(refs["JobsTable"])
        yield Stack(refs, table, boto3.client("sqs", region_name=region), module.lambda_handler, module)
        get_settings.cache_clear()
