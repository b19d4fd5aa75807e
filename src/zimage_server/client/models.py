"""Typed results. Every model allows extra fields, so a newer server never breaks an older SDK."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, PrivateAttr, field_validator

PENDING = "pending"
PROCESSING = "processing"
COMPLETED = "completed"
FAILED = "failed"
TERMINAL_STATUSES = frozenset({COMPLETED, FAILED})


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow")


class Image(_Model):
    url: str
    width: int | None = None
    height: int | None = None
    content_type: str | None = None
    seed: int | None = None


class Usage(_Model):
    cost: float | None = None
    cost_cents: int | None = None
    currency: str | None = None
    generated_images: int | None = None


class Progress(_Model):
    step: int
    total: int


class Task(_Model):
    """A text-to-image task as the server reports it."""

    id: str
    status: str
    task_id: str | None = None
    model: str | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    input: dict[str, Any] | None = None
    seed: int | None = None
    images: list[Image] = []
    usage: Usage | None = None
    error: str | None = None
    error_code: str | None = None
    progress: Progress | None = None
    queue_position: int | None = None
    expires_at: int | None = None

    # The Retry-After header of the answer this task came from: when the server expects it to move on.
    _retry_after: float | None = PrivateAttr(default=None)

    @field_validator("images", mode="before")
    @classmethod
    def _no_images_yet(cls, value: Any) -> Any:
        # Pending and processing tasks may send `images: null`; an empty list is easier to work with.
        return [] if value is None else value

    @property
    def retry_after(self) -> float | None:
        """Seconds the server suggested waiting before polling again (pending and processing tasks)."""
        return self._retry_after

    @property
    def done(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def urls(self) -> list[str]:
        return [image.url for image in self.images]


class Balance(_Model):
    """Credits in cents. Bonus credits are spent before paid ones."""

    balance_cents: int
    paid_balance_cents: int
    bonus_balance_cents: int
    spent_cents_today: int
    spent_cents_total: int
    reserved_cents: int = 0
    currency: str = "USD"


class ModelInfo(_Model):
    """An entry of `GET /v1/models`; `served_weights` says whether real Z-Image weights are live."""

    id: str
    object: str = "model"
    owned_by: str | None = None
    canonical_id: str | None = None
    description: str | None = None
    served_weights: dict[str, Any] | None = None
