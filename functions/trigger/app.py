"""The trigger Lambda: each message on the requests queue is one OpenAI request (stratus.trigger);
failures are reported per message so only those are redelivered."""

from __future__ import annotations

import functools

from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from aws_lambda_powertools.utilities.typing import LambdaContext

from stratus.deps import deps_from_env
from stratus.observability import logger, metrics, tracer
from stratus.trigger import handle_request

processor = BatchProcessor(event_type=EventType.SQS)


get_deps = functools.cache(deps_from_env)  # clients created once per container


def record_handler(record: SQSRecord) -> None:
    received = int(record.raw_event.get("attributes", {}).get("ApproximateReceiveCount", 1))
    handle_request(record.body, get_deps(), record.message_id, received)


@logger.inject_lambda_context(clear_state=True)  # a warm container never logs under the last request's keys
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict, context: LambdaContext) -> dict:
    return process_partial_response(event=event, record_handler=record_handler, processor=processor, context=context)
