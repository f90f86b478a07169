"""Faults an AWS service returns, for tests that play them."""

from __future__ import annotations

from collections.abc import Callable

from botocore.exceptions import ClientError


def aws_error(code: str, status: int, operation: str) -> ClientError:
    """The ClientError botocore raises for an error response (ThrottlingException 400, ServiceUnavailable 503...)."""
    return ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, operation
    )


def failing_first(call: Callable, error: Exception, calls: list, when: Callable[[dict], bool] = lambda kw: True):
    """`call` (a client method) that raises `error` the first time `when(kwargs)` holds; each such
    call's time.monotonic() is appended to `calls`."""
    import time

    def wrapped(**kw):
        if when(kw):
            calls.append(time.monotonic())
            if len(calls) == 1:
                raise error
        return call(**kw)

    return wrapped
