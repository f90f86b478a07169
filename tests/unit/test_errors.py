"""Which storage failures are worth trying again (stratus.errors.transient)."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, ParamValidationError, ReadTimeoutError

from stratus.errors import transient


def aws_error(code: str, status: int = 400) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": "..."}, "ResponseMetadata": {"HTTPStatusCode": status}}, "UpdateItem"
    )


@pytest.mark.parametrize(
    "exc, expected",
    [
        (aws_error("ProvisionedThroughputExceededException"), True),
        (aws_error("ThrottlingException"), True),
        (aws_error("SlowDown", 503), True),
        (aws_error("SomethingNew", 500), True),  # any 5xx
        (ReadTimeoutError(endpoint_url="http://dynamodb"), True),
        (EndpointConnectionError(endpoint_url="http://dynamodb"), True),
        (aws_error("ValidationException"), False),
        (aws_error("AccessDeniedException"), False),
        (aws_error("ConditionalCheckFailedException"), False),
        (ParamValidationError(report="bad"), False),
        (ValueError("a result of 500000 bytes needs S3"), False),
    ],
)
def test_only_passing_failures_are_transient(exc, expected):
    assert transient(exc) is expected
