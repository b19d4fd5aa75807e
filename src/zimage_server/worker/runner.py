"""The in-process worker: claims tasks in order and renders them one GPU batch at a time.

It runs on its own thread so that the event loop serving HTTP never waits on the model. The model
is loaded on that thread too: the server answers /healthz at once and /readyz once the model is up.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update

from zimage_server import billing
from zimage_server.config import Settings
from zimage_server.db.models import Task, utcnow
from zimage_server.db.session import Database
from zimage_server.storage import ImageStore
from zimage_server.tasks import COMPLETED, FAILED, PENDING, PROCESSING

if TYPE_CHECKING:
    from zimage_server.engine import ZImageEngine

log = logging.getLogger(__name__)

STARTING = "starting"
READY = "ready"
SETUP_FAILED = "setup_failed"
STOPPED = "stopped"


class DurationEstimator:
    """Seconds per unit of work (pixels x steps x images), smoothed over recent tasks.

    Clients are told when to poll again from this, so they come back about when their task is done.
    """

    def __init__(self, smoothing: float = 0.3) -> None:
        self._smoothing = smoothing
        self._seconds_per_unit: float | None = None
        self._lock = threading.Lock()

    @staticmethod
    def units(params: dict[str, Any]) -> float:
        return float(
            params["width"] * params["height"] * params["num_inference_steps"] * params["num_images"]
        )

    def observe(self, params: dict[str, Any], seconds: float) -> None:
        rate = seconds / max(1.0, self.units(params))
        with self._lock:
            previous = self._seconds_per_unit
            self._seconds_per_unit = (
                rate if previous is None else previous + self._smoothing * (rate - previous)
            )

    def estimate(self, params: dict[str, Any], fraction_done: float = 0.0) -> float:
        with self._lock:
            rate = self._seconds_per_unit
        if rate is None:
            return 1.0
        return rate * self.units(params) * max(0.0, 1.0 - fraction_done)


class Runner:
    def __init__(
        self,
        db: Database,
        store: ImageStore,
        settings: Settings,
        load_engine: Callable[[], ZImageEngine],
    ) -> None:
        self._db = db
        self._store = store
        self._settings = settings
        self._load_engine = load_engine
        self.engine: ZImageEngine | None = None
        self.state = STARTING
        self.setup_error: str | None = None
        self.estimator = DurationEstimator()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.tasks_completed = 0
        self.tasks_failed = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="zimage-worker", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop taking tasks; a task in flight stops at its next step and goes back to the queue."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.state = STOPPED

    def requeue_interrupted(self) -> int:
        """Put back tasks a crashed process left half-done; they render again from the start."""
        with self._db.session() as session:
            result = session.execute(
                update(Task)
                .where(Task.status == PROCESSING)
                .values(status=PENDING, started_at=None, progress_step=0, progress_total=0)
            )
            return int(result.rowcount or 0)  # type: ignore[attr-defined]

    def _main(self) -> None:
        try:
            self.engine = self._load_engine()
        except Exception as exc:  # the model is the one thing the worker cannot do without
            log.exception("loading the model failed")
            self.setup_error = f"{type(exc).__name__}: {exc}"
            self.state = SETUP_FAILED
            return
        self.state = READY
        while not self._stopping.is_set():
            task_id = self._claim_next()
            if task_id is None:
                self._wake.wait(self._settings.worker_idle_poll_seconds)
                self._wake.clear()
                continue
            self._run(task_id)

    def _claim_next(self) -> str | None:
        with self._db.session() as session:
            task_id = session.execute(
                select(Task.id).where(Task.status == PENDING).order_by(Task.created_at, Task.id).limit(1)
            ).scalar_one_or_none()
            if task_id is None:
                return None
            claimed = session.execute(
                update(Task)
                .where(Task.id == task_id, Task.status == PENDING)
                .values(status=PROCESSING, started_at=utcnow(), attempts=Task.attempts + 1)
            )
            return task_id if claimed.rowcount else None  # type: ignore[attr-defined]

    def _run(self, task_id: str) -> None:
        from zimage_server.engine import GenerationCancelled, GenerationSpec

        assert self.engine is not None
        with self._db.session() as session:
            task = session.get(Task, task_id)
            assert task is not None
            params = dict(task.params)
        spec = GenerationSpec(
            prompt=params["prompt"],
            negative_prompt=params.get("negative_prompt"),
            width=params["width"],
            height=params["height"],
            num_images=params["num_images"],
            num_inference_steps=params["num_inference_steps"],
            guidance_scale=params["guidance_scale"],
            seed=params["seed"],
        )
        started = time.monotonic()
        last_report = 0.0

        def on_step(step: int, total: int) -> bool:
            nonlocal last_report
            now = time.monotonic()
            # Progress is for humans watching; a write every quarter second is plenty.
            if now - last_report > 0.25 or step == 1:
                last_report = now
                with self._db.session() as progress_session:
                    progress_session.execute(
                        update(Task)
                        .where(Task.id == task_id, Task.status == PROCESSING)
                        .values(progress_step=step, progress_total=total)
                    )
            return not self._stopping.is_set()

        try:
            images = self.engine.generate(spec, on_step=on_step)
            files = [
                self._store.save(task_id, index, image, params["output_format"])
                for index, image in enumerate(images)
            ]
        except GenerationCancelled:
            self._release(task_id)
            return
        except Exception as exc:
            log.exception("task %s failed", task_id)
            self._fail(task_id, _error_code(exc), f"image generation failed: {type(exc).__name__}: {exc}")
            return
        self.estimator.observe(params, time.monotonic() - started)
        with self._db.session() as session:
            task = session.get(Task, task_id)
            assert task is not None
            if task.status != PROCESSING:
                return
            task.status = COMPLETED
            task.image_files = files
            task.completed_at = utcnow()
            task.progress_step = task.progress_total = spec.num_inference_steps
            billing.settle(session, task)
        self.tasks_completed += 1

    def _release(self, task_id: str) -> None:
        with self._db.session() as session:
            session.execute(
                update(Task)
                .where(Task.id == task_id, Task.status == PROCESSING)
                .values(status=PENDING, started_at=None, progress_step=0, progress_total=0)
            )

    def _fail(self, task_id: str, code: str, message: str) -> None:
        with self._db.session() as session:
            task = session.get(Task, task_id)
            if task is None or task.status in (COMPLETED, FAILED):
                return
            task.status = FAILED
            task.error_code = code
            task.error_message = message
            task.completed_at = utcnow()
            billing.refund(session, task, reason=message)
        self.tasks_failed += 1


def _error_code(exc: Exception) -> str:
    if "out of memory" in str(exc).lower() or type(exc).__name__ == "OutOfMemoryError":
        return "out_of_memory"
    return "generation_failed"
