"""Text-to-image tasks on both surfaces: RunAPI's `/api/v1/z_image/...` and the seed's `/v1/...`.

One task store sits behind both, so a task created on one surface can be read on the other.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse, StreamingResponse

from zimage_server import tasks
from zimage_server.accounts import Principal
from zimage_server.api.deps import BaseUrl, CurrentPrincipal, State
from zimage_server.api.errors import ERROR_RESPONSES
from zimage_server.api.state import ServiceState
from zimage_server.api.waiting import requested_wait, wait_for_task, watch_task
from zimage_server.db.models import Task
from zimage_server.errors import BadRequest, Conflict, ServiceUnavailable
from zimage_server.schemas import TaskOut, TextToImageRequest
from zimage_server.worker.runner import SETUP_FAILED

router = APIRouter()

RUNAPI_SURFACE = "runapi"
GENERIC_SURFACE = "generic"
IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        description="Retry-safe creation: the same key and body return the original task (for 24 hours).",
    ),
]
PreferHeader = Annotated[
    str | None,
    Header(
        description="`wait=N` (RFC 7240): answer once the task is terminal or after N seconds (at most 60).",
    ),
]
_TASK_RESPONSES: dict[int | str, dict[str, Any]] = {200: {"model": TaskOut}, **ERROR_RESPONSES}


def _task_response(
    state: ServiceState, task: Task, queue_position: int | None, base_url: str
) -> JSONResponse:
    body = state.renderer.render(task, base_url, queue_position=queue_position)
    headers = {"X-RunAPI-Task-Id": task.id}
    if task.status in tasks.ACTIVE_STATUSES:
        estimator = state.runner.estimator
        if task.status == tasks.PENDING:
            # Everything ahead has to render first; assume it looks like this task.
            seconds = estimator.estimate(task.params) * ((queue_position or 0) + 1)
        else:
            done = task.progress_step / task.progress_total if task.progress_total else 0.0
            seconds = estimator.estimate(task.params, fraction_done=done)
        headers["Retry-After"] = str(tasks.retry_after_seconds(seconds))
    return JSONResponse(body, headers=headers)


def create_task(
    state: ServiceState,
    principal: Principal,
    request: TextToImageRequest,
    surface: str,
    idempotency_key: str | None,
) -> tuple[Task, int | None, bool]:
    """Validate, bound, bill and store a new task, or find the one this Idempotency-Key created.

    Returns the task (detached from its session), its queue position and whether it is a replay.
    Every surface that creates work comes through here.
    """
    validated = tasks.validate_request(request, state.settings)
    if idempotency_key is not None and not 1 <= len(idempotency_key) <= 512:
        raise BadRequest("Idempotency-Key must be 1 to 512 characters", code="invalid_idempotency_key")
    if state.runner.state == SETUP_FAILED:
        raise ServiceUnavailable(
            f"the model failed to load, so no task can run: {state.runner.setup_error}",
            code="model_unavailable",
        )
    fingerprint = tasks.request_fingerprint(surface, request.model_dump(mode="json", exclude_unset=True))
    with state.db.session() as session:
        replayed = False
        task: Task | None = None
        if idempotency_key is not None:
            task = tasks.find_replay(
                session, principal.account_id, idempotency_key, fingerprint, state.settings
            )
            replayed = task is not None
        if task is None:
            # Replays are free; only new work counts against the rate limit and the queue bounds.
            state.rate_limiter.acquire(principal.api_key_id)
            tasks.check_queue_bounds(session, principal.account_id, state.settings)
            task = tasks.submit(session, principal, validated, surface=surface)
            if idempotency_key is not None:
                tasks.remember_key(session, principal.account_id, idempotency_key, fingerprint, task)
        position = tasks.queue_position(session, task) if task.status == tasks.PENDING else None
        session.expunge(task)
    if not replayed:
        state.runner.wake()
    return task, position, replayed


async def _create(
    state: ServiceState,
    principal: Principal,
    request: TextToImageRequest,
    base_url: str,
    surface: str,
    idempotency_key: str | None,
    prefer: str | None,
) -> JSONResponse:
    task, position, replayed = await asyncio.to_thread(
        create_task, state, principal, request, surface, idempotency_key
    )
    wait = requested_wait(prefer, state.settings.max_prefer_wait_seconds)
    if wait is not None:
        task, position = await wait_for_task(state, principal, task.id, wait)
    response = _task_response(state, task, position, base_url)
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    if wait is not None:
        response.headers["Preference-Applied"] = f"wait={wait:g}"
    return response


def _cancel(state: ServiceState, principal: Principal, task_id: str, base_url: str) -> JSONResponse:
    with state.db.session() as session:
        task = tasks.get_owned(session, principal, task_id)
        if task.status in (tasks.COMPLETED, tasks.FAILED):
            raise Conflict(
                f"task {task_id} already ended ({task.status}); it cannot be cancelled", code="task_finished"
            )
        state.lifecycle.cancel(session, task)
        session.flush()
        if task.status == tasks.PROCESSING:
            # The worker in this process learns of it at its next step, without waiting for a database check.
            state.runner.request_cancel(task.id)
        response = _task_response(state, task, None, base_url)
    state.webhooks.wake()
    state.completion.notify()
    return response


async def _read(
    state: ServiceState, principal: Principal, task_id: str, base_url: str, prefer: str | None
) -> JSONResponse:
    wait = requested_wait(prefer, state.settings.max_prefer_wait_seconds)
    task, position = await wait_for_task(state, principal, task_id, wait or 0.0)
    response = _task_response(state, task, position, base_url)
    if wait is not None:
        response.headers["Preference-Applied"] = f"wait={wait:g}"
    return response


async def _events(
    state: ServiceState, principal: Principal, task_id: str, base_url: str, request: Request
) -> StreamingResponse:
    task, position = await wait_for_task(state, principal, task_id, 0.0)  # 404 before the stream starts

    async def stream() -> AsyncIterator[str]:
        current, current_position = task, position
        last: tuple[object, ...] | None = None
        quiet_since = time.monotonic()
        while True:
            snapshot = (current.status, current_position, current.progress_step)
            if snapshot != last:
                last = snapshot
                quiet_since = time.monotonic()
                yield _sse_event(state, current, current_position, base_url)
                if current.status not in tasks.ACTIVE_STATUSES:
                    return
            elif time.monotonic() - quiet_since > 15:
                quiet_since = time.monotonic()
                yield ": keep-alive\n\n"  # proxies close connections that stay silent
            if await request.is_disconnected():
                return
            current, current_position = await watch_task(state, principal, task_id)

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "X-RunAPI-Task-Id": task_id},
    )


def _sse_event(state: ServiceState, task: Task, position: int | None, base_url: str) -> str:
    if task.status == tasks.PENDING:
        name, data = "queued", {"id": task.id, "status": task.status, "queue_position": position}
    elif task.status == tasks.PROCESSING:
        name = "progress"
        data = {
            "id": task.id,
            "status": task.status,
            "step": task.progress_step,
            "total": task.progress_total,
        }
    else:
        name, data = task.status, state.renderer.render(task, base_url)
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


_EVENTS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {}}, "description": "queued, progress, then completed or failed"},
    **ERROR_RESPONSES,
}


def _add_surface(surface: str, create_path: str, task_path: str, tag: str) -> None:
    """The same four operations on one surface's paths; both surfaces share one task store."""

    async def create(
        request: TextToImageRequest,
        state: State,
        principal: CurrentPrincipal,
        base_url: BaseUrl,
        idempotency_key: IdempotencyKeyHeader = None,
        prefer: PreferHeader = None,
    ) -> JSONResponse:
        return await _create(state, principal, request, base_url, surface, idempotency_key, prefer)

    async def get(
        task_id: str,
        state: State,
        principal: CurrentPrincipal,
        base_url: BaseUrl,
        prefer: PreferHeader = None,
    ) -> JSONResponse:
        return await _read(state, principal, task_id, base_url, prefer)

    def cancel(task_id: str, state: State, principal: CurrentPrincipal, base_url: BaseUrl) -> JSONResponse:
        return _cancel(state, principal, task_id, base_url)

    async def events(
        task_id: str, request: Request, state: State, principal: CurrentPrincipal, base_url: BaseUrl
    ) -> StreamingResponse:
        return await _events(state, principal, task_id, base_url, request)

    common: dict[str, Any] = {"tags": [tag]}
    router.add_api_route(
        create_path,
        create,
        methods=["POST"],
        name=f"create_{surface}_task",
        responses=_TASK_RESPONSES,
        summary="Create a text-to-image task (answers at once, or with Prefer: wait once it ends)",
        **common,
    )
    router.add_api_route(
        task_path,
        get,
        methods=["GET"],
        name=f"get_{surface}_task",
        responses=_TASK_RESPONSES,
        summary="Get a task",
        **common,
    )
    router.add_api_route(
        f"{task_path}/cancel",
        cancel,
        methods=["POST"],
        name=f"cancel_{surface}_task",
        responses=_TASK_RESPONSES,
        summary="Cancel a task: pending ones end at once, processing ones at the next step",
        **common,
    )
    router.add_api_route(
        f"{task_path}/events",
        events,
        methods=["GET"],
        name=f"{surface}_task_events",
        response_class=StreamingResponse,
        responses=_EVENTS_RESPONSES,
        summary="Server-sent events: queue position, step i/N, then the finished task with its URLs",
        **common,
    )


_add_surface(
    RUNAPI_SURFACE,
    "/api/v1/z_image/text_to_image",
    "/api/v1/z_image/text_to_image/{task_id}",
    "RunAPI surface",
)
_add_surface(GENERIC_SURFACE, "/v1/text_to_image", "/v1/tasks/{task_id}", "Generic surface")
