"""Wire models: what clients send and what they get back. The contract, and nothing else."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

AspectRatio = Literal["1:1", "4:3", "3:4", "16:9", "9:16"]
OutputFormat = Literal["png", "jpeg", "webp"]
TaskStatus = Literal["pending", "processing", "completed", "failed"]
# RunAPI's contract: prompts of 1 to 1000 code points. Settings may lower the bound, not raise it.
MAX_PROMPT_CHARS = 1000


class TextToImageRequest(BaseModel):
    """The body of a text-to-image task, on both the RunAPI and the generic surface.

    Bounds that an operator can change (prompt length, sizes, steps, images per task) are checked
    by the tasks service against the settings, so they are not fixed here.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = Field(default=None, description="`z-image` (RunAPI's name) or `z-image-turbo`.")
    prompt: str = Field(
        min_length=1,
        max_length=MAX_PROMPT_CHARS,
        description="What to draw, 1-1000 characters (code points), Chinese or English.",
    )
    negative_prompt: str | None = Field(
        default=None, max_length=MAX_PROMPT_CHARS, description="What to avoid (no effect at guidance 0)."
    )
    aspect_ratio: AspectRatio | None = Field(default=None, description="Mapped to a size near one megapixel.")
    size: str | None = Field(
        default=None, description='"WIDTHxHEIGHT", both multiples of 16.', examples=["1024x1024"]
    )
    seed: int | None = Field(
        default=None, ge=0, le=2**32 - 1, description="Random when omitted; image i uses seed+i."
    )
    num_images: int = Field(default=1, ge=1, description="Images in this task (at most 4 by default).")
    num_inference_steps: int | None = Field(
        default=None, ge=1, description="Denoising steps (Turbo default 8)."
    )
    guidance_scale: float | None = Field(
        default=None, ge=0, le=20, description="0 (Turbo default) disables CFG."
    )
    output_format: OutputFormat = "png"
    callback_url: str | None = Field(default=None, max_length=2048, description="Called when the task ends.")
    enable_safety_checker: bool | None = Field(
        default=None, description="No checker ships yet: true is refused."
    )


class ImageOut(BaseModel):
    url: str
    width: int
    height: int
    content_type: str
    seed: int


class Usage(BaseModel):
    cost: float = Field(description="What the task cost, in US dollars.")
    cost_cents: int
    currency: Literal["USD"] = "USD"
    generated_images: int


class Progress(BaseModel):
    step: int
    total: int


class TaskOutput(BaseModel):
    images: list[str]


class TaskOut(BaseModel):
    """A task as both surfaces return it: `id` and `task_id` are the same value."""

    id: str
    task_id: str
    object: Literal["task"] = "task"
    status: TaskStatus
    model: str
    created_at: datetime
    started_at: datetime | None = None
    completed_at: datetime | None = None
    input: dict[str, Any]
    seed: int
    images: list[ImageOut] | None = None
    output: TaskOutput | None = None
    error: str | None = None
    error_code: str | None = None
    usage: Usage | None = None
    expires_at: int | None = Field(default=None, description="Unix time after which image URLs stop working.")
    queue_position: int | None = Field(
        default=None, description="Tasks that run before this one (pending tasks only)."
    )
    progress: Progress | None = None


class ErrorDetail(BaseModel):
    code: str
    message: str
    param: str | None = None


class ErrorEnvelope(BaseModel):
    error: ErrorDetail


class AccountRecord(BaseModel):
    id: int
    name: str


class MeOut(BaseModel):
    id: int
    name: str
    email: str
    account: AccountRecord


class BalanceOut(BaseModel):
    balance_cents: int
    paid_balance_cents: int
    bonus_balance_cents: int
    spent_cents_today: int
    spent_cents_total: int
    reserved_cents: int
    currency: Literal["USD"] = "USD"


class PriceSchedule(BaseModel):
    service: str
    action: str
    model: str | None
    pricing_status: str
    catalog_status: str
    currency: str
    billing_unit: str | None
    billing_strategy: str | None
    unit_price_cents: int | None


class PriceScheduleList(BaseModel):
    as_of: str
    price_schedules: list[PriceSchedule]


class PriceQuoteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    service: str
    action: str
    model: str | None = None
    params: dict[str, Any] | None = None


class PriceQuote(BaseModel):
    service: str
    action: str
    model: str | None
    pricing_status: str
    currency: str
    reservation_amount_cents: int
    estimate_basis: str
    as_of: str


class PriceQuoteOut(BaseModel):
    price_quote: PriceQuote


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    owned_by: str = "zimage-server"
    canonical_id: str
    description: str
    served_weights: dict[str, Any]


class UpstreamModelCard(BaseModel):
    """A chat model of the configured upstream, passed through as the upstream describes it."""

    model_config = ConfigDict(extra="allow")

    id: str
    object: str = "model"
    owned_by: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard | UpstreamModelCard]
