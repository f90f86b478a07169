"""One settings object, read from the environment once (the template sets every variable).

A missing or malformed variable fails at cold start with its name.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields

from stratus.catalogue import Catalogue, ModelEntry, tier_queue


class ConfigError(RuntimeError):
    """The deployment is misconfigured (a variable is missing or malformed)."""


def _bool(value: str) -> bool:
    if value.lower() not in ("true", "false"):
        raise ValueError(f"expected true or false, got {value!r}")
    return value.lower() == "true"


@dataclass(frozen=True)
class BatchLimits:
    """How batch files are read (stratus.batches): fixed by the code, not read from the environment.
    A batch's lines files are numbered by slice_lines, so it must not change while batches are open."""

    slice_lines: int = 1000  # lines one ingest step reads into jobs and records (~10-20 s of DynamoDB calls)
    max_lines: int = 50_000  # lines in one file (OpenAI's limit); read a slice at a time, over several runs
    max_file_bytes: int = 200 * 1024 * 1024  # one file's size (OpenAI's limit); streamed, never held whole
    max_line_bytes: int = 4 << 20  # one line: no request that fits a queue message (256 KiB) comes near it
    read_chunk: int = 1 << 20  # bytes a read of the file takes from S3 at a time
    # an ingest step holds its batch this long, renewed each slice; a dead run's batch is taken over
    # after it. At least the batch function's timeout (300 s), so a live run, however slow a slice,
    # never loses its batch to a second run that would redo the slice beside it
    lease_s: int = 310
    # a slice writes its outbox and lines objects only with this long left on its lease (the writes
    # take seconds), so no run writes them after its lease ran out and a second run took the batch
    write_margin_s: int = 60


@dataclass(frozen=True)
class Settings:
    table: str
    queue_url: str
    bucket: str
    model_id: str
    model_digest: str
    context_length: int
    cache_ttl_s: int
    sync_wait_s: float
    job_deadline_s: int
    max_body_bytes: int
    max_messages: int
    max_tokens: int
    shared_cache: bool
    default_rpm: int
    default_tpm: int
    batch_window_s: int = 86400  # a batch line's job expires unstarted after this (BatchWindowSeconds)
    max_open_batches: int = 20  # batches one tenant may have open at once (MaxOpenBatches)
    batch_tpm: int = 1_000_000  # a tenant's batch lines' estimated tokens released a minute (BatchTokensPerMinute)
    max_in_flight: int = 64  # interactive jobs one tenant may have QUEUED or RUNNING (MaxInFlightPerTenant)
    # tiers (stratus.contracts.TIERS): interactive jobs go to queue_url, batch jobs to batch_queue_url
    # (the same queue when unset); requests-queue messages take requests_tier
    batch_queue_url: str = ""
    requests_tier: str = "interactive"
    # metered release of batch lines (stratus.release): the fewest visible batch messages a step
    # aims for, the time between steps, and how long a scheduled pass keeps stepping (0: one step)
    batch_release_floor: int = 64
    batch_release_every_s: float = 10.0
    batch_pass_s: float = 0.0
    batch_ingest_s: float = 150.0  # how long one run (an upload's, a pass's) reads a batch file's slices
    poll_interval_s: float = 0.025  # how often a waiting request re-reads its job (a strongly consistent read)
    wake_prefix: str = ""  # names of the API instances' wake queues (stratus.wake); "": requests only re-read
    # streaming (stratus.chunks): the table of chunk items, how often a worker flushes a job's text,
    # how often an idle stream sends a comment, and the longest a stream stays open
    stream_table: str = ""
    stream_flush_s: float = 0.15
    stream_keepalive_s: float = 15.0
    stream_max_s: float = 840.0
    # the requests queue (trigger function)
    trigger_tenant: str = "queue"  # tenant of request messages that name none
    reply_queue_pattern: str = "*-replies*"  # reply_to queue names allowed (IAM allows the same)
    sagemaker_endpoint: str = ""  # the dispatch function's target (WorkerTarget=sagemaker)
    # workers only
    model_dir: str = ""  # the model directory the worker loads ...
    model_uri: str = ""  # ... or s3://bucket/prefix/ of a published model (`stratus model publish`)
    model_cache: str = "/tmp/stratus-models"  # where fetched models are kept, one folder per digest
    max_batch: int = 16  # rows in the engine's continuous batch
    prefix_cache_mb: int = 512  # the engine's stored prompt prefixes (shared-prefix reuse); 0 turns it off
    batch_rows_beside_interactive: int = -1  # batch rows the engine runs while interactive requests are about
    #                                          (-1: 1 on a CPU, max(1, max_batch // 8) on a GPU); docs/scheduling.md
    interactive_headroom: int = -1  # rows beyond max_batch only interactive requests take (-1: max_batch // 8, ≥ 1)
    visibility_s: int = 120  # how long a received message stays hidden (the queue's VisibilityTimeout)
    heartbeat_s: float = 30.0  # how often held messages get their visibility extended
    cancel_check_s: float = 0.5  # how often held jobs are re-read for cancellation
    drain_s: float = 25.0  # on SIGTERM: time to finish held jobs before releasing them
    ort_spinning: bool = True  # onnxruntime threads spin while idle: fastest on cores of their own
    batches: BatchLimits = BatchLimits()  # (not from the environment: see BatchLimits)
    # the models served (stratus.catalogue, JSON); unset: the one model the fields above name
    models: str = ""

    # field name -> (environment variable, parser); every field without a default is required, and a
    # field not named here is not read from the environment
    ENV = {
        "table": ("STRATUS_TABLE", str),
        "queue_url": ("STRATUS_QUEUE_URL", str),
        "bucket": ("STRATUS_BUCKET", str),
        "model_id": ("STRATUS_MODEL_ID", str),
        "model_digest": ("STRATUS_MODEL_DIGEST", str),
        "context_length": ("STRATUS_CONTEXT_LENGTH", int),
        "cache_ttl_s": ("STRATUS_CACHE_TTL_S", int),
        "sync_wait_s": ("STRATUS_SYNC_WAIT_S", float),
        "job_deadline_s": ("STRATUS_JOB_DEADLINE_S", int),
        "max_body_bytes": ("STRATUS_MAX_BODY_BYTES", int),
        "max_messages": ("STRATUS_MAX_MESSAGES", int),
        "max_tokens": ("STRATUS_MAX_TOKENS", int),
        "shared_cache": ("STRATUS_SHARED_CACHE", _bool),
        "default_rpm": ("STRATUS_DEFAULT_RPM", int),
        "default_tpm": ("STRATUS_DEFAULT_TPM", int),
        "poll_interval_s": ("STRATUS_POLL_INTERVAL_S", float),
        "wake_prefix": ("STRATUS_WAKE_PREFIX", str),
        "batch_window_s": ("STRATUS_BATCH_WINDOW_S", int),
        "max_open_batches": ("STRATUS_MAX_OPEN_BATCHES", int),
        "max_in_flight": ("STRATUS_MAX_IN_FLIGHT", int),
        "batch_tpm": ("STRATUS_BATCH_TPM", int),
        "batch_queue_url": ("STRATUS_BATCH_QUEUE_URL", str),
        "requests_tier": ("STRATUS_REQUESTS_TIER", str),
        "batch_release_floor": ("STRATUS_BATCH_RELEASE_FLOOR", int),
        "batch_release_every_s": ("STRATUS_BATCH_RELEASE_EVERY_S", float),
        "batch_pass_s": ("STRATUS_BATCH_PASS_S", float),
        "batch_ingest_s": ("STRATUS_BATCH_INGEST_S", float),
        "stream_table": ("STRATUS_STREAM_TABLE", str),
        "stream_flush_s": ("STRATUS_STREAM_FLUSH_S", float),
        "stream_keepalive_s": ("STRATUS_STREAM_KEEPALIVE_S", float),
        "stream_max_s": ("STRATUS_STREAM_MAX_S", float),
        "trigger_tenant": ("STRATUS_TRIGGER_TENANT", str),
        "reply_queue_pattern": ("STRATUS_REPLY_QUEUE_PATTERN", str),
        "sagemaker_endpoint": ("STRATUS_SAGEMAKER_ENDPOINT", str),
        "model_dir": ("STRATUS_MODEL_DIR", str),
        "model_uri": ("STRATUS_MODEL_URI", str),
        "model_cache": ("STRATUS_MODEL_CACHE", str),
        "max_batch": ("STRATUS_MAX_BATCH", int),
        "prefix_cache_mb": ("STRATUS_PREFIX_CACHE_MB", int),
        "batch_rows_beside_interactive": ("STRATUS_BATCH_ROWS_BESIDE_INTERACTIVE", int),
        "interactive_headroom": ("STRATUS_INTERACTIVE_HEADROOM", int),
        "visibility_s": ("STRATUS_VISIBILITY_S", int),
        "heartbeat_s": ("STRATUS_HEARTBEAT_S", float),
        "cancel_check_s": ("STRATUS_CANCEL_CHECK_S", float),
        "drain_s": ("STRATUS_DRAIN_S", float),
        "ort_spinning": ("STRATUS_ORT_SPINNING", _bool),
        "models": ("STRATUS_MODELS", str),
    }

    @functools.cached_property
    def catalogue(self) -> Catalogue:
        """The models served: STRATUS_MODELS, or the one model the single-model fields name."""
        if self.models:
            return Catalogue.from_json(self.models)
        return Catalogue(
            (
                ModelEntry(
                    self.model_id,
                    self.model_digest,
                    self.context_length,
                    self.model_uri,
                    self.queue_url,
                    self.batch_queue_url,
                ),
            )
        )

    def batch_queues(self) -> list[str]:
        """Every batch-tier queue the models are served from, each once."""
        return list(dict.fromkeys(m.queue_for("batch") for m in self.catalogue.models))

    def queue_for(self, tier: str) -> str:
        """The jobs queue of a tier: a worker's own (its model's; the API routes by the catalogue)."""
        return tier_queue(tier, self.queue_url, self.batch_queue_url)

    def deadline_for(self, tier: str) -> int:
        """How long a job of this tier may wait unstarted: a batch window, or the interactive deadline."""
        return self.batch_window_s if tier == "batch" else self.job_deadline_s

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        values = {}
        for f in fields(cls):
            if f.name not in cls.ENV:
                continue
            var, parse = cls.ENV[f.name]
            raw = env.get(var)
            if raw is None or raw == "":
                if f.default is MISSING:
                    raise ConfigError(f"environment variable {var} is not set")
                continue
            try:
                values[f.name] = parse(raw)
            except ValueError as exc:
                raise ConfigError(f"environment variable {var}: {exc}") from exc
        settings = cls(**values)
        try:
            settings.catalogue  # noqa: B018 — read once here, so a malformed catalogue fails at cold start
        except ValueError as exc:
            raise ConfigError(f"environment variable STRATUS_MODELS: {exc}") from exc
        return settings


@functools.cache
def get_settings() -> Settings:
    return Settings.from_env()
