"""Text-to-image tasks on both surfaces: RunAPI's `/api/v1/z_image/...` and the seed's `/v1/...`.

One task store sits behind both, so a task created on one surface can be read on the other.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from zimage_server import tasks
from zimage_server.api.deps import BaseUrl, CurrentPrincipal, State
from zimage_server.api.errors import ERROR_RESPONSES
from zimage_server.api.state import ServiceState
from zimage_server.db.models import Task
from zimage_server.errors import ServiceUnavailable
from zimage_server.schemas import TaskOut, TextToImageRequest
from zimage_server.worker.runner import SETUP_FAILED

router = APIRouter()

RUNAPI_SURFACE = "runapi"
GENERIC_SURFACE = "generic"
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
    state: ServiceState, principal: Any, request: TextToImageRequest, base_url: str, surface: str
) -> JSONResponse:
    validated = tasks.validate_request(request, state.settings)
    if state.runner.state == SETUP_FAILED:
        raise ServiceUnavailable(
            f"the model failed to load, so no task can run: {state.runner.setup_error}",
            code="model_unavailable",
        )
    with state.db.session() as session:
        task = tasks.submit(session, principal, validated, surface=surface)
        position = tasks.queue_position(session, task)
        response = _task_response(state, task, position, base_url)
    state.runner.wake()
    return response


def _read(state: ServiceState, principal: Any, task_id: str, base_url: str) -> JSONResponse:
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
    request: TextToImageRequest, state: State, principal: CurrentPrincipal, base_url: BaseUrl
) -> JSONResponse:
    return _create(state, principal, request, base_url, RUNAPI_SURFACE)


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
    request: TextToImageRequest, state: State, principal: CurrentPrincipal, base_url: BaseUrl
) -> JSONResponse:
    return _create(state, principal, request, base_url, GENERIC_SURFACE)


@router.get("/v1/tasks/{task_id}", tags=["Generic surface"], summary="Get a task", responses=_TASK_RESPONSES)
def get_generic_task(
    task_id: str, state: State, principal: CurrentPrincipal, base_url: BaseUrl
) -> JSONResponse:
    return _read(state, principal, task_id, base_url)
