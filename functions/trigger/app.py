"""The trigger Lambda: each message on the requests queue is one OpenAI request (stratus.trigger);
failures are reported per message so only those are redelivered."""

from __future__ import annotations

import functools

import boto3
from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from aws_lambda_powertools.utilities.typing import LambdaContext

from stratus import service
from stratus.observability import logger, metrics, tracer
from stratus.settings import get_settings
from stratus.trigger import handle_request

processor = BatchProcessor(event_type=EventType.SQS)


@functools.cache
def get_deps() -> service.Deps:
    settings = get_settings()
    return service.Deps(settings, boto3.resource("dynamodb").Table(settings.table), boto3.client("sqs"),
                        boto3.client("s3"))


def record_handler(record: SQSRecord) -> None:
    handle_request(record.body, get_deps())


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict, context: LambdaContext) -> dict:
    return process_partial_response(event=event, record_handler=record_handler, processor=processor, context=context)
