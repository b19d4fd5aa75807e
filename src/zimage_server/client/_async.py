"""The asyncio client: the same calls as `ZImage`, awaited."""

from __future__ import annotations

import asyncio
import inspect
import os
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Unpack

import httpx

from zimage_server.client import _core, errors
from zimage_server.client.models import Balance, ModelInfo, Task


class AsyncZImage:
    """Asyncio client for a zimage-server; see `ZImage` for the arguments and the behaviour."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = _core.DEFAULT_TIMEOUT,
        *,
        max_retries: int = _core.DEFAULT_MAX_RETRIES,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        self.config = _core.Config.resolve(base_url, api_key, timeout, max_retries)
        self._owns_http = http_client is None
        self._http = http_client or httpx.AsyncClient(base_url=self.config.base_url, timeout=timeout)

    @property
    def base_url(self) -> str:
        return self.config.base_url

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncZImage:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def _send(self, call: _core.Call) -> httpx.Response:
        headers = self.config.headers(call)
        attempt = 0
        while True:
            try:
                response = await self._http.request(
                    call.method,
                    call.url,
                    json=call.json,
                    headers=headers,
                    timeout=self.config.timeout + call.server_wait,
                )
            except httpx.TransportError as exc:
                delay = _core.retry_delay(call, attempt, self.config.max_retries)
                if delay is None:
                    raise _core.transport_error(call, exc) from exc
            else:
                delay = _core.retry_delay(call, attempt, self.config.max_retries, response)
                if delay is None:
                    return response
                await response.aclose()
            await asyncio.sleep(delay)
            attempt += 1

    async def create(
        self, prompt: str, *, idempotency_key: str | None = None, **params: Unpack[_core.TaskParams]
    ) -> Task:
        return _core.parse_task(await self._send(_core.create_call(prompt, params, idempotency_key)))

    async def get(self, task_id: str, *, wait: float | None = None) -> Task:
        """The task now, or with `wait` seconds: once it ends, or when the wait runs out (long poll)."""
        return _core.parse_task(await self._send(_core.get_call(task_id, wait)))

    async def cancel(self, task_id: str) -> Task:
        return _core.parse_task(await self._send(_core.cancel_call(task_id)))

    async def run(
        self,
        prompt: str,
        *,
        # Kept (rather than asyncio.timeout) so the error carries the task, which goes on running.
        timeout: float = _core.DEFAULT_RUN_TIMEOUT,  # noqa: ASYNC109
        poll_interval: float | None = None,
        on_progress: Callable[[Task], object] | None = None,
        **params: Unpack[_core.TaskParams],
    ) -> Task:
        """As `ZImage.run`; `on_progress` may be a plain function or a coroutine function."""
        poll = _core.Poll(timeout, poll_interval)
        task = await self.create(prompt, **params)
        while True:
            if on_progress is not None:
                result = on_progress(task)
                if inspect.isawaitable(result):
                    await result
            if task.done:
                return poll.outcome(task)
            if poll_interval is None:
                task = await self.get(task.id, wait=poll.long_poll_wait())
                if poll.expired() and not task.done:
                    raise errors.TaskTimeoutError(task, timeout)
            else:
                await asyncio.sleep(poll.next_delay(task))
                task = await self.get(task.id)

    async def download(self, task_or_url: Task | str, index: int = 0) -> bytes:
        return _core.parse_bytes(await self._send(_core.download_call(task_or_url, index)))

    async def save(self, task: Task, path: str | os.PathLike[str]) -> list[Path]:
        paths = _core.save_paths(path, len(task.images))
        for index, target in enumerate(paths):
            target.write_bytes(await self.download(task, index))
        return paths

    async def balance(self) -> Balance:
        return _core.parse_balance(await self._send(_core.balance_call()))

    async def models(self) -> list[ModelInfo]:
        return _core.parse_models(await self._send(_core.models_call()))

    def __repr__(self) -> str:
        return f"AsyncZImage(base_url={self.base_url!r})"
