"""The dlq Lambda: a message that failed maxReceiveCount deliveries lands in the jobs DLQ; its job
becomes FAILED with a reason the client can read (GET /v1/jobs/{id} and the waiting request)."""

from __future__ import annotations

import functools

import boto3
from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from aws_lambda_powertools.utilities.typing import LambdaContext

from stratus.deadletter import fail_dead_letter
from stratus.jobstore import JobStore
from stratus.observability import logger, metrics, tracer
from stratus.settings import get_settings

processor = BatchProcessor(event_type=EventType.SQS)


@functools.cache
def get_clients() -> dict:
    return {"store": JobStore(boto3.resource("dynamodb").Table(get_settings().table)), "sqs": boto3.client("sqs"),
            "s3": boto3.client("s3")}


def record_handler(record: SQSRecord) -> None:
    fail_dead_letter(record.body, **get_clients())


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict, context: LambdaContext) -> dict:
    return process_partial_response(event=event, record_handler=record_handler, processor=processor, context=context)
