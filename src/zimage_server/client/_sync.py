"""The blocking client."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Unpack

import httpx

from zimage_server.client import _core, errors
from zimage_server.client.models import Balance, ModelInfo, Task


class ZImage:
    """Client for a zimage-server: `ZImage().run("a cat")` creates a task and waits for its image.

    `base_url` defaults to `ZIMAGE_BASE_URL`, then http://127.0.0.1:8000; `api_key` to `ZIMAGE_API_KEY`,
    then `RUNAPI_API_KEY`. `timeout` bounds each HTTP request; `max_retries` is how often a GET (and a
    create, which carries an Idempotency-Key) is resent after a transport error or a 429/502/503/504.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = _core.DEFAULT_TIMEOUT,
        *,
        max_retries: int = _core.DEFAULT_MAX_RETRIES,
        http_client: httpx.Client | None = None,
    ) -> None:
        self.config = _core.Config.resolve(base_url, api_key, timeout, max_retries)
        self._owns_http = http_client is None
        self._http = http_client or httpx.Client(base_url=self.config.base_url, timeout=timeout)

    @property
    def base_url(self) -> str:
        return self.config.base_url

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> ZImage:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _send(self, call: _core.Call) -> httpx.Response:
        headers = self.config.headers(call)
        attempt = 0
        while True:
            try:
                response = self._http.request(
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
                response.close()
            time.sleep(delay)
            attempt += 1

    def create(
        self, prompt: str, *, idempotency_key: str | None = None, **params: Unpack[_core.TaskParams]
    ) -> Task:
        """Submit a task; it answers at once with the task `pending` (reserving its price)."""
        return _core.parse_task(self._send(_core.create_call(prompt, params, idempotency_key)))

    def get(self, task_id: str, *, wait: float | None = None) -> Task:
        """The task now, or with `wait` seconds: once it ends, or when the wait runs out (long poll)."""
        return _core.parse_task(self._send(_core.get_call(task_id, wait)))

    def cancel(self, task_id: str) -> Task:
        """Cancel a task: a pending one ends at once, a processing one at its next step (refunded)."""
        return _core.parse_task(self._send(_core.cancel_call(task_id)))

    def run(
        self,
        prompt: str,
        *,
        timeout: float = _core.DEFAULT_RUN_TIMEOUT,
        poll_interval: float | None = None,
        on_progress: Callable[[Task], object] | None = None,
        **params: Unpack[_core.TaskParams],
    ) -> Task:
        """Create a task and poll it until it ends; return it `completed`.

        Raises TaskFailedError if it fails and TaskTimeoutError after `timeout` seconds. Between polls it
        polls every `poll_interval` seconds if given; otherwise it long-polls (`Prefer: wait`), so the
        server answers the moment the task ends.
        `on_progress` is called with the task after every answer, the last one included.
        """
        poll = _core.Poll(timeout, poll_interval)
        task = self.create(prompt, **params)
        while True:
            if on_progress is not None:
                on_progress(task)
            if task.done:
                return poll.outcome(task)
            if poll_interval is None:
                task = self.get(task.id, wait=poll.long_poll_wait())
                if poll.expired() and not task.done:
                    raise errors.TaskTimeoutError(task, timeout)
            else:
                time.sleep(poll.next_delay(task))
                task = self.get(task.id)

    def download(self, task_or_url: Task | str, index: int = 0) -> bytes:
        """The bytes of image `index` of a completed task, or of a signed image URL."""
        return _core.parse_bytes(self._send(_core.download_call(task_or_url, index)))

    def save(self, task: Task, path: str | os.PathLike[str]) -> list[Path]:
        """Write every image of `task`: the first to `path`, the others to `<stem>-1<suffix>`, ..."""
        paths = _core.save_paths(path, len(task.images))
        for index, target in enumerate(paths):
            target.write_bytes(self.download(task, index))
        return paths

    def balance(self) -> Balance:
        return _core.parse_balance(self._send(_core.balance_call()))

    def models(self) -> list[ModelInfo]:
        return _core.parse_models(self._send(_core.models_call()))

    def __repr__(self) -> str:
        return f"ZImage(base_url={self.base_url!r})"
