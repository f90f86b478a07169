"""Typed errors. Each carries the HTTP status and OpenAI error type the API maps it to.

Messages name the field, the allowed range and the bad value, e.g.
"top_p must be in (0, 1], got 1.5".
"""

from __future__ import annotations

import re


class StratusError(Exception):
    """Base class: every error the project raises on purpose."""

    status = 500
    error_type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(StratusError):
    """The caller sent something we cannot serve (400)."""

    status = 400
    error_type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    """Prompt tokens plus max_tokens do not fit the model's context window (400)."""

    code = "context_length_exceeded"

    def __init__(self, prompt_tokens: int, max_tokens: int, context_length: int) -> None:
        super().__init__(
            f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) = "
            f"{prompt_tokens + max_tokens} exceeds the model's context length of {context_length}",
            param="max_tokens",
        )
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.context_length = context_length


class ModelBuildError(StratusError):
    """The model pipeline cannot convert its input (bad file, unsupported architecture or type)."""


class ModelLoadError(StratusError):
    """A model directory is missing files or is not a model the engine can run."""


class Unauthorized(StratusError):
    status = 401
    error_type = "invalid_request_error"
    code = "invalid_api_key"


class NotFound(StratusError):
    status = 404
    error_type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class Forbidden(StratusError):
    """The key is valid but may not do this (403)."""

    status = 403
    error_type = "permission_error"
    code = "model_not_allowed"


class Conflict(StratusError):
    status = 409
    error_type = "invalid_request_error"
    code = "conflict"


class PayloadTooLarge(StratusError):
    status = 413
    error_type = "invalid_request_error"
    code = "request_too_large"


class RateLimited(StratusError):
    status = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unavailable(StratusError):
    status = 503
    error_type = "server_error"
    code = "service_unavailable"
    retry_after_s = 2  # every 503 says when to come back


class NotConfigured(StratusError):
    """A route this deployment cannot serve until an operator sets something (named in the message)."""

    status = 501
    error_type = "server_error"
    code = "not_configured"


# Codes AWS answers when the same call may succeed later (botocore's throttling and transient classes).
TRANSIENT_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        "RequestLimitExceeded",
        "LimitExceededException",
        "SlowDown",
        "RequestTimeout",
        "RequestTimeoutException",
        "PriorRequestNotComplete",
        "InternalServerError",
        "InternalError",
        "ServiceUnavailable",
        "TransactionInProgressException",
    }
)


def transient(exc: BaseException) -> bool:
    """A storage call that may succeed if tried again (throttled, a 5xx, a timeout, a dropped
    connection), not one the service refused as invalid (ValidationException, AccessDenied...)."""
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError

    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return exc.response.get("Error", {}).get("Code") in TRANSIENT_CODES or status >= 500
    return isinstance(exc, (ConnectionError, HTTPClientError))


def shown(value, limit: int = 40) -> str:
    """A bad value as an error message names it: its repr, cut to `limit` characters."""
    text = repr(value)  # (JSON never gives an integer Python cannot print: 4,300 digits at most)
    return text if len(text) <= limit else text[:limit] + "…"


def refusal_reason(exc: StratusError) -> str:
    """A bounded metric dimension for an error: its code, or the field it names with list indices
    dropped (messages[17].content -> bad_messages[].content), or its type. Each distinct value is a
    metric series of its own, so a request must not be able to make new ones."""
    if exc.code:
        return exc.code
    if not exc.param:
        return exc.error_type
    return "bad_" + re.sub(r"\[\d+\]", "[]", exc.param)[:64]
