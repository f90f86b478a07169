"""A job item read without its prompt (JobStore.get(prompt=False)) is the whole job but the prompt."""

from stratus.contracts import InferenceRequest, Job, Status
from stratus.jobstore import WITHOUT_PROMPT
from stratus.params import SamplingParams


def test_a_read_without_the_prompt_keeps_every_other_attribute():
    request = InferenceRequest("chat", "m", SamplingParams(max_tokens=3), ({"role": "user", "content": "hi"},))
    job = Job(
        "c" + "0" * 64, "acme", Status.DONE, request, True, 1.0, 100, updated_at=2.0,
        result={"text": "x"}, result_s3="s3://b/results/x.json", usage={"total_tokens": 3}, timings={"ttft_s": 0.1},
        attempts=2, error={"code": "e"}, worker="w1", last_error="boom", notify=[{"queue_url": "q", "id": "1"}],
        notified=True, tier="batch", batch="batch_1", run="r1",
    )  # fmt: skip
    item = job.to_item()
    # (attributes later writes set, as JobStore's updates store them)
    item.update(last_error=job.last_error, notify=['{"queue_url":"q","id":"1"}'], notified=True)
    read = set(WITHOUT_PROMPT["ExpressionAttributeNames"].values())
    got = Job.from_item({k: v for k, v in item.items() if k in read})
    assert set(item) - read == {"prompt"}
    assert got == Job(**{**vars(job), "request": InferenceRequest("chat", "m", SamplingParams(max_tokens=3))})
