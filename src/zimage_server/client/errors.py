"""Exceptions raised by the SDK: one class per HTTP status the server documents, plus task outcomes."""

from __future__ import annotations

import builtins
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from zimage_server.client.models import Task


class ZImageError(Exception):
    """Base of every SDK error; carries what the server said, when it said anything."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        code: str | None = None,
        request_id: str | None = None,
        param: str | None = None,
        body: Any = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.code = code
        self.request_id = request_id
        self.param = param
        self.body = body

    def __str__(self) -> str:
        prefix = " ".join(str(part) for part in (self.status_code, self.code) if part is not None)
        return f"{prefix}: {self.message}" if prefix else self.message


class BadRequestError(ZImageError):
    """400: the request was not understood (for example invalid JSON)."""


class AuthenticationError(ZImageError):
    """401: the API key is missing, unknown or revoked."""


class InsufficientCreditsError(ZImageError):
    """402: the account's balance does not cover the task; nothing was created."""


class PermissionDeniedError(ZImageError):
    """403: for example an image URL whose signature does not match."""


class NotFoundError(ZImageError):
    """404: no such task (or another account's task), route or price schedule."""


class ConflictError(ZImageError):
    """409: an Idempotency-Key reused with another body, or cancelling a finished task."""


class GoneError(ZImageError):
    """410: an image URL past its expiry, or an image that was deleted."""


class ValidationError(ZImageError):
    """422: a parameter was refused; `param` names it when the server does."""


class RateLimitError(ZImageError):
    """429: too many requests; `retry_after` is the server's hint in seconds."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class ServerError(ZImageError):
    """A 5xx answer."""


class ServiceUnavailableError(ServerError):
    """503: the model is loading or failed to load, or the queue is full."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class ConnectionError(ZImageError, builtins.ConnectionError):
    """The server could not be reached, or the connection failed or timed out, after the retries."""


class TaskFailedError(ZImageError):
    """A task ended `failed` (`code` is its `error_code`, such as `cancelled`)."""

    def __init__(self, task: Task) -> None:
        super().__init__(
            f"task {task.id} failed: {task.error or 'no reason given'}",
            code=task.error_code,
            body=task.model_dump(mode="json"),
        )
        self.task = task


class TaskTimeoutError(ZImageError, builtins.TimeoutError):
    """`run` gave up waiting; the task itself goes on (cancel it if it is no longer wanted)."""

    def __init__(self, task: Task, timeout: float) -> None:
        super().__init__(f"task {task.id} still {task.status} after {timeout:g}s", code="timeout")
        self.task = task
        self.timeout = timeout


class WebhookVerificationError(ZImageError):
    """A webhook whose signature, timestamp or body does not check out: do not trust it."""


STATUS_ERRORS: dict[int, type[ZImageError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    402: InsufficientCreditsError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    410: GoneError,
    422: ValidationError,
    429: RateLimitError,
    503: ServiceUnavailableError,
}
