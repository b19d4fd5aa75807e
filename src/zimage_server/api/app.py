"""The application factory: wires settings, database, storage, worker and routes into one ASGI app."""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request, Response

from zimage_server import __version__
from zimage_server.api import account, chat, openai_images, public
from zimage_server.api import tasks as task_routes
from zimage_server.api import webhooks as webhook_routes
from zimage_server.api.errors import install_error_handlers, internal_error_response
from zimage_server.api.limits import BodySizeLimit
from zimage_server.api.state import ServiceState
from zimage_server.api.waiting import CompletionSignal
from zimage_server.config import Settings
from zimage_server.db.session import Database
from zimage_server.engine import ModelChoice, resolve_model_source
from zimage_server.engine.resolutions import ASPECT_RATIO_SIZES
from zimage_server.limits import RateLimiter
from zimage_server.storage import ImageStore
from zimage_server.tasks import Lifecycle, Renderer
from zimage_server.webhooks import WebhookDispatcher
from zimage_server.worker.queue import TaskQueue
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
            from zimage_server.engine.pipeline import EngineOptions

            options = EngineOptions(
                attention_backend=settings.attention_backend,
                compile=settings.compile,
                memory=settings.memory,
                prompt_cache_size=settings.prompt_cache_size,
            )
            engine = ZImageEngine.load(choice.source, random_weights=choice.random_weights, options=options)
            if engine.compiled:
                # Compile before /readyz says ready, at every preset size, so no client pays for it.
                engine.warm_up(list(ASPECT_RATIO_SIZES.values()))
            return engine

    db = Database(settings.resolved_database_url)
    store = ImageStore(settings.images_dir, settings.signing_secret)
    renderer = Renderer(store, settings)
    lifecycle = Lifecycle(renderer, settings)
    dispatcher = WebhookDispatcher(db, settings)
    completion = CompletionSignal()

    def task_ended() -> None:
        dispatcher.wake()
        completion.notify()

    runner = Runner(TaskQueue(db, lifecycle, settings), store, settings, load_engine, on_task_end=task_ended)
    return ServiceState(
        settings=settings,
        db=db,
        store=store,
        renderer=renderer,
        lifecycle=lifecycle,
        runner=runner,
        webhooks=dispatcher,
        rate_limiter=RateLimiter(settings.rate_limit_per_minute, settings.rate_limit_burst),
        model_choice=choice,
        completion=completion,
    )


def create_app(state: ServiceState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        state.db.migrate()
        state.completion.bind(asyncio.get_running_loop())
        # This process's worker is the only one on this database: whatever is still processing was left
        # by a crash, and goes back to the queue (or fails, refunded, once it used up its attempts).
        orphans = state.runner.queue.expire_all_leases()
        if orphans:
            log.warning("%d task(s) were left processing by an earlier run; re-queueing them", orphans)
        state.runner.start()
        state.webhooks.start()
        try:
            yield
        finally:
            # SIGTERM lands here (uvicorn): stop taking tasks, hand the running one back, flush webhooks.
            state.runner.stop()
            state.webhooks.stop(state.settings.shutdown_webhook_flush_seconds)
            state.db.dispose()

    app = FastAPI(
        title="zimage-server",
        version=__version__,
        summary="Self-hosted, RunAPI-compatible Z-Image text-to-image service",
        lifespan=lifespan,
    )
    app.state.service = state
    install_error_handlers(app)
    app.add_middleware(
        BodySizeLimit,
        max_bytes=state.settings.max_body_bytes,
        path_limits={"/v1/chat/completions": state.settings.chat_max_body_bytes},
    )

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
    app.include_router(webhook_routes.router)
    app.include_router(public.router)
    app.include_router(openai_images.router)
    # Without an upstream the route only answers 501: it is not advertised in the schema.
    app.include_router(chat.router, include_in_schema=state.settings.chat_upstream_url is not None)
    return app
