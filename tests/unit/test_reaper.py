"""What the SageMaker mode's sweep does with a job it handed to the endpoint (stratus.reaper.verdict)."""

from __future__ import annotations

import pytest

from stratus.contracts import Status
from stratus.reaper import SHARDS, Seen, shard_of, verdict

NOW, BEAT = 10_000.0, 30.0


@pytest.mark.parametrize(
    "status, quiet_s, deadline_in_s, then",
    [
        (Status.RUNNING, 91, -1, Status.FAILED),  # three heartbeats missed: its instance is gone
        (Status.RUNNING, 89, -1, None),  # late, not lost (its deadline passing does not matter once started)
        (Status.QUEUED, 5000, 1, None),  # waiting on the endpoint's own queue, within its deadline
        (Status.QUEUED, 0, -1, Status.EXPIRED),  # the endpoint dropped it, or never got to it in time
        (Status.DONE, 5000, -1, None),
        (Status.CANCELLED, 5000, -1, None),
    ],
)
def test_verdict(status, quiet_s, deadline_in_s, then):
    got = verdict(Seen("j", status, NOW - quiet_s, NOW + deadline_in_s), NOW, BEAT)
    assert (got and got[0]) == then
    if then == Status.FAILED:
        assert got[1]["code"] == "worker_lost" and "91 s" in got[1]["message"]
    if then == Status.EXPIRED:
        assert got[1]["code"] == "expired"


def test_jobs_spread_over_every_shard():
    seen = {shard_of(f"job-{i}") for i in range(1000)}
    assert seen == {str(i) for i in range(SHARDS)}
