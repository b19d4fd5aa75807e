"""Unauthenticated routes: the model catalog, health probes, and signed image files."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import FileResponse

from zimage_server.api import chat
from zimage_server.api.deps import State
from zimage_server.api.errors import ERROR_RESPONSES
from zimage_server.api.state import ServiceState
from zimage_server.catalog import CATALOG
from zimage_server.errors import ServiceUnavailable
from zimage_server.schemas import ModelCard, ModelList, UpstreamModelCard
from zimage_server.worker.runner import READY, SETUP_FAILED

router = APIRouter()


def served_weights(state: ServiceState) -> dict[str, Any]:
    """What is really behind the model names: clients and humans must be able to tell noise from Z-Image."""
    choice = state.model_choice
    described: dict[str, Any] = {
        "source": choice.source,
        "random_weights": choice.random_weights,
        "reason": choice.reason,
        "engine_state": state.runner.state,
    }
    if choice.random_weights:
        described["warning"] = (
            "tiny randomly initialised Z-Image pipeline: images are noise, not Z-Image output"
        )
    if state.runner.engine is not None:
        described.update(
            device=str(state.runner.engine.device),
            dtype=str(state.runner.engine.dtype).removeprefix("torch."),
        )
    return described


@router.get("/v1/models", response_model=ModelList, tags=["Public"])
async def list_models(state: State) -> ModelList:
    weights = served_weights(state)
    ours: list[ModelCard | UpstreamModelCard] = [
        ModelCard(id=name, canonical_id=model.id, description=model.description, served_weights=weights)
        for model in CATALOG
        for name in (*model.aliases, model.id)
    ]
    taken = {card.id for card in ours}
    # With a chat upstream, its models are listed too: one catalog for one key.
    theirs = [
        UpstreamModelCard.model_validate(model)
        for model in await chat.upstream_models(state.settings)
        if model["id"] not in taken
    ]
    return ModelList(data=ours + theirs)


@router.get("/healthz", tags=["Public"], summary="Liveness: the process answers")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", tags=["Public"], summary="Readiness: the model is loaded and the worker runs")
def readyz(state: State) -> dict[str, Any]:
    if state.runner.state == READY:
        return {"status": "ready", "model": served_weights(state)}
    if state.runner.state == SETUP_FAILED:
        raise ServiceUnavailable(
            f"the model failed to load: {state.runner.setup_error}", code="model_unavailable"
        )
    raise ServiceUnavailable(
        f"the model is not ready yet (worker {state.runner.state})",
        code="model_loading",
        headers={"Retry-After": "5"},
    )


@router.get(
    "/files/{task_id}/{name}",
    tags=["Public"],
    summary="An image, by signed URL",
    response_class=FileResponse,
    responses={
        200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}}, "description": "The image"},
        **{status: ERROR_RESPONSES[status] for status in (403, 404, 410)},
    },
)
def get_file(task_id: str, name: str, state: State, expires: str = "", signature: str = "") -> FileResponse:
    stored = state.store.open_signed(task_id, name, expires, signature)
    # Same URL, same bytes: let clients and proxies keep it until the signature expires.
    return FileResponse(
        stored.path, media_type=stored.media_type, headers={"Cache-Control": "private, max-age=86400"}
    )
