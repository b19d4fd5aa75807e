"""The in-process worker: claims tasks in order and renders them one GPU batch at a time.

It runs on its own thread so that the event loop serving HTTP never waits on the model. The model
is loaded on that thread too: the server answers /healthz at once and /readyz once the model is up.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from zimage_server.config import Settings
from zimage_server.engine.spec import GenerationCancelled, spec_from_params
from zimage_server.storage import ImageStore
from zimage_server.worker.queue import Checkpoint, ClaimedTask, TaskQueue

if TYPE_CHECKING:
    from PIL.Image import Image

    from zimage_server.engine import ZImageEngine

log = logging.getLogger(__name__)

STARTING = "starting"
READY = "ready"
SETUP_FAILED = "setup_failed"
STOPPED = "stopped"
# Longest stretch between database checkpoints while denoising.
CHECKPOINT_SECONDS = 0.25


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

    def observe(self, units: float, seconds: float) -> None:
        rate = seconds / max(1.0, units)
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
    """The generation must end without a result: the server is stopping, or a task is not ours any more."""


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
        self._cancel_requests: set[str] = set()
        # Encoding and saving images happens here, while the GPU already denoises the next batch.
        self._finisher = ThreadPoolExecutor(max_workers=2, thread_name_prefix="zimage-encode")
        self.tasks_completed = 0
        self.tasks_failed = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="zimage-worker", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def request_cancel(self, task_id: str) -> None:
        """A cancel recorded in the database for a task this worker may be running: look at once."""
        self._cancel_requests.add(task_id)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop taking tasks; a batch in flight stops at its next step and goes back to the queue."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        # Rendered images still being encoded are finished and delivered, not thrown away.
        self._finisher.shutdown(wait=True)
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
                batch = self.queue.claim_batch(self._settings.max_batch_images)
            except Exception:  # a locked or unreachable database: wait and try again, never die
                log.exception("claiming tasks failed")
                batch = []
            if not batch:
                self._wake.wait(self._settings.worker_idle_poll_seconds)
                self._wake.clear()
                continue
            self._run(batch)
            self._cancel_requests.difference_update(claimed.id for claimed in batch)

    def _heartbeat(self, active: set[str], done: threading.Event, lost: threading.Event) -> None:
        # Steps renew the leases too; this covers the stretches without steps (VAE decode, encoding).
        while not done.wait(self._settings.task_lease_seconds / 3):
            for task_id in list(active):
                try:
                    if not self.queue.heartbeat(task_id):
                        lost.set()
                except Exception:
                    log.exception("heartbeat for %s failed", task_id)

    def _run(self, batch: list[ClaimedTask]) -> None:
        assert self.engine is not None
        specs = {claimed.id: spec_from_params(claimed.params) for claimed in batch}
        active = set(specs)
        started = time.monotonic()
        last_report = 0.0
        done, lost = threading.Event(), threading.Event()
        threading.Thread(target=self._heartbeat, args=(active, done, lost), daemon=True).start()

        def on_step(step: int, total: int) -> bool:
            nonlocal last_report
            if self._stopping.is_set() or lost.is_set():
                raise _Stop
            now = time.monotonic()
            # The database is checked at most every quarter second (progress for humans, leases, cancels
            # from other processes); a cancel made through this process is seen at the very next step.
            if (
                now - last_report < CHECKPOINT_SECONDS
                and step != total
                and not (self._cancel_requests & active)
            ):
                return True
            last_report = now
            verdicts = self.queue.checkpoint_many(sorted(active), step, total, record_progress=True)
            if Checkpoint.LOST in verdicts.values() or lost.is_set() or self._stopping.is_set():
                raise _Stop
            for task_id, verdict in verdicts.items():
                if verdict is Checkpoint.CANCEL:
                    self._cancel_requests.discard(task_id)
                    # Refunded and reported now; its images, if the batch goes on, are dropped.
                    self.queue.end_cancelled(task_id)
                    active.discard(task_id)
                    self.tasks_failed += 1
            return bool(active)

        try:
            images = self.engine.generate_batch(list(specs.values()), on_step=on_step)
        except GenerationCancelled:
            done.set()
            self._notify()
            return
        except _Stop:
            done.set()
            if self._stopping.is_set():
                for task_id in active:
                    self.queue.release(task_id)
            return
        except Exception as exc:
            done.set()
            log.exception("batch %s failed", sorted(active))
            for task_id in active:
                self.queue.fail(
                    task_id, _error_code(exc), f"image generation failed: {type(exc).__name__}: {exc}"
                )
                self.tasks_failed += 1
            _free_accelerator_memory()
            self._notify()
            return
        self.estimator.observe(
            sum(DurationEstimator.units(claimed.params) for claimed in batch), time.monotonic() - started
        )
        results = {
            task_id: task_images
            for task_id, task_images in zip(specs, images, strict=True)
            if task_id in active
        }
        self._finisher.submit(self._finish, batch, results, done)

    def _finish(
        self, batch: list[ClaimedTask], results: dict[str, list[Image]], done: threading.Event
    ) -> None:
        try:
            for claimed in batch:
                if claimed.id not in results:
                    continue
                try:
                    files = [
                        self._store.save(claimed.id, index, image, claimed.params["output_format"])
                        for index, image in enumerate(results[claimed.id])
                    ]
                except Exception as exc:
                    log.exception("saving the images of %s failed", claimed.id)
                    self.queue.fail(claimed.id, "storage_failed", f"saving the images failed: {exc}")
                    self.tasks_failed += 1
                    continue
                if self.queue.complete(claimed.id, files):
                    self.tasks_completed += 1
        finally:
            done.set()
            self._notify()

    def _notify(self) -> None:
        if self._on_task_end is not None:
            self._on_task_end()


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
