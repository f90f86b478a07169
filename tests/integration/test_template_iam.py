"""template.yaml and its nested stacks, translated by the SAM translator the way `sam deploy`
would: every function and task role names only the resources and actions it uses.

Local paths (CodeUri, ContentUri, nested Location) become placeholder S3 locations first, as
`sam package` would make them.
"""

from __future__ import annotations

import copy
import re

import pytest

from stratus_local.template import ROOT, load_template

# role -> the logical ids its statements may name (in this template, or the nested stack's parameters)
EXPECTED = {
    "ApiRole": {"ApiLogs", "JobsTable", "StreamTable", "JobsQueue", "BatchJobsQueue", "ResultsBucket"},
    "DlqRole": {
        "DlqLogs",
        "JobsDeadLetterQueue",
        "BatchJobsDeadLetterQueue",
        "JobsTable",
        "ReplyQueuePattern",
        "ResultsBucket",
    },
    "BatchRole": {"BatchLogs", "JobsTable", "BatchJobsQueue", "BatchEventsDeadLetterQueue", "ResultsBucket"},
    "TriggerRole": {
        "TriggerLogs",
        "RequestsQueue",
        "JobsTable",
        "JobsQueue",
        "BatchJobsQueue",
        "ReplyQueuePattern",
        "ResultsBucket",
    },
    "DispatchRole": {
        "DispatchLogs",
        "JobsQueue",
        "BatchJobsQueue",
        "ResultsBucket",
        "SageMakerWorkers",
        "JobsTable",
        "ReplyQueuePattern",
    },
}
NESTED_EXPECTED = {
    "ecs-workers.yaml": {
        "TaskRole": {
            "JobsQueueArn",
            "BatchJobsQueueArn",
            "ReplyQueuePattern",
            "WakeQueuePattern",
            "JobsTableArn",
            "StreamTableArn",
            "BucketName",
            "ModelUri",  # its own model's folder only
        }
    },
    "sagemaker-async.yaml": {
        "ExecutionRole": {
            "ReplyQueuePattern",
            "WakeQueuePattern",
            "JobsTableArn",
            "StreamTableArn",
            "BucketName",
            "ModelUri",
        }
    },
}
# actions that have no resource-level permissions in IAM, so "*" is the only possible resource
STAR_OK = {"xray:PutTraceSegments", "xray:PutTelemetryRecords", "ecr:GetAuthorizationToken", "cloudwatch:PutMetricData"}


def translate(template: dict) -> dict:
    from samtranslator.translator.transform import transform

    t = copy.deepcopy(template)
    for res in t["Resources"].values():
        props = res.get("Properties", {})
        for key in ("CodeUri", "ContentUri"):
            if isinstance(props.get(key), str):
                props[key] = f"s3://placeholder/{props[key].strip('/')}.zip"
        if res["Type"] == "AWS::Serverless::Application":
            props["Location"] = f"https://s3.amazonaws.com/placeholder/{props['Location']}"

    class NoManagedPolicies:
        def load(self) -> dict:
            return {}

    return transform(t, {}, NoManagedPolicies())


def names(value) -> set[str]:
    """Logical ids (resources or parameters) a Resource value refers to."""
    if isinstance(value, list):
        return set().union(*(names(v) for v in value)) if value else set()
    if isinstance(value, dict):
        ((k, v),) = value.items()
        if k == "Ref":
            return {v}
        if k == "Fn::GetAtt":
            return {v[0] if isinstance(v, list) else v.split(".")[0]}
        if k == "Fn::Sub":
            text, local = (v, {}) if isinstance(v, str) else v
            named = {m.split(".")[0] for m in re.findall(r"\$\{([^}]+)\}", text) if not m.startswith("AWS::")}
            return (named - set(local)) | names(list(local.values()))
        if k == "Fn::If":
            return names(v[1:])
        if k in ("Fn::Select", "Fn::Split"):
            return names(v[1])
    return set()


def statements(role: dict) -> list[dict]:
    return [st for p in role["Properties"].get("Policies", []) for st in p["PolicyDocument"]["Statement"]]


@pytest.fixture(scope="module")
def translated(monkeypatch_module):
    return translate(load_template())


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
    yield mp
    mp.undo()


def check_role(name: str, role: dict, expected: set[str]) -> None:
    props = role["Properties"]
    assert not props.get("ManagedPolicyArns"), f"{name} has managed policies {props.get('ManagedPolicyArns')}"
    named = set()
    for st in statements(role):
        actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
        assert all("*" not in a for a in actions), f"{name}: wildcard action in {actions}"
        if st["Resource"] == "*":
            assert set(actions) <= STAR_OK, f"{name}: {actions} on every resource"
        else:
            named |= names(st["Resource"])
    assert named == expected, f"{name} names {sorted(named)}, expected {sorted(expected)}"


def test_every_function_has_its_own_least_privilege_role(translated):
    resources = translated["Resources"]
    functions = {n: r for n, r in resources.items() if r["Type"] == "AWS::Lambda::Function"}
    assert set(functions) == {"ApiFunction", "DlqFunction", "BatchFunction", "TriggerFunction", "DispatchFunction"}
    for fn, res in functions.items():
        role = fn.replace("Function", "Role")
        assert res["Properties"]["Role"] == {"Fn::GetAtt": [role, "Arn"]}
    roles = {n: r for n, r in resources.items() if r["Type"] == "AWS::IAM::Role"}
    assert set(roles) == set(EXPECTED), "SAM must not add roles of its own"
    for name, role in roles.items():
        check_role(name, role, EXPECTED[name])


@pytest.mark.parametrize("nested", sorted(NESTED_EXPECTED))
def test_worker_roles_name_only_what_workers_use(nested):
    template = load_template(ROOT / "infra/templates" / nested)
    for name, expected in NESTED_EXPECTED[nested].items():
        check_role(name, template["Resources"][name], expected)


def test_data_is_encrypted_and_the_bucket_private(translated):
    r = translated["Resources"]
    for table in ("JobsTable", "StreamTable"):
        assert r[table]["Properties"]["SSESpecification"] == {"SSEEnabled": True}
    for q in (
        "JobsQueue",
        "JobsDeadLetterQueue",
        "RequestsQueue",
        "RequestsDeadLetterQueue",
        "BatchEventsDeadLetterQueue",
    ):
        assert r[q]["Properties"]["SqsManagedSseEnabled"] is True
    bucket = r["ResultsBucket"]["Properties"]
    assert bucket["BucketEncryption"]["ServerSideEncryptionConfiguration"][0]["ServerSideEncryptionByDefault"]
    assert all(bucket["PublicAccessBlockConfiguration"].values())
    [tls] = r["ResultsBucketPolicy"]["Properties"]["PolicyDocument"]["Statement"]
    assert tls["Effect"] == "Deny" and tls["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    stage = next(v for v in r.values() if v["Type"] == "AWS::ApiGateway::Stage")
    assert stage["Properties"]["AccessLogSetting"]["DestinationArn"] == {"Fn::GetAtt": ["ApiAccessLogs", "Arn"]}
    assert stage["Properties"]["TracingEnabled"] is True


def test_every_route_streams_through_the_web_adapter(translated):
    # One base URL for whole and streamed responses: each route's integration invokes the api
    # function with response streaming, and the function runs under the Lambda Web Adapter.
    r = translated["Resources"]
    [api] = [v for v in r.values() if v["Type"] == "AWS::ApiGateway::RestApi"]
    integrations = [
        op["x-amazon-apigateway-integration"]
        for path in api["Properties"]["Body"]["paths"].values()
        for op in path.values()
    ]
    routes = [
        e for e in load_template()["Resources"]["ApiFunction"]["Properties"]["Events"].values() if e["Type"] == "Api"
    ]
    assert len(integrations) == len(routes) >= 17
    for i in integrations:
        assert i["responseTransferMode"] == "STREAM" and i["uri"]["Fn::Sub"].endswith("/response-streaming-invocations")
    fn = r["ApiFunction"]["Properties"]
    assert fn["Handler"] == "run.sh" and fn["Timeout"] == 900
    assert fn["Environment"]["Variables"]["AWS_LAMBDA_EXEC_WRAPPER"] == "/opt/bootstrap"
    assert fn["Environment"]["Variables"]["AWS_LWA_INVOKE_MODE"] == "response_stream"
    assert "LambdaAdapterLayerArm64" in fn["Layers"][1]["Fn::Sub"]


def test_a_catalogue_s_stack_has_a_fleet_per_model_and_each_role_only_the_models_queues(monkeypatch_module):
    from stratus_local.fleets import per_model, render

    entries = [
        {"name": "Smollm2", "id": "smollm2-135m-instruct-int4", "digest": "d1"},
        {"name": "Gemma3", "id": "gemma-3-270m-q4_k_m-int4", "digest": "d2", "max_workers": 2},
    ]
    template = load_template()
    translated = translate(render(template, entries))
    resources = translated["Resources"]
    own = per_model(template)
    # each model's fleet is a stack of its own, on its own queues, with its own bounds
    fleets = {n: r for n, r in resources.items() if r["Type"] == "AWS::CloudFormation::Stack" and "Ecs" in n}
    assert set(fleets) == {"EcsWorkers", "Gemma3EcsWorkers"}
    for name, prefix in (("EcsWorkers", ""), ("Gemma3EcsWorkers", "Gemma3")):
        params = fleets[name]["Properties"]["Parameters"]
        assert params["JobsQueueUrl"] == {"Ref": f"{prefix}JobsQueue"}
        assert params["BatchJobsQueueName"] == {"Fn::GetAtt": [f"{prefix}BatchJobsQueue", "QueueName"]}
    assert fleets["Gemma3EcsWorkers"]["Properties"]["Parameters"]["MaxWorkers"] == "2"
    assert fleets["EcsWorkers"]["Properties"]["Parameters"]["MaxWorkers"] == {"Ref": "MaxWorkers"}
    # a shared function's role names every model's copy of what it names for one; a model's own
    # role (its dispatcher's) only that model's
    roles = {n: r for n, r in resources.items() if r["Type"] == "AWS::IAM::Role"}
    assert set(roles) == set(EXPECTED) | {"Gemma3DispatchRole"}
    for name, role in roles.items():
        base = EXPECTED[name.removeprefix("Gemma3")]
        if name.startswith("Gemma3"):
            expected = {f"Gemma3{n}" if n in own else n for n in base}
        elif name in own:
            expected = base
        else:
            expected = base | {f"Gemma3{n}" for n in base & own}
        check_role(name, role, expected)
