"""A batch's output is written in bounded memory whatever its results' size (stratus.batches.output):
a line's job, its result loaded, is held only while its group of lines is written."""

import tracemalloc
from types import SimpleNamespace

from stratus.batches import output
from stratus.batches.model import Batch, Line
from stratus.contracts import InferenceRequest, Job, Status
from stratus.params import SamplingParams
from stratus.settings import BatchLimits

LINES = 100


def big_result(job_id: str) -> dict:
    """200 tokens, 20 alternatives each: ~300 KB as JSON, ~1.5 MB as Python objects."""
    entry = lambda t: {"token": f"{job_id[:6]}{t}", "logprob": -1.25, "bytes": [116, 111, 107]}
    content = [{**entry(t), "top_logprobs": [entry(t * 100 + k) for k in range(20)]} for t in range(200)]
    return {"text": "x" * 800, "finish_reason": "length", "logprobs": content}


class Store:
    """The job store's reads, each job made afresh (its result is nobody else's to keep)."""

    def get_many(self, job_ids):
        request = InferenceRequest("chat", "m", SamplingParams())
        return {j: Job(j, "acme", Status.DONE, request, True, 0.0, 2**40, result=big_result(j)) for j in job_ids}


class S3:
    """Multipart uploads that keep nothing."""

    def create_multipart_upload(self, **_):
        return {"UploadId": "u"}

    def upload_part(self, **_):
        return {"ETag": "e"}

    def complete_multipart_upload(self, **_):
        return {}

    def abort_multipart_upload(self, **_):
        return {}

    def put_object(self, **_):
        return {}


def deps():
    table = SimpleNamespace(
        put_item=lambda **_: None,
        meta=SimpleNamespace(
            client=SimpleNamespace(exceptions=SimpleNamespace(ConditionalCheckFailedException=KeyError))
        ),
    )
    settings = SimpleNamespace(bucket="b", batches=BatchLimits())
    return SimpleNamespace(settings=settings, store=Store(), s3=S3(), table=table)


def test_a_slice_of_large_results_is_written_in_bounded_memory():
    batch = Batch("batch_" + "0" * 24, "acme", "batches/input/acme/f.jsonl", ingested=LINES, lines_total=LINES)
    lines = [Line(n + 1, f"c{n}", job_id=f"j{n:032x}") for n in range(LINES)]
    tracemalloc.start()
    try:
        assert output.write_output(batch, [lines], deps())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Then the peak is a group's results and a part of each file, whatever the number of lines
    assert batch.counts == {"total": LINES, "completed": LINES, "failed": 0}
    assert peak < 48 * 2**20, f"peak {peak / 2**20:.0f} MiB"  # (all at once: 154 MiB for 100 lines)
