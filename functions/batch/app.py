"""The batch Lambda: an uploaded JSONL file (S3 "Object Created" via EventBridge) becomes a batch;
a scheduled event advances open batches, writes their output files and releases their lines into
the batch queue a few at a time, fairly between tenants (logic in stratus.batches and stratus.release)."""

from __future__ import annotations

import functools
from urllib.parse import unquote_plus

from aws_lambda_powertools.utilities.typing import LambdaContext

from stratus import batches
from stratus.deps import deps_from_env
from stratus.errors import InvalidRequest
from stratus.observability import logger, metrics, tracer

get_deps = functools.cache(deps_from_env)  # clients created once per container


def on_upload(event: dict) -> dict:
    obj = event["detail"]["object"]
    key, bucket = unquote_plus(obj["key"]), event["detail"]["bucket"]["name"]
    try:
        tenant = batches.tenant_of_upload(key)
    except InvalidRequest as exc:
        logger.warning("upload ignored", extra={"key": key, "reason": exc.message})
        return {"ignored": key}
    etag = obj.get("etag", "")
    batch = batches.create(batches.batch_id_for_upload(bucket, key, etag), tenant, key, get_deps(), etag)
    return {"batch": batch.id, "status": batch.status, "request_counts": batch.counts}


def on_schedule(_event: dict) -> dict:
    return batches.run_pass(get_deps())


HANDLERS = {"aws.s3": on_upload, "aws.events": on_schedule}  # EventBridge source -> handler


@logger.inject_lambda_context(clear_state=True)  # a warm container never logs under the last request's keys
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict, context: LambdaContext) -> dict:
    return HANDLERS[event["source"]](event)
