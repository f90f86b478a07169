"""Several models behind one API (stratus.catalogue): routing on `model`, aliases, a queue pair per
model, keys limited to models, and the errors for a model that is not served."""

from __future__ import annotations

import dataclasses
import json

import boto3
import pytest

from stratus.catalogue import Catalogue
from stratus.keys import create_key
from stratus.settings import ConfigError, Settings

INSTRUCT, BASE = "smollm2-135m-instruct-int4", "gemma-3-270m-int4"


def ask(model: str, content: str = "What is the capital of France?", **kw) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 8, **kw}


@pytest.fixture
def two_models(stack, monkeypatch):
    """The stack's model plus a second one with queues of its own, the alias "gemma" naming it."""
    sqs = boto3.client("sqs")
    queues = {
        name: sqs.create_queue(
            QueueName=f"gemma-{name}.fifo", Attributes={"FifoQueue": "true", "ContentBasedDeduplication": "true"}
        )["QueueUrl"]
        for name in ("jobs", "batch")
    }
    models = [
        {
            "id": INSTRUCT,
            "digest": "d1",
            "context_length": 8192,
            "queue_url": stack.refs["JobsQueue"],
            "batch_queue_url": stack.refs["BatchJobsQueue"],
        },
        {
            "id": BASE,
            "digest": "d2",
            "context_length": 512,
            "queue_url": queues["jobs"],
            "batch_queue_url": queues["batch"],
            "aliases": ["gemma"],
        },
    ]
    deps = stack.module.get_deps()
    monkeypatch.setattr(deps, "settings", dataclasses.replace(deps.settings, models=json.dumps(models)))
    return queues


def waiting(url: str) -> list[dict]:
    got = boto3.client("sqs").receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages", [])
    return [json.loads(m["Body"]) for m in got]


def test_each_model_is_listed_and_its_requests_go_to_its_own_queue(stack, key, two_models):
    status, listed, _ = stack.call("api_models.json", key=key)
    assert status == 200 and [m["id"] for m in listed["data"]] == [INSTRUCT, BASE]
    assert listed["data"][1]["aliases"] == ["gemma"] and listed["data"][1]["context_length"] == 512
    assert stack.call("api_get_model.json", key=key, job_id="gemma")[1]["id"] == BASE
    # Given a request for each model (the second by its alias)
    assert stack.call("api_create_job.json", key=key, body=ask(INSTRUCT))[0] == 202
    status, job, _ = stack.call("api_create_job.json", key=key, body=ask("gemma"))
    assert status == 202
    # Then each waits in its own model's queue, the alias resolved to the id it names
    [mine] = stack.queued()
    [theirs] = waiting(two_models["jobs"])
    assert mine["request"]["model"] == INSTRUCT and theirs["request"]["model"] == BASE
    assert theirs["job_id"] == job["id"]
    # and one model's limits are its own: a prompt within the first's context is too long for the second
    long = ask(BASE, "word " * 4000)  # (at least 20000 / 32 = 625 tokens by bytes alone)
    status, err, _ = stack.call("api_create_job.json", key=key, body=long)
    assert status == 400 and "context length of 512" in err["error"]["message"]


def test_the_same_request_to_two_models_is_two_cache_entries(stack, key, two_models):
    first = stack.call("api_create_job.json", key=key, body=ask(INSTRUCT, temperature=0))[1]["id"]
    second = stack.call("api_create_job.json", key=key, body=ask(BASE, temperature=0))[1]["id"]
    by_alias = stack.call("api_create_job.json", key=key, body=ask("gemma", temperature=0))[1]["id"]
    assert first != second and by_alias == second  # (an alias shares its model's cache)


def test_an_unknown_model_is_a_404_that_says_how_to_list_them(stack, key, two_models):
    status, err, _ = stack.call("api_create_job.json", key=key, body=ask("gpt-4o"))
    assert status == 404 and err["error"]["code"] == "model_not_found" and err["error"]["param"] == "model"
    assert "GET /v1/models" in err["error"]["message"] and BASE in err["error"]["message"]
    assert stack.call("api_get_model.json", key=key, job_id="gpt-4o")[0] == 404


def test_a_key_limited_to_models_gets_403_for_the_others(stack, two_models):
    limited = create_key(stack.table, "acme", rpm=100, tpm=100_000, models=[INSTRUCT])
    assert stack.call("api_create_job.json", key=limited, body=ask(INSTRUCT))[0] == 202
    status, err, _ = stack.call("api_create_job.json", key=limited, body=ask("gemma"))
    assert status == 403 and err["error"]["code"] == "model_not_allowed" and INSTRUCT in err["error"]["message"]
    assert waiting(two_models["jobs"]) == []  # (refused before anything was queued or charged)
    nothing = create_key(stack.table, "acme", rpm=100, tpm=100_000, models=[])
    assert stack.call("api_create_job.json", key=nothing, body=ask(INSTRUCT))[0] == 403
    # and it lists only the models it may use
    assert [m["id"] for m in stack.call("api_models.json", key=limited)[1]["data"]] == [INSTRUCT]
    assert stack.call("api_get_model.json", key=limited, job_id="gemma")[0] == 403


def test_a_catalogue_is_read_once_and_refused_with_its_problem():
    ok = Catalogue.from_json('[{"id": "a", "digest": "x", "aliases": ["b"]}, {"id": "c", "digest": "y"}]')
    assert ok.find("default").id == "a" and ok.find("b").id == "a" and ok.find("c").id == "c"
    for bad, why in [
        ("[]", "at least one"),
        ('[{"id": "a"}]', "an id and a digest"),
        ('[{"id": "a", "digest": "x"}, {"id": "a", "digest": "y"}]', "given twice"),
        ('[{"id": "a b", "digest": "x"}]', "letters, digits"),
    ]:
        with pytest.raises(ValueError, match=why):
            Catalogue.from_json(bad)
    env = {
        "STRATUS_TABLE": "t",
        "STRATUS_QUEUE_URL": "q",
        "STRATUS_BUCKET": "b",
        "STRATUS_MODEL_ID": "m",
        "STRATUS_MODEL_DIGEST": "d",
        "STRATUS_CONTEXT_LENGTH": "8",
        "STRATUS_CACHE_TTL_S": "1",
        "STRATUS_SYNC_WAIT_S": "1",
        "STRATUS_JOB_DEADLINE_S": "1",
        "STRATUS_MAX_BODY_BYTES": "1",
        "STRATUS_MAX_MESSAGES": "1",
        "STRATUS_MAX_TOKENS": "1",
        "STRATUS_SHARED_CACHE": "false",
        "STRATUS_DEFAULT_RPM": "1",
        "STRATUS_DEFAULT_TPM": "1",
    }
    single = Settings.from_env(env).catalogue
    assert [(m.id, m.digest, m.queue_url) for m in single.models] == [("m", "d", "q")]
    with pytest.raises(ConfigError, match="STRATUS_MODELS"):
        Settings.from_env({**env, "STRATUS_MODELS": "[]"})


def test_batch_lines_are_released_to_their_own_model_s_batch_queue(stack, two_models, monkeypatch):
    from stratus import release, submission
    from stratus.contracts import Status
    from stratus.keys import Tenant

    deps = stack.module.get_deps()
    owner = Tenant.trusted("acme")
    subs = [
        submission.submit("chat", ask(model), owner, deps, submission.batch_line(deps.settings, "batch_1", i))
        for i, model in enumerate([INSTRUCT, "gemma", BASE], 1)
    ]
    release.send([subs[0].message.to_body(), subs[1].message.to_body()], deps, "acme")
    assert [m["request"]["model"] for m in stack.queued("BatchJobsQueue")] == [INSTRUCT]
    assert [m["request"]["model"] for m in waiting(two_models["batch"])] == [BASE]
    # a line whose model left the catalogue meanwhile fails its job; the step goes on
    only_first = json.dumps(json.loads(deps.settings.models)[:1])
    monkeypatch.setattr(deps, "settings", dataclasses.replace(deps.settings, models=only_first))
    release.send([subs[2].message.to_body()], deps, "acme")
    job = deps.store.get(subs[2].job_id)
    assert job.status == Status.FAILED and job.error["code"] == "model_not_found"
