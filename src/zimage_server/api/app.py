"""The application factory: wires settings, database, storage, worker and routes into one ASGI app."""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request, Response

from zimage_server import __version__
from zimage_server.api import account, public
from zimage_server.api import tasks as task_routes
from zimage_server.api.errors import install_error_handlers, internal_error_response
from zimage_server.api.state import ServiceState
from zimage_server.config import Settings
from zimage_server.db.session import Database
from zimage_server.engine import ModelChoice, resolve_model_source
from zimage_server.storage import ImageStore
from zimage_server.tasks import Renderer
from zimage_server.worker.runner import Runner

if TYPE_CHECKING:
    from zimage_server.engine import ZImageEngine

log = logging.getLogger(__name__)

# A client's own request id is echoed back only when it is short and harmless in logs and headers.
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def build_state(
    settings: Settings,
    *,
    model_choice: ModelChoice | None = None,
    load_engine: Callable[[], ZImageEngine] | None = None,
) -> ServiceState:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    choice = model_choice or resolve_model_source(settings.model, settings.models_dir)
    if load_engine is None:

        def load_engine() -> ZImageEngine:
            from zimage_server.engine import ZImageEngine

            return ZImageEngine.load(choice.source, random_weights=choice.random_weights)

    db = Database(settings.resolved_database_url)
    store = ImageStore(settings.images_dir, settings.signing_secret)
    runner = Runner(db, store, settings, load_engine)
    return ServiceState(
        settings=settings,
        db=db,
        store=store,
        renderer=Renderer(store, settings),
        runner=runner,
        model_choice=choice,
    )


def create_app(state: ServiceState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        state.db.migrate()
        requeued = state.runner.requeue_interrupted()
        if requeued:
            log.warning("re-queued %d task(s) left processing by an earlier run", requeued)
        state.runner.start()
        try:
            yield
        finally:
            state.runner.stop()
            state.db.dispose()

    app = FastAPI(
        title="zimage-server",
        version=__version__,
        summary="Self-hosted, RunAPI-compatible Z-Image text-to-image service",
        lifespan=lifespan,
    )
    app.state.service = state
    install_error_handlers(app)

    @app.middleware("http")
    async def request_id(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        incoming = request.headers.get("x-request-id", "")
        rid = incoming if _CLIENT_REQUEST_ID.fullmatch(incoming) else f"req_{secrets.token_hex(12)}"
        try:
            response = await call_next(request)
        except Exception:
            # Handled here rather than by Starlette's outermost error middleware, so 500s carry the id too.
            log.exception("unhandled error on %s %s (request %s)", request.method, request.url.path, rid)
            response = internal_error_response()
        response.headers["x-request-id"] = rid
        return response

    app.include_router(task_routes.router)
    app.include_router(account.router)
    app.include_router(public.router)
    return app
