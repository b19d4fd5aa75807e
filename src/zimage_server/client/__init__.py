"""Python SDK for zimage-server.

    from zimage_server.client import ZImage

    with ZImage() as client:  # ZIMAGE_BASE_URL, ZIMAGE_API_KEY
        task = client.run("a lighthouse at dusk", aspect_ratio="16:9")
        client.save(task, "lighthouse.png")

It needs only httpx and pydantic (and standardwebhooks for `verify_webhook`): no torch, no server code.
"""

from zimage_server.client._async import AsyncZImage
from zimage_server.client._core import DEFAULT_BASE_URL, TaskParams
from zimage_server.client._sync import ZImage
from zimage_server.client.errors import (
    AuthenticationError,
    BadRequestError,
    ConflictError,
    ConnectionError,
    GoneError,
    InsufficientCreditsError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
    ServiceUnavailableError,
    TaskFailedError,
    TaskTimeoutError,
    ValidationError,
    WebhookVerificationError,
    ZImageError,
)
from zimage_server.client.models import Balance, Image, ModelInfo, Progress, Task, Usage
from zimage_server.client.webhooks import verify_webhook

__all__ = [
    "DEFAULT_BASE_URL",
    "AsyncZImage",
    "AuthenticationError",
    "BadRequestError",
    "Balance",
    "ConflictError",
    "ConnectionError",
    "GoneError",
    "Image",
    "InsufficientCreditsError",
    "ModelInfo",
    "NotFoundError",
    "PermissionDeniedError",
    "Progress",
    "RateLimitError",
    "ServerError",
    "ServiceUnavailableError",
    "Task",
    "TaskFailedError",
    "TaskParams",
    "TaskTimeoutError",
    "Usage",
    "ValidationError",
    "WebhookVerificationError",
    "ZImage",
    "ZImageError",
    "verify_webhook",
]
