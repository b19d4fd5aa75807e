"""Text-to-image tasks on both surfaces: RunAPI's `/api/v1/z_image/...` and the seed's `/v1/...`.

One task store sits behind both, so a task created on one surface can be read on the other.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header
from fastapi.responses import JSONResponse

from zimage_server import tasks
from zimage_server.accounts import Principal
from zimage_server.api.deps import BaseUrl, CurrentPrincipal, State
from zimage_server.api.errors import ERROR_RESPONSES
from zimage_server.api.state import ServiceState
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


def _create(
    state: ServiceState,
    principal: Principal,
    request: TextToImageRequest,
    base_url: str,
    surface: str,
    idempotency_key: str | None,
) -> JSONResponse:
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
        if idempotency_key is not None:
            original = tasks.find_replay(
                session, principal.account_id, idempotency_key, fingerprint, state.settings
            )
            if original is not None:
                response = _task_response(state, original, tasks.queue_position(session, original), base_url)
                response.headers["Idempotent-Replayed"] = "true"
                return response
        # Replays above are free; only new work counts against the rate limit and the queue bounds.
        state.rate_limiter.acquire(principal.api_key_id)
        tasks.check_queue_bounds(session, principal.account_id, state.settings)
        task = tasks.submit(session, principal, validated, surface=surface)
        if idempotency_key is not None:
            tasks.remember_key(session, principal.account_id, idempotency_key, fingerprint, task)
        response = _task_response(state, task, tasks.queue_position(session, task), base_url)
    state.runner.wake()
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
        response = _task_response(state, task, None, base_url)
    state.webhooks.wake()
    return response


def _read(state: ServiceState, principal: Principal, task_id: str, base_url: str) -> JSONResponse:
    with state.db.session() as session:
        task = tasks.get_owned(session, principal, task_id)
        position = tasks.queue_position(session, task) if task.status == tasks.PENDING else None
        return _task_response(state, task, position, base_url)


@router.post(
    "/api/v1/z_image/text_to_image",
    tags=["RunAPI surface"],
    summary="Create a Z-Image text-to-image task",
    responses=_TASK_RESPONSES,
)
def create_runapi_task(
    request: TextToImageRequest,
    state: State,
    principal: CurrentPrincipal,
    base_url: BaseUrl,
    idempotency_key: IdempotencyKeyHeader = None,
) -> JSONResponse:
    return _create(state, principal, request, base_url, RUNAPI_SURFACE, idempotency_key)


@router.get(
    "/api/v1/z_image/text_to_image/{task_id}",
    tags=["RunAPI surface"],
    summary="Get a text-to-image task",
    responses=_TASK_RESPONSES,
)
def get_runapi_task(
    task_id: str, state: State, principal: CurrentPrincipal, base_url: BaseUrl
) -> JSONResponse:
    return _read(state, principal, task_id, base_url)


@router.post(
    "/v1/text_to_image",
    tags=["Generic surface"],
    summary="Create a text-to-image task (answers {task_id, id, status, model})",
    responses=_TASK_RESPONSES,
)
def create_generic_task(
    request: TextToImageRequest,
    state: State,
    principal: CurrentPrincipal,
    base_url: BaseUrl,
    idempotency_key: IdempotencyKeyHeader = None,
) -> JSONResponse:
    return _create(state, principal, request, base_url, GENERIC_SURFACE, idempotency_key)


@router.get("/v1/tasks/{task_id}", tags=["Generic surface"], summary="Get a task", responses=_TASK_RESPONSES)
def get_generic_task(
    task_id: str, state: State, principal: CurrentPrincipal, base_url: BaseUrl
) -> JSONResponse:
    return _read(state, principal, task_id, base_url)


@router.post(
    "/api/v1/z_image/text_to_image/{task_id}/cancel",
    tags=["RunAPI surface"],
    summary="Cancel a task: pending ones end at once, processing ones at the next step",
    responses=_TASK_RESPONSES,
)
def cancel_runapi_task(
    task_id: str, state: State, principal: CurrentPrincipal, base_url: BaseUrl
) -> JSONResponse:
    return _cancel(state, principal, task_id, base_url)


@router.post(
    "/v1/tasks/{task_id}/cancel",
    tags=["Generic surface"],
    summary="Cancel a task: pending ones end at once, processing ones at the next step",
    responses=_TASK_RESPONSES,
)
def cancel_generic_task(
    task_id: str, state: State, principal: CurrentPrincipal, base_url: BaseUrl
) -> JSONResponse:
    return _cancel(state, principal, task_id, base_url)
