"""Errors the sidecar answers with a specific HTTP status.

Each carries the status and a stable ``code``; the app turns any of them into
``{"error": {"message", "type", "code"}}`` (the OpenAI error shape), so a
client can always tell "blocked by policy" (``type: policy_violation``) from
"the auditor failed" (``type: auditor_error``).
"""

from __future__ import annotations

from auditor.errors import AuditorError

__all__ = [
    "ServerError",
    "BadRequestError",
    "UnauthorizedError",
    "NotFoundError",
    "TooLargeError",
    "OverloadedError",
    "AuditTimeoutError",
    "AuditFailedError",
    "CompletionTooLongError",
    "UpstreamError",
    "NotReadyError",
]


class ServerError(AuditorError):
    """An error with an HTTP status, an error ``type`` and a ``code``."""

    status: int = 500
    type: str = "server_error"
    code: str = "internal_error"
    headers: dict[str, str] | None = None


class BadRequestError(ServerError):
    """The request is well-formed JSON but asks for something invalid."""

    status = 422
    type = "invalid_request_error"
    code = "invalid_request"


class UnauthorizedError(ServerError):
    """A bearer token is required and was missing or wrong."""

    status = 401
    type = "authentication_error"
    code = "invalid_api_key"
    headers = {"WWW-Authenticate": "Bearer"}


class NotFoundError(ServerError):
    """A named thing (policy, alert) does not exist."""

    status = 404
    type = "invalid_request_error"
    code = "not_found"


class TooLargeError(ServerError):
    """The body or an input's token count is over the configured limit."""

    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class OverloadedError(ServerError):
    """The audit queue is full; retry after ``retry_after_s`` seconds."""

    status = 503
    type = "auditor_error"
    code = "overloaded"

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.headers = {"Retry-After": str(retry_after_s)}


class AuditTimeoutError(ServerError):
    """The audit did not finish within the request timeout."""

    status = 504
    type = "auditor_error"
    code = "audit_timeout"


class AuditFailedError(ServerError):
    """The auditor failed on a proxied request and ``fail_mode`` is closed."""

    status = 503
    type = "auditor_error"
    code = "auditor_unavailable"


class CompletionTooLongError(ServerError):
    """An upstream's completion is longer than the auditor reads (``max_tokens``): the auditor's
    limit, not the client's mistake, so the fail mode applies."""

    status = 503
    type = "auditor_error"
    code = "completion_too_long"


class UpstreamError(ServerError):
    """The upstream server could not be reached or answered with an error."""

    status = 502
    type = "upstream_error"
    code = "upstream_unavailable"


class NotReadyError(ServerError):
    """The model or the policies are still loading."""

    status = 503
    type = "auditor_error"
    code = "not_ready"
    headers = {"Retry-After": "5"}
