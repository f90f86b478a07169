"""The template of a catalogue (stratus_local.fleets): a queue pair, dead-letter queues, alarms and a
worker fleet per model, each role reaching every model's queues and nothing more."""

from __future__ import annotations

import json
import re

import pytest

from stratus.catalogue import Catalogue
from stratus_local.fleets import per_model, read_catalogue, render, resource_name
from stratus_local.template import active, load_template, resolve

ENTRIES = [
    {"name": "Smollm2", "id": "smollm2-135m-instruct-int4", "digest": "d1", "aliases": ["chat"]},
    {
        "name": "Gemma3",
        "id": "gemma-3-270m-int4",
        "digest": "d2",
        "uri": "s3://models-bucket/models/gemma-3-270m-int4/d2/",
        "context_length": 4096,
        "instance_type": "g6.xlarge",
        "min_workers": 1,
        "max_workers": 2,
    },
]


def names(value) -> set[str]:
    """Every resource a value names (Ref, GetAtt, Sub)."""
    text = json.dumps(value)
    return (
        set(re.findall(r'"Ref": "([A-Za-z0-9]+)"', text))
        | set(re.findall(r'"Fn::GetAtt": \["([A-Za-z0-9]+)"', text))
        | set(re.findall(r"\$\{([A-Za-z0-9]+)[.}]", text))
    )


@pytest.fixture(scope="module")
def rendered() -> dict:
    return render(load_template(), ENTRIES)


def test_each_further_model_gets_a_copy_of_every_per_model_resource(rendered):
    own = per_model(load_template())
    assert {"JobsQueue", "BatchJobsQueue", "JobsDeadLetterQueue", "EcsWorkers", "SageMakerWorkers"} <= own
    assert {"JobsTable", "ResultsBucket", "ApiFunction", "ApiRole"}.isdisjoint(own)
    assert {f"Gemma3{n}" for n in own} <= set(rendered["Resources"])
    # the copy's references are its own; its parameters the entry's values
    ecs = rendered["Resources"]["Gemma3EcsWorkers"]["Properties"]["Parameters"]
    assert ecs["JobsQueueUrl"] == {"Ref": "Gemma3JobsQueue"}
    assert ecs["BatchJobsQueueArn"] == {"Fn::GetAtt": ["Gemma3BatchJobsQueue", "Arn"]}
    assert (ecs["ModelId"], ecs["ModelDigest"], ecs["ModelUri"]) == ("gemma-3-270m-int4", "d2", ENTRIES[1]["uri"])
    assert (ecs["InstanceType"], ecs["MinWorkers"], ecs["MaxWorkers"]) == ("g6.xlarge", "1", "2")
    assert ecs["BacklogPerWorker"] == {"Ref": "BacklogPerWorker"}  # (not given: the stack's)
    redrive = rendered["Resources"]["Gemma3JobsQueue"]["Properties"]["RedrivePolicy"]
    assert redrive["deadLetterTargetArn"] == {"Fn::GetAtt": ["Gemma3JobsDeadLetterQueue", "Arn"]}
    alarm = rendered["Resources"]["Gemma3OldestJobAlarm"]["Properties"]["Dimensions"]
    assert alarm == [{"Name": "QueueName", "Value": {"Fn::GetAtt": ["Gemma3JobsQueue", "QueueName"]}}]
    # each model's worker metrics (a `model` dimension: stratus_worker.__main__) have their own alarm and dashboard
    errors = rendered["Resources"]["Gemma3WorkerErrorsAlarm"]["Properties"]["Dimensions"]
    assert {"Name": "model", "Value": "gemma-3-270m-int4"} in errors
    assert rendered["Resources"]["WorkerErrorsAlarm"]["Properties"]["Dimensions"][1]["Value"] == {"Ref": "ModelId"}
    body = rendered["Resources"]["Gemma3Dashboard"]["Properties"]["DashboardBody"]["Fn::Sub"]
    assert '"model", "gemma-3-270m-int4"' in body[0] and body[1]["Jobs"]["Fn::GetAtt"][0] == "Gemma3JobsQueue"
    # and the first entry is the template's own model
    assert rendered["Parameters"]["ModelId"]["Default"] == ENTRIES[0]["id"]


def test_each_role_reaches_every_model_s_queues_and_the_workers_only_their_own(rendered):
    template = load_template()
    for role in ("ApiRole", "TriggerRole", "BatchRole", "DlqRole"):
        before = names(template["Resources"][role]) & per_model(template)
        after = names(rendered["Resources"][role])
        assert before and {f"Gemma3{n}" for n in before} <= after, role
    dlq_events = rendered["Resources"]["DlqFunction"]["Properties"]["Events"]
    assert {e["Properties"]["Queue"]["Fn::GetAtt"][0] for e in dlq_events.values() if e["Type"] == "SQS"} == {
        "JobsDeadLetterQueue",
        "BatchJobsDeadLetterQueue",
        "Gemma3JobsDeadLetterQueue",
        "Gemma3BatchJobsDeadLetterQueue",
    }
    # a model's fleet names no other model's queues
    assert not {n for n in names(rendered["Resources"]["Gemma3EcsWorkers"]) if n.endswith("Queue")} - {
        "Gemma3JobsQueue",
        "Gemma3BatchJobsQueue",
    }
    assert "Gemma3" not in json.dumps(rendered["Resources"]["EcsWorkers"])


def test_the_functions_catalogue_names_each_model_s_queues(rendered):
    template = active(rendered)
    refs = {n: f"url:{n}" for n in template["Resources"]} | {
        "ModelId": "smollm2-135m-instruct-int4",
        "ModelDigest": "d1",
        "ModelUri": "",
        "ModelContextLength": "8192",
    }
    sub = rendered["Globals"]["Function"]["Environment"]["Variables"]["STRATUS_MODELS"]["Fn::Sub"]
    text = re.sub(r"\$\{([A-Za-z0-9]+)\}", lambda m: refs[m.group(1)], sub)
    catalogue = Catalogue.from_json(text)
    first, second = catalogue.models
    assert (first.id, first.queue_url, first.batch_queue_url) == (
        "smollm2-135m-instruct-int4",
        "url:JobsQueue",
        "url:BatchJobsQueue",
    )
    assert (second.id, second.digest, second.context_length) == ("gemma-3-270m-int4", "d2", 4096)
    assert (second.queue_url, second.batch_queue_url) == ("url:Gemma3JobsQueue", "url:Gemma3BatchJobsQueue")
    assert catalogue.find("chat") is first and catalogue.find("default") is first
    assert resolve({"Ref": "Gemma3JobsQueue"}, refs) == "url:Gemma3JobsQueue"


def test_a_catalogue_file_is_checked(tmp_path):
    path = tmp_path / "models.yaml"
    path.write_text("models:\n  - {name: Gemma3, id: g, digest: d}\n")
    assert read_catalogue(path)[0]["id"] == "g"
    for text, why in [
        ("models: []", "at least one"),
        ("models:\n  - {name: Gemma3, id: g}", "needs digest"),
        ("models:\n  - {name: gemma-3, id: g, digest: d}", "a capital letter"),
        ("models:\n  - {name: A, id: g, digest: d}\n  - {name: A, id: h, digest: e}", "share a name"),
        ("models:\n  - {name: A, id: g, digest: d, target: lambda}", "target must be one of"),
    ]:
        path.write_text(text)
        with pytest.raises(ValueError, match=why):
            read_catalogue(path)
    assert resource_name("gemma3-270m") == "Gemma3270m" and resource_name("smollm2") == "Smollm2"


def test_a_catalogue_whose_digest_differs_from_the_published_manifest_is_refused(monkeypatch):
    import boto3
    from moto import mock_aws

    from stratus_local.fleets import check_artifacts

    for k, v in {"AWS_DEFAULT_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "t", "AWS_SECRET_ACCESS_KEY": "t"}.items():
        monkeypatch.setenv(k, v)
    with mock_aws():
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="models-bucket")
        s3.put_object(
            Bucket="models-bucket", Key="models/g/d2/manifest.json", Body=json.dumps({"model_id": "g", "digest": "d2"})
        )
        good = {"name": "G", "id": "g", "digest": "d2", "uri": "s3://models-bucket/models/g/d2/"}
        assert check_artifacts([good], s3) == []
        [stale] = check_artifacts([{**good, "digest": "d1"}], s3)
        assert "holds digest d2, the catalogue says d1" in stale
        [missing] = check_artifacts([{**good, "uri": "s3://models-bucket/models/g/nothing/"}], s3)
        assert "cannot read s3://models-bucket/models/g/nothing/manifest.json" in missing
        assert "no uri" in check_artifacts([{**good, "uri": ""}], s3)[0]


def test_a_model_may_name_its_own_kind_of_fleet():
    sagemaker = {**ENTRIES[1], "target": "sagemaker", "image": "123.dkr.ecr.us-east-1.amazonaws.com/w:cpu"}
    rendered = render(load_template(), [ENTRIES[0], sagemaker])
    resources = rendered["Resources"]
    assert "Gemma3EcsWorkers" not in resources and "Condition" not in resources["Gemma3SageMakerWorkers"]
    assert "Condition" not in resources["Gemma3DispatchFunction"]
    assert resources["Gemma3SageMakerWorkers"]["Properties"]["Parameters"]["WorkerImageUri"] == sagemaker["image"]
    assert resources["EcsWorkers"]["Condition"] == "UseEcs"  # (the first model's follows WorkerTarget)
    assert "Gemma3SageMakerWorkers" in active(rendered, {"WorkerTarget": "ecs"})["Resources"]  # whatever the stack's
