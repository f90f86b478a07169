"""Read template.yaml and act on it: create its tables and queues, build each function's
environment, load and invoke a function's handler the way Lambda would.

The template stays the source of truth: tests, `stratus invoke` and the benchmarks all build
what it declares, through the same boto3 calls as AWS (only the endpoint differs).
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import os
import re
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[3]
PSEUDO_PARAMETERS = {"AWS::StackName": "stratus"}  # where refs do not say (create_resources: its prefix)


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml's parser where PyYAML has it
    pass


def _tag(loader, suffix, node):
    name = "Ref" if suffix == "Ref" else f"Fn::{suffix}"
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
        if suffix == "GetAtt":
            value = value.split(".", 1)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    return {name: value}


_Loader.add_multi_constructor("!", _tag)


def load_template(path: Path = ROOT / "template.yaml") -> dict:
    """The template as a dict of its own (callers may change it), parsed once per version of the file."""
    path = Path(path).resolve()
    return copy.deepcopy(_parsed(path, path.stat().st_mtime_ns))


@functools.lru_cache(maxsize=8)
def _parsed(path: Path, mtime_ns: int) -> dict:  # (tests load the template for every test)
    return yaml.load(path.read_text(), Loader=_Loader)


def resolve(value, refs: dict):
    """Replace {"Ref": X} / {"Fn::GetAtt": [X, A]} with refs[X] / refs[(X, A)], and an Fn::Sub
    text's ${X} / ${X.A} with the same."""
    if isinstance(value, dict) and len(value) == 1:
        ((k, v),) = value.items()
        if k == "Ref":
            return refs[v]
        if k == "Fn::GetAtt":
            return refs[tuple(v)]
        if k == "Fn::Sub" and isinstance(v, str):
            return re.sub(
                r"\$\{([^}!.]+)(?:\.([^}]+))?\}", lambda m: str(refs[m.group(1) if not m.group(2) else m.groups()]), v
            )
    if isinstance(value, dict):
        return {k: resolve(v, refs) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, refs) for v in value]
    return value


def _condition(expr, template: dict, params: dict) -> bool | str:
    """Evaluate a Conditions expression (Equals, Not, And, Or, Condition, Ref to parameters)."""
    if isinstance(expr, dict):
        ((k, v),) = expr.items()
        ops = {
            "Fn::Equals": lambda a: _condition(a[0], template, params) == _condition(a[1], template, params),
            "Fn::Not": lambda a: not _condition(a[0], template, params),
            "Fn::And": lambda a: all(_condition(x, template, params) for x in a),
            "Fn::Or": lambda a: any(_condition(x, template, params) for x in a),
            "Condition": lambda a: _condition(template["Conditions"][a], template, params),
            "Ref": lambda a: params[a],
        }
        return ops[k](v)
    return str(expr)


def active(template: dict, params: dict | None = None) -> dict:
    """The template without the resources whose Condition is false for these parameters
    (defaults overlaid with `params`), as CloudFormation would deploy it."""
    values = {**parameter_defaults(template), **(params or {})}
    out = dict(template)
    out["Resources"] = {
        n: r
        for n, r in template["Resources"].items()
        if "Condition" not in r or _condition(template["Conditions"][r["Condition"]], template, values)
    }
    return out


def parameter_defaults(template: dict) -> dict:
    return {name: str(p.get("Default", "")) for name, p in template.get("Parameters", {}).items()}


def create_resources(template: dict, *, prefix: str = "stratus", session=None, parameters: dict | None = None) -> dict:
    """Create every DynamoDB table, SQS queue and S3 bucket the template declares; returns the
    Ref/GetAtt map, parameters included (`parameters` overrides defaults, as `sam deploy
    --parameter-overrides` does). (Bucket policies, encryption and lifecycle are AWS's concern.)"""
    import boto3

    session = session or boto3.Session()
    ddb, sqs, s3 = session.client("dynamodb"), session.client("sqs"), session.client("s3")
    refs = {**parameter_defaults(template), **(parameters or {}), "AWS::StackName": prefix}
    resources = active(template, parameters)["Resources"]
    ordered = sorted(resources.items(), key=lambda kv: "RedrivePolicy" in kv[1].get("Properties", {}))  # DLQs first
    for name, res in ordered:
        props = res.get("Properties", {})
        if res["Type"] == "AWS::SQS::Queue":
            attrs = {k: str(v) for k, v in props.items() if k in ("VisibilityTimeout", "MessageRetentionPeriod")}
            if "RedrivePolicy" in props:
                attrs["RedrivePolicy"] = json.dumps(resolve(props["RedrivePolicy"], refs))
            url = sqs.create_queue(QueueName=f"{prefix}-{name}", Attributes=attrs)["QueueUrl"]
            arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
            refs[name], refs[(name, "Arn")], refs[(name, "QueueName")] = url, arn, f"{prefix}-{name}"
        elif res["Type"] == "AWS::DynamoDB::Table":
            table = f"{prefix}-{name}"
            extra = (
                {"GlobalSecondaryIndexes": props["GlobalSecondaryIndexes"]} if "GlobalSecondaryIndexes" in props else {}
            )
            ddb.create_table(
                TableName=table,
                KeySchema=props["KeySchema"],
                BillingMode=props["BillingMode"],
                AttributeDefinitions=props["AttributeDefinitions"],
                **extra,
            )
            ttl = props.get("TimeToLiveSpecification")
            if ttl:
                ddb.update_time_to_live(
                    TableName=table,
                    TimeToLiveSpecification={"AttributeName": ttl["AttributeName"], "Enabled": ttl["Enabled"]},
                )
            refs[name] = table
        elif res["Type"] == "AWS::S3::Bucket":
            bucket = f"{prefix}-{name}".lower()
            region = s3.meta.region_name
            s3.create_bucket(
                Bucket=bucket,
                **({} if region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": region}}),
            )
            refs[name], refs[(name, "Arn")] = bucket, f"arn:aws:s3:::{bucket}"
    return refs


def function_environment(template: dict, function: str | None, refs: dict) -> dict[str, str]:
    """Globals' variables overlaid with the function's own (None: Globals only), references resolved."""
    env = dict(template.get("Globals", {}).get("Function", {}).get("Environment", {}).get("Variables", {}))
    if function is not None:
        props = template["Resources"][function]["Properties"]
        env.update(props.get("Environment", {}).get("Variables", {}))
    return {k: str(v) for k, v in resolve(env, {**PSEUDO_PARAMETERS, **refs}).items()}


def function_dir(template: dict, function: str) -> Path:
    return ROOT / template["Resources"][function]["Properties"]["CodeUri"]


def event_handler(template: dict, function: str) -> str:
    """ "module.function" that takes the function's events: its Handler, or for a function run by
    the Lambda Web Adapter (whose Handler is a start script) its Metadata Stratus.EventHandler."""
    res = template["Resources"][function]
    return res.get("Metadata", {}).get("Stratus", {}).get("EventHandler") or res["Properties"]["Handler"]


def web_adapter(template: dict, function: str) -> bool:
    """Does the function run under the AWS Lambda Web Adapter (a web server behind its handler)?"""
    env = template["Resources"][function]["Properties"].get("Environment", {}).get("Variables", {})
    return env.get("AWS_LAMBDA_EXEC_WRAPPER") == "/opt/bootstrap"


def load_handler(template: dict, function: str):
    """Import the function's module from its CodeUri (fresh each call) and return its event handler."""
    module_name, attr = event_handler(template, function).rsplit(".", 1)
    path = function_dir(template, function) / f"{module_name}.py"
    spec = importlib.util.spec_from_file_location(f"stratus_fn_{function}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return getattr(module, attr), module


@dataclass
class LambdaContext:
    """What a handler (and Powertools' logger) reads from Lambda's context object."""

    function_name: str = "stratus-local"
    memory_limit_in_mb: int = 512
    invoked_function_arn: str = "arn:aws:lambda:local:000000000000:function:stratus-local"
    aws_request_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def get_remaining_time_in_millis(self) -> int:
        return 29_000


def apply_environment(env: dict[str, str]) -> None:
    os.environ.update(env)
    from stratus.settings import get_settings

    get_settings.cache_clear()  # settings are read once per "cold start"
