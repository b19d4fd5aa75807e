"""OpenAI's Images API (`POST /v1/images/generations`) on top of the task queue.

OpenAI clients expect the images in the answer, so the request is a normal task (billed, queued and
recorded like any other, surface "openai") that the handler waits on before answering.
"""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

from fastapi import APIRouter
from pydantic import ValidationError

from zimage_server import tasks
from zimage_server.api.deps import BaseUrl, CurrentPrincipal, State
from zimage_server.api.errors import ERROR_RESPONSES
from zimage_server.api.state import ServiceState
from zimage_server.api.tasks import IdempotencyKeyHeader, create_task
from zimage_server.api.waiting import wait_for_task
from zimage_server.errors import ApiError, ValidationFailed
from zimage_server.schemas import TextToImageRequest
from zimage_server.schemas_openai import GeneratedImage, ImageGenerationRequest, ImagesResponse

router = APIRouter(tags=["OpenAI surface"])

OPENAI_SURFACE = "openai"
AUTO_SIZE = "1024x1024"
# The official client retries 5xx answers by default; a retry would submit (and bill) a second task.
_NO_RETRY = "false"


class TaskEndedBadly(ApiError):
    """The task behind the request failed; it carries the task id so the client can look it up."""

    status_code = 500
    code = "task_failed"

    def __init__(self, message: str, *, task_id: str, status_code: int, code: str) -> None:
        super().__init__(
            message, code=code, headers={"X-RunAPI-Task-Id": task_id, "x-should-retry": _NO_RETRY}
        )
        self.status_code = status_code
        self.task_id = task_id

    def envelope(self) -> dict[str, object]:
        body = super().envelope()
        error = body["error"]
        assert isinstance(error, dict)
        error["task_id"] = self.task_id
        return body


def _to_task_request(request: ImageGenerationRequest, state: ServiceState) -> TextToImageRequest:
    limit = state.settings.max_images_per_task
    n = request.n if request.n is not None else 1
    if n > limit:
        raise ValidationFailed(f"n must be between 1 and {limit}", param="n")
    size = request.size if request.size not in (None, "auto") else AUTO_SIZE
    fields: dict[str, Any] = {
        "model": request.model,
        "prompt": request.prompt,
        "size": size,
        "num_images": n,
        "seed": request.seed,
        "negative_prompt": request.negative_prompt,
        "num_inference_steps": request.num_inference_steps,
        "guidance_scale": request.guidance_scale,
        "output_format": request.output_format or "png",
    }
    try:
        return TextToImageRequest.model_validate(fields)
    except ValidationError as exc:
        # The task body has bounds of its own (prompt length...); report them in this surface's names.
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first.get("loc") else None
        param = {"num_images": "n"}.get(field or "", field)
        raise ValidationFailed(f"{param}: {first['msg']}" if param else first["msg"], param=param) from None


def _failure(body: dict[str, Any]) -> TaskEndedBadly:
    code = str(body.get("error_code") or "task_failed")
    # Out of memory is the server being overloaded, not the request being wrong: worth trying later.
    status = 503 if code == "out_of_memory" else 500
    return TaskEndedBadly(
        f"task {body['id']} failed: {body.get('error') or 'no reason recorded'}",
        task_id=str(body["id"]),
        status_code=status,
        code=code,
    )


@router.post(
    "/v1/images/generations",
    response_model=ImagesResponse,
    response_model_exclude_none=True,
    summary="Generate images (OpenAI Images API); answers once the images are ready",
    responses={**ERROR_RESPONSES, 504: ERROR_RESPONSES[503] | {"description": "Still rendering"}},
)
async def create_images(
    request: ImageGenerationRequest,
    state: State,
    principal: CurrentPrincipal,
    base_url: BaseUrl,
    idempotency_key: IdempotencyKeyHeader = None,
) -> ImagesResponse:
    task_request = _to_task_request(request, state)
    created, _position, _replayed = await asyncio.to_thread(
        create_task, state, principal, task_request, OPENAI_SURFACE, idempotency_key
    )
    task_id = created.id
    # Woken by the worker the moment the task ends, rather than polling for it.
    task, _position = await wait_for_task(state, principal, task_id, state.settings.openai_wait_seconds)
    body = state.renderer.render(task, base_url)
    if task.status == tasks.FAILED:
        raise _failure(body)
    if task.status != tasks.COMPLETED:
        raise TaskEndedBadly(
            f"task {task_id} is still {task.status} after {state.settings.openai_wait_seconds:g}s; "
            f"it keeps running: fetch it with GET /v1/tasks/{task_id}",
            task_id=task_id,
            status_code=504,
            code="task_timeout",
        )
    params = body["input"]
    if request.response_format == "b64_json":
        blobs = await asyncio.to_thread(
            lambda: [(state.store.root / task_id / name).read_bytes() for name in task.image_files]
        )
        data = [GeneratedImage(b64_json=base64.b64encode(blob).decode("ascii")) for blob in blobs]
    else:
        data = [GeneratedImage(url=image["url"]) for image in body["images"]]
    return ImagesResponse(
        created=int(task.completed_at.timestamp() if task.completed_at else time.time()),
        data=data,
        output_format=params["output_format"],
        size=params["size"],
        task_id=task_id,
        seed=int(body["seed"]),
    )
