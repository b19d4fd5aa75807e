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

from zimage_server.config import Settings
from zimage_server.engine.spec import GenerationCancelled, GenerationSpec
from zimage_server.storage import ImageStore
from zimage_server.worker.queue import Checkpoint, ClaimedTask, TaskQueue

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


class _Stop(Exception):
    """The generation must end without a result: the server is stopping, or the task is not ours any more."""


def spec_from_params(params: dict[str, Any]) -> GenerationSpec:
    return GenerationSpec(
        prompt=params["prompt"],
        negative_prompt=params.get("negative_prompt"),
        width=params["width"],
        height=params["height"],
        num_images=params["num_images"],
        num_inference_steps=params["num_inference_steps"],
        guidance_scale=params["guidance_scale"],
        seed=params["seed"],
    )


class Runner:
    def __init__(
        self,
        queue: TaskQueue,
        store: ImageStore,
        settings: Settings,
        load_engine: Callable[[], ZImageEngine],
        *,
        on_task_end: Callable[[], None] | None = None,
    ) -> None:
        self.queue = queue
        self._store = store
        self._settings = settings
        self._load_engine = load_engine
        self._on_task_end = on_task_end
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
            try:
                claimed = self.queue.claim()
            except Exception:  # a locked or unreachable database: wait and try again, never die
                log.exception("claiming a task failed")
                claimed = None
            if claimed is None:
                self._wake.wait(self._settings.worker_idle_poll_seconds)
                self._wake.clear()
                continue
            self._run(claimed)
            if self._on_task_end is not None:
                self._on_task_end()

    def _heartbeat(self, task_id: str, done: threading.Event, lost: threading.Event) -> None:
        # Steps renew the lease too; this covers the stretches without steps (VAE decode, encoding).
        while not done.wait(self._settings.task_lease_seconds / 3):
            try:
                if not self.queue.heartbeat(task_id):
                    lost.set()
                    return
            except Exception:
                log.exception("heartbeat for %s failed", task_id)

    def _run(self, claimed: ClaimedTask) -> None:
        assert self.engine is not None
        task_id, params = claimed.id, claimed.params
        spec = spec_from_params(params)
        started = time.monotonic()
        last_report = 0.0
        done, lost = threading.Event(), threading.Event()
        heartbeat = threading.Thread(target=self._heartbeat, args=(task_id, done, lost), daemon=True)
        heartbeat.start()

        def on_step(step: int, total: int) -> bool:
            nonlocal last_report
            now = time.monotonic()
            # Progress is for humans watching; a write every quarter second is plenty.
            record = now - last_report > 0.25 or step == 1
            if record:
                last_report = now
            verdict = self.queue.checkpoint(task_id, step, total, record_progress=record)
            if verdict is Checkpoint.LOST or lost.is_set() or self._stopping.is_set():
                raise _Stop
            return verdict is Checkpoint.CONTINUE

        try:
            images = self.engine.generate(spec, on_step=on_step)
            files = [
                self._store.save(task_id, index, image, params["output_format"])
                for index, image in enumerate(images)
            ]
        except GenerationCancelled:
            self.queue.end_cancelled(task_id)
            self.tasks_failed += 1
            return
        except _Stop:
            if self._stopping.is_set():
                self.queue.release(task_id)
            return
        except Exception as exc:
            log.exception("task %s failed", task_id)
            self.queue.fail(
                task_id, _error_code(exc), f"image generation failed: {type(exc).__name__}: {exc}"
            )
            self.tasks_failed += 1
            _free_accelerator_memory()
            return
        finally:
            done.set()
        self.estimator.observe(params, time.monotonic() - started)
        if self.queue.complete(task_id, files):
            self.tasks_completed += 1


def _error_code(exc: Exception) -> str:
    if "out of memory" in str(exc).lower() or type(exc).__name__ == "OutOfMemoryError":
        return "out_of_memory"
    return "generation_failed"


def _free_accelerator_memory() -> None:
    """After an out-of-memory error the next task should start from a clean cache, not inherit the mess."""
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        log.debug("could not empty the CUDA cache", exc_info=True)
