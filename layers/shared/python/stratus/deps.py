"""The client bundle every function and the workers' API-side code get: settings and boto3 clients,
injected (tests pass their own). Handlers cache it once per container:
`get_deps = functools.cache(deps.deps_from_env)`."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import boto3  # imported at init, as the handlers' cold start should pay it
from botocore.config import Config

from stratus.jobstore import JobStore
from stratus.settings import Settings, get_settings
from stratus.wake import WAIT_S, Waker

# Requests wait seconds, not botocore's defaults (60 s to connect, 60 to read): a storage outage
# becomes a 503 with Retry-After while the caller is still there.
CLIENT_CONFIG = Config(connect_timeout=1, read_timeout=2, retries={"max_attempts": 2, "mode": "standard"})
# ... but a wake queue's reader long-polls (stratus.wake)
WAKE_CONFIG = Config(connect_timeout=1, read_timeout=WAIT_S + 5, retries={"max_attempts": 2, "mode": "standard"})


@dataclass
class Deps:
    settings: Settings
    table: object  # boto3 DynamoDB Table
    sqs: object  # boto3 SQS client
    s3: object  # boto3 S3 client (results too big for an item)
    stream_table: object = None  # boto3 DynamoDB Table of streamed chunks (stratus.chunks); None: no streaming
    clock: Callable[[], float] = time.time
    sleep: Callable[[float], None] = time.sleep
    store: JobStore = field(init=False)
    key_cache: dict = field(default_factory=dict)  # see stratus.keys.authenticate
    waker: Waker | None = None  # this instance's wake queue (stratus.wake); None: waiting requests only re-read

    def __post_init__(self) -> None:
        self.store = JobStore(self.table)

    def pause(self, job_id: str, read_at: float, seconds: float) -> None:
        """Between two reads of a job: `seconds`, ended early by a wake for it that came after
        `read_at` (time.monotonic() before the last read; stratus.wake)."""
        if self.waker is None:
            self.sleep(seconds)
        else:
            self.waker.wait(job_id, read_at, seconds)


def deps_from_env() -> Deps:
    """Deps for a function: settings from its environment, boto3 clients (AWS_ENDPOINT_URL honoured)."""
    settings = get_settings()
    ddb = boto3.resource("dynamodb", config=CLIENT_CONFIG)
    return Deps(
        settings,
        ddb.Table(settings.table),
        boto3.client("sqs", config=CLIENT_CONFIG),
        boto3.client("s3", config=CLIENT_CONFIG),
        ddb.Table(settings.stream_table) if settings.stream_table else None,
        waker=Waker(lambda: boto3.client("sqs", config=WAKE_CONFIG), settings.wake_prefix)
        if settings.wake_prefix
        else None,
    )
