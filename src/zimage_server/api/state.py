"""Everything a request handler may need, built once per process by the app factory."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from zimage_server.api.waiting import CompletionSignal
from zimage_server.config import Settings
from zimage_server.db.session import Database
from zimage_server.limits import RateLimiter
from zimage_server.storage import ImageStore
from zimage_server.tasks import Lifecycle, Renderer
from zimage_server.webhooks import WebhookDispatcher
from zimage_server.worker.runner import Runner

if TYPE_CHECKING:
    from zimage_server.engine import ModelChoice


@dataclass
class ServiceState:
    settings: Settings
    db: Database
    store: ImageStore
    renderer: Renderer
    lifecycle: Lifecycle
    runner: Runner
    webhooks: WebhookDispatcher
    rate_limiter: RateLimiter
    model_choice: ModelChoice
    completion: CompletionSignal
