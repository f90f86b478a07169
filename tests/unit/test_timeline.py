"""stratus.timeline: a whole request's and a stream's phases from the API's and the worker's marks."""

from stratus import timeline
from stratus.contracts import InferenceRequest, Job, Status
from stratus.params import SamplingParams


def job(timings: dict | None, updated_at: float = 0.0) -> Job:
    req = InferenceRequest("chat", "m", SamplingParams(), messages=({"role": "user", "content": "hi"},))
    return Job(
        "j" + "0" * 32,
        "t",
        Status.DONE,
        req,
        False,
        created_at=100.0,
        expires_at=200,
        updated_at=updated_at,
        timings=timings,
    )


def test_the_phases_follow_the_marks_in_order():
    # API in at 99.99, job created at 100.0, sent at 100.01; the worker took it at +0.02, handed it
    # to the engine at +0.03, which ran 0.5 s; DONE written at 100.54, seen at 100.56, replied at 100.565
    j = job({"taken_s": 0.02, "started_s": 0.03, "total_s": 0.5}, updated_at=100.54)
    spans = timeline.phases(j, t_in=99.99, t_sent=100.01, t_seen=100.56, t_out=100.565)
    expected = {
        "submit": 0.02, "queue": 0.01, "claim": 0.01, "engine": 0.5,
        "result": 0.01, "notice": 0.02, "reply": 0.005, "total": 0.575,
    }  # fmt: skip
    assert list(spans) == list(expected)
    assert all(abs(spans[k] - v) < 1e-9 for k, v in expected.items()), spans
    assert abs(sum(v for k, v in spans.items() if k != "total") - spans["total"]) < 1e-9


def test_a_job_without_the_workers_marks_gives_what_is_known():
    spans = timeline.phases(job({"total_s": 0.5}, updated_at=101.0), 99.0, 99.5, 102.0, 102.5)
    assert spans == {"submit": 0.5, "engine": 0.5, "total": 3.5}
    assert timeline.phases(job(None), 99.0, 99.5, 102.0, 102.5) == {"submit": 0.5, "total": 3.5}


def test_the_header_is_in_milliseconds():
    assert timeline.server_timing({"submit": 0.0123, "total": 0.5}) == "submit;dur=12.3, total;dur=500.0"


def test_the_header_reads_back():
    spans = {"submit": 0.0123, "engine": 0.3, "total": 0.5}
    assert timeline.read_server_timing(timeline.server_timing(spans)) == {
        "submit": 12.3,
        "engine": 300.0,
        "total": 500.0,
    }


def test_a_streams_phases_lead_to_its_first_text():
    # API in at 99.99, job created at 100.0, sent at 100.01; the worker took it at +0.02, handed it
    # to the engine at +0.03, whose first token came 0.1 s later (100.13); the first text went out
    # at 100.15, the last at 100.9
    j = job({"taken_s": 0.02, "started_s": 0.03, "ttft_s": 0.1, "total_s": 0.8})
    spans = timeline.stream_phases(j, t_in=99.99, t_sent=100.01, t_first=100.15, t_end=100.9)
    expected = {
        "submit": 0.02, "queue": 0.01, "claim": 0.01, "prefill": 0.1, "first_text": 0.02,
        "ttft": 0.16, "rest": 0.75, "total": 0.91,
    }  # fmt: skip
    assert list(spans) == list(expected)
    assert all(abs(spans[k] - v) < 1e-9 for k, v in expected.items()), spans
    # the phases up to the first text make its ttft; ttft and the rest make the whole
    head = ("submit", "queue", "claim", "prefill", "first_text")
    assert abs(sum(spans[k] for k in head) - spans["ttft"]) < 1e-9
    assert abs(spans["ttft"] + spans["rest"] - spans["total"]) < 1e-9


def test_a_stream_without_the_workers_marks_or_any_text_gives_what_is_known():
    assert timeline.stream_phases(None, 99.0, 99.5, 100.0, 101.0) == {
        "submit": 0.5, "ttft": 1.0, "rest": 1.0, "total": 2.0
    }  # fmt: skip
    assert timeline.stream_phases(job({"ttft_s": 0.1}), 99.0, 99.5, None, 101.0) == {"submit": 0.5, "total": 2.0}
