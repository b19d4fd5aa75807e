"""Completion without polling: `Prefer: wait=N` and server-sent events, woken by the worker."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from typing import TYPE_CHECKING

from zimage_server import tasks
from zimage_server.accounts import Principal
from zimage_server.db.models import Task

if TYPE_CHECKING:
    from zimage_server.api.state import ServiceState

_PREFER_WAIT = re.compile(r"(?:^|[,;\s])wait\s*=\s*([0-9]+(?:\.[0-9]+)?)", re.IGNORECASE)


class CompletionSignal:
    """Wakes request handlers waiting on tasks when this process's worker ends one.

    Waiters also re-read the database on a short timeout, so a task ended by another process (or a
    missed wake-up) is still seen promptly.
    """

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._event = asyncio.Event()

    def notify(self) -> None:
        """Safe from any thread."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._fire)

    def _fire(self) -> None:
        if self._event is not None:
            self._event.set()
        self._event = asyncio.Event()

    async def wait(self, seconds: float) -> None:
        """Return at the next notification, or after ``seconds``."""
        event = self._event
        if event is None:
            await asyncio.sleep(seconds)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), seconds)


def requested_wait(prefer: str | None, bound: float) -> float | None:
    """Seconds asked for with RFC 7240 `Prefer: wait=N`, capped by the server's bound."""
    if not prefer:
        return None
    match = _PREFER_WAIT.search(prefer)
    if match is None:
        return None
    return min(float(match.group(1)), bound)


def _read(state: ServiceState, principal: Principal, task_id: str) -> tuple[Task, int | None]:
    with state.db.session() as session:
        task = tasks.get_owned(session, principal, task_id)
        position = tasks.queue_position(session, task) if task.status == tasks.PENDING else None
        session.expunge(task)
        return task, position


async def wait_for_task(
    state: ServiceState, principal: Principal, task_id: str, seconds: float, *, recheck: float = 0.5
) -> tuple[Task, int | None]:
    """The task once it is terminal, or as it is when ``seconds`` run out."""
    deadline = time.monotonic() + seconds
    while True:
        task, position = await asyncio.to_thread(_read, state, principal, task_id)
        remaining = deadline - time.monotonic()
        if task.status not in tasks.ACTIVE_STATUSES or remaining <= 0:
            return task, position
        await state.completion.wait(min(recheck, remaining))


async def watch_task(
    state: ServiceState, principal: Principal, task_id: str, *, interval: float = 0.1
) -> tuple[Task, int | None]:
    """One step of an event stream: returns at the next wake-up or after ``interval``."""
    await state.completion.wait(interval)
    return await asyncio.to_thread(_read, state, principal, task_id)
