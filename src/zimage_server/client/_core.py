"""Everything the sync and async clients share: configuration, the wire calls, error mapping, parsing,
retry and polling decisions. The two clients only add the I/O (send, sleep) around these functions."""

from __future__ import annotations

import math
import os
import random
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict, TypeVar
from urllib.parse import quote

import httpx
import pydantic

from zimage_server import __version__
from zimage_server.client import errors
from zimage_server.client.models import FAILED, Balance, ModelInfo, Task

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = 60.0
DEFAULT_MAX_RETRIES = 3
DEFAULT_RUN_TIMEOUT = 900.0

# Statuses that mean "not now" rather than "no": the request did not take effect and may be sent again.
RETRY_STATUSES = frozenset({429, 502, 503, 504})
RETRY_BASE_DELAY = 0.5
# A single retry never sleeps longer than this, whatever Retry-After says: past it the caller should decide.
RETRY_MAX_DELAY = 10.0

# Long polling asks the server to hold a GET this long at most (it caps the wait at 60 s itself).
LONG_POLL_SECONDS = 30.0
# Polling: the server's Retry-After is its estimate of the time left, capped so a pessimistic estimate
# cannot make `run` oversleep a finished task by much; without it, back off from half a second.
POLL_MAX_INTERVAL = 10.0
POLL_FIRST_DELAY = 0.5
POLL_BACKOFF_FACTOR = 1.5
POLL_MAX_BACKOFF = 5.0

USER_AGENT = f"zimage-server-sdk-python/{__version__}"

M = TypeVar("M", bound=pydantic.BaseModel)


class TaskParams(TypedDict, total=False):
    """Task parameters, as the README's "Task parameters" table documents them; None means the default."""

    model: str | None
    aspect_ratio: str | None
    size: str | None
    negative_prompt: str | None
    seed: int | None
    num_images: int | None
    num_inference_steps: int | None
    guidance_scale: float | None
    output_format: str | None
    callback_url: str | None
    enable_safety_checker: bool | None


@dataclass(frozen=True)
class Config:
    base_url: str
    api_key: str | None
    timeout: float
    max_retries: int

    @classmethod
    def resolve(cls, base_url: str | None, api_key: str | None, timeout: float, max_retries: int) -> Config:
        """Explicit arguments win, then `ZIMAGE_BASE_URL` / `ZIMAGE_API_KEY` (or `RUNAPI_API_KEY`)."""
        url = base_url or os.environ.get("ZIMAGE_BASE_URL") or DEFAULT_BASE_URL
        key = api_key or os.environ.get("ZIMAGE_API_KEY") or os.environ.get("RUNAPI_API_KEY") or None
        return cls(base_url=url.rstrip("/"), api_key=key, timeout=timeout, max_retries=max(0, max_retries))

    def headers(self, call: Call) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": USER_AGENT, **call.headers}
        if call.authenticated:
            if not self.api_key:
                raise errors.AuthenticationError(
                    "no API key: pass api_key= or set ZIMAGE_API_KEY", code="missing_api_key"
                )
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers


@dataclass(frozen=True)
class Call:
    """One HTTP exchange the SDK can make, independent of how it is sent."""

    method: str
    url: str  # a path under the base URL, or an absolute URL (signed image links)
    json: dict[str, Any] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    # Only calls that cannot take effect twice are sent again after a failure.
    retryable: bool = False
    # Image links carry their own signature; the API key is not sent along with them.
    authenticated: bool = True
    # Seconds the server may hold the answer (Prefer: wait); the read timeout must outlast it.
    server_wait: float = 0.0


def _task_path(task_id: str) -> str:
    return f"/v1/tasks/{quote(task_id, safe='')}"


def create_call(prompt: str, params: Mapping[str, Any], idempotency_key: str | None) -> Call:
    body = {"prompt": prompt, **{name: value for name, value in params.items() if value is not None}}
    # A key of our own makes the POST safe to resend: a replay returns the original task, charged once.
    key = idempotency_key or f"sdk-{uuid.uuid4()}"
    return Call("POST", "/v1/text_to_image", json=body, headers={"Idempotency-Key": key}, retryable=True)


def get_call(task_id: str, wait: float | None = None) -> Call:
    if not wait:
        return Call("GET", _task_path(task_id), retryable=True)
    # Long poll: the server answers as soon as the task ends, so completion is seen within milliseconds.
    return Call(
        "GET", _task_path(task_id), headers={"Prefer": f"wait={wait:g}"}, retryable=True, server_wait=wait
    )


def cancel_call(task_id: str) -> Call:
    # Not resent: if a lost answer hid a successful cancel, a second one would answer 409 task_finished.
    return Call("POST", f"{_task_path(task_id)}/cancel")


def balance_call() -> Call:
    return Call("GET", "/api/v1/me/balance", retryable=True)


def models_call() -> Call:
    return Call("GET", "/v1/models", retryable=True, authenticated=False)


def download_call(task_or_url: Task | str, index: int) -> Call:
    if isinstance(task_or_url, Task):
        if not task_or_url.images:
            raise errors.ZImageError(f"task {task_or_url.id} has no images (status {task_or_url.status})")
        url = task_or_url.images[index].url
    else:
        url = task_or_url
    return Call("GET", url, retryable=True, authenticated=False)


def save_paths(path: str | os.PathLike[str], count: int) -> list[Path]:
    """Image 0 goes to `path`, image i > 0 to `<stem>-i<suffix>` beside it (as `zimage generate` does)."""
    first = Path(path)
    return [first if index == 0 else first.with_stem(f"{first.stem}-{index}") for index in range(count)]


def retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None  # an HTTP date: rare enough here to fall back to backoff
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _backoff(attempt: int) -> float:
    # Full jitter, so clients that failed together do not come back together.
    return random.uniform(0, min(RETRY_MAX_DELAY, RETRY_BASE_DELAY * 2**attempt))


def retry_delay(
    call: Call, attempt: int, max_retries: int, response: httpx.Response | None = None
) -> float | None:
    """Seconds to wait before sending `call` again after attempt `attempt` (0-based), or None to stop.

    `response` is None when the attempt failed in transport (refused, reset, timed out)."""
    if not call.retryable or attempt >= max_retries:
        return None
    if response is None:
        return _backoff(attempt)
    if response.status_code not in RETRY_STATUSES:
        return None
    hint = retry_after(response)
    return min(hint, RETRY_MAX_DELAY) if hint is not None else _backoff(attempt)


def transport_error(call: Call, exc: httpx.TransportError) -> errors.ConnectionError:
    kind = "timed out" if isinstance(exc, httpx.TimeoutException) else "failed"
    return errors.ConnectionError(f"{call.method} {call.url} {kind}: {exc or type(exc).__name__}")


def error_from_response(response: httpx.Response) -> errors.ZImageError:
    """The exception for an error answer, from its status and `{"error": {code, message, param}}` body."""
    status = response.status_code
    body: Any = None
    code: str | None = None
    param: str | None = None
    message = response.reason_phrase or f"HTTP {status}"
    try:
        body = response.json()
    except ValueError:
        if response.text:
            message = response.text[:500]
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        detail = body["error"]
        code = detail.get("code") if isinstance(detail.get("code"), str) else None
        message = str(detail.get("message") or message)
        param = detail.get("param") if isinstance(detail.get("param"), str) else None
    cls = errors.STATUS_ERRORS.get(status) or (errors.ServerError if status >= 500 else errors.ZImageError)
    kwargs: dict[str, Any] = {
        "status_code": status,
        "code": code,
        "request_id": response.headers.get("x-request-id"),
        "param": param,
        "body": body,
    }
    if cls in (errors.RateLimitError, errors.ServiceUnavailableError):
        kwargs["retry_after"] = retry_after(response)
    return cls(message, **kwargs)


def checked(response: httpx.Response) -> httpx.Response:
    if response.is_error:
        raise error_from_response(response)
    return response


def _json(response: httpx.Response) -> Any:
    try:
        return checked(response).json()
    except ValueError as exc:
        raise errors.ZImageError(
            f"the server answered {response.status_code} with a body that is not JSON",
            status_code=response.status_code,
            request_id=response.headers.get("x-request-id"),
        ) from exc


def _validated(model: type[M], data: Any, response: httpx.Response) -> M:
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        raise errors.ZImageError(
            f"unexpected {model.__name__} in the answer: {exc}",
            status_code=response.status_code,
            request_id=response.headers.get("x-request-id"),
            body=data,
        ) from exc


def parse_task(response: httpx.Response) -> Task:
    task = _validated(Task, _json(response), response)
    task._retry_after = retry_after(response)
    return task


def parse_balance(response: httpx.Response) -> Balance:
    return _validated(Balance, _json(response), response)


def parse_models(response: httpx.Response) -> list[ModelInfo]:
    data = _json(response)
    entries = data.get("data") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise errors.ZImageError("the model list has no `data` array", body=data)
    return [_validated(ModelInfo, entry, response) for entry in entries]


def parse_bytes(response: httpx.Response) -> bytes:
    return checked(response).content


class Poll:
    """The waiting half of `run`: how long to sleep before the next poll, and when to give up."""

    def __init__(
        self,
        timeout: float,
        poll_interval: float | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.timeout = timeout
        self.poll_interval = poll_interval
        self._clock = clock
        self._deadline = clock() + timeout
        self._backoff = POLL_FIRST_DELAY

    def long_poll_wait(self) -> float:
        """How long the next GET may ask the server to hold it: the time left, in bounded slices."""
        remaining = self._deadline - self._clock()
        return max(0.0, min(LONG_POLL_SECONDS, remaining))

    def expired(self) -> bool:
        return self._clock() >= self._deadline

    def next_delay(self, task: Task) -> float:
        """Seconds to sleep before polling `task` again; raises TaskTimeoutError once time is up."""
        remaining = self._deadline - self._clock()
        if remaining <= 0:
            raise errors.TaskTimeoutError(task, self.timeout)
        if self.poll_interval is not None:
            delay = self.poll_interval
        elif task.retry_after is not None:
            delay = min(task.retry_after, POLL_MAX_INTERVAL)
        else:
            delay = self._backoff
            self._backoff = min(self._backoff * POLL_BACKOFF_FACTOR, POLL_MAX_BACKOFF)
        return max(0.0, min(delay, remaining))

    @staticmethod
    def outcome(task: Task) -> Task:
        if task.status == FAILED:
            raise errors.TaskFailedError(task)
        return task
