"""The dispatch Lambda (WorkerTarget=sagemaker): each jobs-queue message goes to the SageMaker
asynchronous endpoint. The message is written to s3://<bucket>/sagemaker/in/ and handed over with
InvokeEndpointAsync; the container runs the job through the job store (claim, generate, DONE), so
everything downstream is the same as with queue workers.

Each job handed over is marked first, and the function's schedule event sweeps the marked jobs
for those the endpoint will never finish (stratus.reaper)."""

from __future__ import annotations

import functools
import time

import boto3
from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from aws_lambda_powertools.utilities.typing import LambdaContext

from stratus.contracts import QueueMessage
from stratus.deps import deps_from_env
from stratus.observability import logger, metrics, tracer
from stratus.reaper import mark_dispatched, reap

processor = BatchProcessor(event_type=EventType.SQS)
get_deps = functools.cache(deps_from_env)  # clients created once per container
INVOCATION_TIMEOUT_S = 3600  # SageMaker async's longest


@functools.cache
def sagemaker():
    return boto3.client("sagemaker-runtime")


def record_handler(record: SQSRecord) -> None:
    deps = get_deps()
    msg = QueueMessage.from_body(record.body)  # refuse what the container could not read
    job_id = msg.job_id
    # marked before the hand-over, so no job handed over goes unmarked (a finished one is not marked:
    # the container only posts the replies it may owe, as a queue worker does with a redelivery)
    mark_dispatched(deps.table, msg)
    key = f"sagemaker/in/{job_id}/{record.message_id}.json"
    deps.s3.put_object(Bucket=deps.settings.bucket, Key=key, Body=record.body.encode(), ContentType="application/json")
    sagemaker().invoke_endpoint_async(
        EndpointName=deps.settings.sagemaker_endpoint,
        InputLocation=f"s3://{deps.settings.bucket}/{key}",
        ContentType="application/json",
        InvocationTimeoutSeconds=INVOCATION_TIMEOUT_S,
    )
    logger.info("dispatched", extra={"job_id": job_id})


@logger.inject_lambda_context(clear_state=True)  # a warm container never logs under the last request's keys
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict, context: LambdaContext) -> dict:
    if event.get("detail-type") == "Scheduled Event":
        deps = get_deps()
        swept = reap(deps.store, sqs=deps.sqs, s3=deps.s3, now=time.time(), heartbeat_s=deps.settings.heartbeat_s)
        logger.info("swept the dispatched jobs", extra=swept)
        return swept
    return process_partial_response(event=event, record_handler=record_handler, processor=processor, context=context)
