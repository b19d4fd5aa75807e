"""Submitting and reading tasks: validation, pricing, persistence and the wire envelope."""

from __future__ import annotations

import hashlib
import json
import math
import secrets
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from zimage_server import billing, webhooks
from zimage_server.accounts import Principal
from zimage_server.catalog import DEFAULT_MODEL_NAME, lookup_model, public_model_names
from zimage_server.config import Settings
from zimage_server.db.models import IdempotencyKey, Task, utcnow
from zimage_server.engine.resolutions import ASPECT_RATIO_SIZES, parse_size
from zimage_server.engine.spec import DEFAULT_GUIDANCE_SCALE, DEFAULT_STEPS
from zimage_server.errors import Conflict, NotFound, RateLimited, ServiceUnavailable, ValidationFailed
from zimage_server.schemas import TextToImageRequest
from zimage_server.storage import OUTPUT_FORMATS, ImageStore

PENDING = "pending"
PROCESSING = "processing"
COMPLETED = "completed"
FAILED = "failed"
ACTIVE_STATUSES = (PENDING, PROCESSING)


def new_task_id() -> str:
    # URL-safe on purpose: the official SDK puts ids in paths without encoding them.
    return f"tsk_{uuid.uuid4().hex}"


@dataclass(frozen=True)
class ValidatedRequest:
    model_name: str
    model_id: str
    params: dict[str, Any]
    price_cents: int
    callback_url: str | None


def _resolve_size(request: TextToImageRequest, settings: Settings) -> tuple[int, int]:
    if request.size is not None and request.aspect_ratio is not None:
        raise ValidationFailed("give either size or aspect_ratio, not both", param="size")
    if request.size is None:
        return ASPECT_RATIO_SIZES[request.aspect_ratio or "1:1"]
    try:
        width, height = parse_size(request.size)
    except ValueError as exc:
        raise ValidationFailed(str(exc), param="size") from None
    if width % 16 or height % 16:
        raise ValidationFailed(
            f"size {width}x{height}: width and height must be multiples of 16", param="size"
        )
    low, high = settings.min_image_side, settings.max_image_side
    if not (low <= width <= high and low <= height <= high):
        raise ValidationFailed(
            f"size {width}x{height}: each side must be between {low} and {high}", param="size"
        )
    if width * height > settings.max_image_pixels:
        raise ValidationFailed(
            f"size {width}x{height} has {width * height} pixels; the limit is {settings.max_image_pixels}",
            param="size",
        )
    return width, height


def validate_request(request: TextToImageRequest, settings: Settings) -> ValidatedRequest:
    """Check everything about a request before any credit is reserved or any row is written."""
    model_name = request.model or DEFAULT_MODEL_NAME
    model = lookup_model(model_name)
    if model is None:
        raise ValidationFailed(
            f"unknown model {model_name!r}; this server offers {', '.join(public_model_names())}",
            param="model",
        )
    prompt = request.prompt
    if not prompt.strip():
        raise ValidationFailed("prompt must not be empty", param="prompt")
    if len(prompt) > settings.max_prompt_chars:
        raise ValidationFailed(
            f"prompt has {len(prompt)} characters; the limit is {settings.max_prompt_chars}", param="prompt"
        )
    if "\x00" in prompt or (request.negative_prompt and "\x00" in request.negative_prompt):
        raise ValidationFailed("prompts must not contain NUL characters", param="prompt")
    if request.negative_prompt is not None and len(request.negative_prompt) > settings.max_prompt_chars:
        raise ValidationFailed(
            f"negative_prompt is longer than {settings.max_prompt_chars} characters", param="negative_prompt"
        )
    if request.enable_safety_checker:
        raise ValidationFailed(
            "enable_safety_checker=true is not supported: this server ships no safety checker, "
            "so it refuses rather than pretending to check; omit it or send false",
            param="enable_safety_checker",
        )
    if request.num_images > settings.max_images_per_task:
        raise ValidationFailed(
            f"num_images must be between 1 and {settings.max_images_per_task}", param="num_images"
        )
    steps = request.num_inference_steps or DEFAULT_STEPS
    if steps > settings.max_inference_steps:
        raise ValidationFailed(
            f"num_inference_steps must be between 1 and {settings.max_inference_steps}",
            param="num_inference_steps",
        )
    width, height = _resolve_size(request, settings)
    callback_url = request.callback_url or None
    if callback_url is not None:
        webhooks.check_target(callback_url, settings)
    seed = request.seed if request.seed is not None else secrets.randbelow(2**32)
    params: dict[str, Any] = {
        "prompt": prompt,
        "negative_prompt": request.negative_prompt,
        "width": width,
        "height": height,
        "aspect_ratio": request.aspect_ratio,
        "size": f"{width}x{height}",
        "seed": seed,
        "num_images": request.num_images,
        "num_inference_steps": steps,
        "guidance_scale": request.guidance_scale
        if request.guidance_scale is not None
        else DEFAULT_GUIDANCE_SCALE,
        "output_format": request.output_format,
    }
    price = billing.task_price_cents(settings.price_cents_per_image, model, request.num_images)
    return ValidatedRequest(model_name, model.id, params, price, callback_url)


def check_queue_bounds(session: Session, account_id: int, settings: Settings) -> None:
    """Back-pressure: refuse new work while the queue is full, before anything is reserved."""
    waiting = select(func.count()).select_from(Task).where(Task.status == PENDING)
    own = int(session.execute(waiting.where(Task.account_id == account_id)).scalar_one())
    if own >= settings.max_pending_tasks_per_account:
        raise RateLimited(
            f"this account already has {own} tasks waiting "
            f"(the limit is {settings.max_pending_tasks_per_account}); wait for some to finish",
            code="too_many_pending_tasks",
            headers={"Retry-After": "5"},
        )
    total = int(session.execute(waiting).scalar_one())
    if total >= settings.max_pending_tasks_total:
        raise ServiceUnavailable(
            f"the server's queue is full ({total} tasks waiting); try again shortly",
            code="queue_full",
            headers={"Retry-After": "10"},
        )


def request_fingerprint(route: str, body: dict[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(f"{route}\n{canonical}".encode()).hexdigest()


def find_replay(
    session: Session, account_id: int, key: str, fingerprint: str, settings: Settings
) -> Task | None:
    """The task an earlier request with this Idempotency-Key created, or None if the key is new (or expired).

    The same key with a different request is a 409: the client is confused, and guessing would charge it.
    """
    record = session.get(IdempotencyKey, (account_id, key))
    if record is None:
        return None
    if record.created_at < utcnow() - timedelta(seconds=settings.idempotency_ttl_seconds):
        session.delete(record)
        session.flush()
        return None
    if record.request_hash != fingerprint:
        raise Conflict(
            "this Idempotency-Key was already used with a different request; use a new key for a new request",
            code="idempotency_key_reused",
        )
    return session.get(Task, record.task_id)


def remember_key(session: Session, account_id: int, key: str, fingerprint: str, task: Task) -> None:
    session.add(IdempotencyKey(account_id=account_id, key=key, request_hash=fingerprint, task_id=task.id))
    session.flush()


def submit(session: Session, principal: Principal, validated: ValidatedRequest, *, surface: str) -> Task:
    task = Task(
        id=new_task_id(),
        account_id=principal.account_id,
        api_key_id=principal.api_key_id,
        surface=surface,
        requested_model=validated.model_name,
        model_id=validated.model_id,
        status=PENDING,
        params=validated.params,
        price_cents=validated.price_cents,
        callback_url=validated.callback_url,
        image_files=[],
    )
    # A savepoint, so that a refusal (402) leaves no task row behind even inside a longer transaction.
    with session.begin_nested():
        session.add(task)
        session.flush()
        billing.reserve(session, task)
    return task


def get_owned(session: Session, principal: Principal, task_id: str) -> Task:
    task = session.get(Task, task_id)
    # Another account's task is reported exactly like a missing one: ids must not leak existence.
    if task is None or task.account_id != principal.account_id:
        raise NotFound(f"no task with id {task_id!r}", code="task_not_found")
    return task


def queue_position(session: Session, task: Task) -> int:
    """Tasks that will run before this one: those rendering now and those queued earlier."""
    ahead = select(func.count()).where(
        or_(
            Task.status == PROCESSING,
            and_(
                Task.status == PENDING,
                or_(
                    Task.created_at < task.created_at,
                    and_(Task.created_at == task.created_at, Task.id < task.id),
                ),
            ),
        )
    )
    return int(session.execute(ahead).scalar_one())


class Renderer:
    """Turns a task row into the envelope both surfaces return."""

    def __init__(self, store: ImageStore, settings: Settings) -> None:
        self._store = store
        self._settings = settings

    def render(self, task: Task, base_url: str, *, queue_position: int | None = None) -> dict[str, Any]:
        params = task.params
        body: dict[str, Any] = {
            "id": task.id,
            "task_id": task.id,
            "object": "task",
            "status": task.status,
            "model": task.requested_model,
            "created_at": task.created_at.isoformat(),
            "started_at": task.started_at.isoformat() if task.started_at else None,
            "completed_at": task.completed_at.isoformat() if task.completed_at else None,
            "input": {key: value for key, value in params.items() if value is not None},
            "seed": params["seed"],
        }
        if task.status == PENDING and queue_position is not None:
            body["queue_position"] = queue_position
        if task.status == PROCESSING and task.progress_total:
            body["progress"] = {"step": task.progress_step, "total": task.progress_total}
        if task.status == COMPLETED and task.completed_at is not None:
            base = (self._settings.public_base_url or base_url).rstrip("/")
            expires = int(
                (task.completed_at + timedelta(seconds=self._settings.signed_url_ttl_seconds)).timestamp()
            )
            media_type = OUTPUT_FORMATS[params["output_format"]][1]
            images = [
                {
                    "url": base + self._store.signed_path(task.id, name, expires),
                    "width": params["width"],
                    "height": params["height"],
                    "content_type": media_type,
                    "seed": params["seed"] + index,
                }
                for index, name in enumerate(task.image_files)
            ]
            body["images"] = images
            body["output"] = {"images": [image["url"] for image in images]}
            body["expires_at"] = expires
            body["usage"] = {
                "cost": task.price_cents / 100,
                "cost_cents": task.price_cents,
                "currency": "USD",
                "generated_images": len(images),
            }
        if task.status == FAILED:
            body["error"] = task.error_message or "the task failed"
            body["error_code"] = task.error_code or "failed"
        return {key: value for key, value in body.items() if value is not None}


CANCELLED_CODE = "cancelled"


class Lifecycle:
    """The one place a task reaches a terminal state: money and the webhook move with it, atomically."""

    def __init__(self, renderer: Renderer, settings: Settings) -> None:
        self._renderer = renderer
        self._settings = settings

    def _finish(self, session: Session, task: Task) -> None:
        base = self._settings.public_base_url or self._settings.local_base_url()
        if task.callback_url:
            webhooks.enqueue(session, task, self._renderer.render(task, base))

    def complete(self, session: Session, task: Task, image_files: list[str]) -> None:
        task.status = COMPLETED
        task.image_files = image_files
        task.completed_at = utcnow()
        task.progress_step = task.progress_total
        task.lease_owner = task.lease_expires_at = None
        billing.settle(session, task)
        self._finish(session, task)

    def fail(self, session: Session, task: Task, code: str, message: str) -> None:
        task.status = FAILED
        task.error_code = code
        task.error_message = message
        task.completed_at = utcnow()
        task.lease_owner = task.lease_expires_at = None
        billing.refund(session, task, reason=message)
        self._finish(session, task)

    def end_cancelled(self, session: Session, task: Task) -> None:
        self.fail(session, task, CANCELLED_CODE, "the task was cancelled by the client")

    def cancel(self, session: Session, task: Task) -> None:
        """A pending task ends now, refunded; a processing one is flagged and stops at its next step."""
        if task.status == PENDING:
            self.end_cancelled(session, task)
        elif task.status == PROCESSING:
            task.cancel_requested = True


def retry_after_seconds(estimate: float) -> int:
    """Whole seconds for the Retry-After header: at least 1, and never so long a client misses much."""
    return max(1, min(30, math.ceil(estimate)))
