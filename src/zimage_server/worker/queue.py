"""The task queue in the database: claiming with leases, heartbeats, and the worker's side of the lifecycle.

Every operation is one short transaction with a conditional update, so any number of workers in any
number of processes can share one database without two running the same task.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select, update

from zimage_server.config import Settings
from zimage_server.db.models import Task, utcnow
from zimage_server.db.session import Database
from zimage_server.engine.spec import batch_key, spec_from_params
from zimage_server.tasks import PENDING, PROCESSING, Lifecycle

LOST_CODE = "worker_lost"
# A lease that ended long ago: what a restarted single worker gives its predecessor's tasks.
_EXPIRED = datetime(2000, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class ClaimedTask:
    id: str
    params: dict[str, Any]
    attempt: int


class Checkpoint(enum.Enum):
    CONTINUE = "continue"
    CANCEL = "cancel"
    LOST = "lost"


class TaskQueue:
    def __init__(
        self, db: Database, lifecycle: Lifecycle, settings: Settings, worker_id: str | None = None
    ) -> None:
        self._db = db
        self._lifecycle = lifecycle
        self._settings = settings
        self.worker_id = worker_id or f"worker-{uuid.uuid4().hex[:12]}"

    def _lease_end(self) -> datetime:
        return utcnow() + timedelta(seconds=self._settings.task_lease_seconds)

    def _ours(self, task_id: str) -> Any:
        return (Task.id == task_id) & (Task.status == PROCESSING) & (Task.lease_owner == self.worker_id)

    def expire_all_leases(self) -> int:
        """For a worker alone on its database: whatever is still processing was left by a crash."""
        with self._db.session() as session:
            result = session.execute(
                update(Task).where(Task.status == PROCESSING).values(lease_expires_at=_EXPIRED)
            )
            return int(result.rowcount or 0)  # type: ignore[attr-defined]

    def reclaim_expired(self) -> None:
        """Tasks whose worker died: back to the queue, or failed and refunded after their last attempt."""
        with self._db.session() as session:
            stale = session.execute(
                select(Task).where(Task.status == PROCESSING, Task.lease_expires_at < utcnow())
            ).scalars()
            for task in stale:
                if task.cancel_requested:
                    self._lifecycle.end_cancelled(session, task)
                elif task.attempts >= self._settings.max_task_attempts:
                    self._lifecycle.fail(
                        session,
                        task,
                        LOST_CODE,
                        f"the worker running this task stopped responding {task.attempts} times "
                        "(crashed or was killed); giving up",
                    )
                else:
                    task.status = PENDING
                    task.lease_owner = task.lease_expires_at = None
                    task.started_at = None
                    task.progress_step = task.progress_total = 0

    def claim(self) -> ClaimedTask | None:
        batch = self.claim_batch(max_images=1)
        return batch[0] if batch else None

    def claim_batch(self, max_images: int) -> list[ClaimedTask]:
        """The oldest pending task, plus younger ones of the same shape, up to ``max_images`` images in all.

        Tasks of one size, step count and guidance share a denoising batch; a task of another shape waits
        at most one batch longer than strict arrival order would make it.
        """
        self.reclaim_expired()
        with self._db.session() as session:
            oldest = session.execute(
                select(Task).where(Task.status == PENDING).order_by(Task.created_at, Task.id).limit(1)
            ).scalar_one_or_none()
            if oldest is None:
                return []
            chosen = [oldest]
            shape = batch_key(spec_from_params(oldest.params))
            images = int(oldest.params["num_images"])
            if images < max_images:
                candidates = session.execute(
                    select(Task)
                    .where(Task.status == PENDING, Task.id != oldest.id)
                    .order_by(Task.created_at, Task.id)
                    .limit(64)
                ).scalars()
                for task in candidates:
                    if (
                        batch_key(spec_from_params(task.params)) == shape
                        and images + task.params["num_images"] <= max_images
                    ):
                        chosen.append(task)
                        images += int(task.params["num_images"])
            claimed: list[ClaimedTask] = []
            for task in chosen:
                result = session.execute(
                    update(Task)
                    .where(Task.id == task.id, Task.status == PENDING)
                    .values(
                        status=PROCESSING,
                        started_at=utcnow(),
                        attempts=Task.attempts + 1,
                        lease_owner=self.worker_id,
                        lease_expires_at=self._lease_end(),
                    )
                )
                if result.rowcount:  # type: ignore[attr-defined]
                    session.refresh(task)
                    claimed.append(ClaimedTask(task.id, dict(task.params), task.attempts))
            return claimed

    def heartbeat(self, task_id: str) -> bool:
        """Renew the lease; False when the task is no longer ours to run."""
        with self._db.session() as session:
            renewed = session.execute(
                update(Task).where(self._ours(task_id)).values(lease_expires_at=self._lease_end())
            )
            return bool(renewed.rowcount)  # type: ignore[attr-defined]

    def checkpoint(self, task_id: str, step: int, total: int, *, record_progress: bool) -> Checkpoint:
        return self.checkpoint_many([task_id], step, total, record_progress=record_progress)[task_id]

    def checkpoint_many(
        self, task_ids: list[str], step: int, total: int, *, record_progress: bool
    ) -> dict[str, Checkpoint]:
        """Between denoising steps, in one transaction: renew the leases, maybe record progress, and say
        for each task whether to go on."""
        verdicts: dict[str, Checkpoint] = {}
        with self._db.session() as session:
            values: dict[str, Any] = {"lease_expires_at": self._lease_end()}
            if record_progress:
                values.update(progress_step=step, progress_total=total)
            for task_id in task_ids:
                renewed = session.execute(update(Task).where(self._ours(task_id)).values(**values))
                if not renewed.rowcount:  # type: ignore[attr-defined]
                    verdicts[task_id] = Checkpoint.LOST
                    continue
                cancel = session.execute(select(Task.cancel_requested).where(Task.id == task_id)).scalar_one()
                verdicts[task_id] = Checkpoint.CANCEL if cancel else Checkpoint.CONTINUE
        return verdicts

    def _owned_task(self, session: Any, task_id: str) -> Task | None:
        return session.execute(select(Task).where(self._ours(task_id))).scalar_one_or_none()  # type: ignore[no-any-return]

    def complete(self, task_id: str, image_files: list[str]) -> bool:
        with self._db.session() as session:
            task = self._owned_task(session, task_id)
            if task is None:
                return False
            self._lifecycle.complete(session, task, image_files)
            return True

    def fail(self, task_id: str, code: str, message: str) -> bool:
        with self._db.session() as session:
            task = self._owned_task(session, task_id)
            if task is None:
                return False
            self._lifecycle.fail(session, task, code, message)
            return True

    def release(self, task_id: str) -> None:
        """Give a task back untouched (graceful shutdown); the interrupted attempt does not count."""
        with self._db.session() as session:
            task = self._owned_task(session, task_id)
            if task is None:
                return
            if task.cancel_requested:
                self._lifecycle.end_cancelled(session, task)
                return
            task.status = PENDING
            task.attempts = max(0, task.attempts - 1)
            task.lease_owner = task.lease_expires_at = None
            task.started_at = None
            task.progress_step = task.progress_total = 0

    def end_cancelled(self, task_id: str) -> bool:
        with self._db.session() as session:
            task = self._owned_task(session, task_id)
            if task is None:
                return False
            self._lifecycle.end_cancelled(session, task)
            return True
