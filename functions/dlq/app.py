"""The dlq Lambda: a message that failed maxReceiveCount deliveries lands in the jobs DLQ; its job
becomes FAILED with a reason the client can read (GET /v1/jobs/{id} and the waiting request)."""

from __future__ import annotations

import functools

from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from aws_lambda_powertools.utilities.typing import LambdaContext

from stratus.deadletter import fail_dead_letter
from stratus.deps import deps_from_env
from stratus.observability import logger, metrics, tracer

processor = BatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)  # kept: retried later
get_deps = functools.cache(deps_from_env)  # clients created once per container


def record_handler(record: SQSRecord) -> None:
    deps = get_deps()
    fail_dead_letter(record.body, deps.store, sqs=deps.sqs, s3=deps.s3, heartbeat_s=deps.settings.heartbeat_s)


@logger.inject_lambda_context(clear_state=True)  # a warm container never logs under the last request's keys
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict, context: LambdaContext) -> dict:
    return process_partial_response(event=event, record_handler=record_handler, processor=processor, context=context)
