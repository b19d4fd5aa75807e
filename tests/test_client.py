"""The Python SDK (`zimage_server.client`) against live servers: runs, errors, retries, cancel, webhooks."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.conftest import WEBHOOK_TEST_ENV, LiveServer, WebhookReceiver, free_port
from zimage_server.client import (
    AsyncZImage,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    GoneError,
    InsufficientCreditsError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
    ServiceUnavailableError,
    Task,
    TaskFailedError,
    TaskTimeoutError,
    ValidationError,
    WebhookVerificationError,
    ZImage,
    ZImageError,
    _core,
    verify_webhook,
)
from zimage_server.client import ConnectionError as SDKConnectionError

SMALL: _core.TaskParams = {"size": "256x256", "num_inference_steps": 2}
# Big enough to keep the single worker busy for a few seconds, so tasks queued behind it stay pending.
BLOCKER: _core.TaskParams = {"size": "1024x1024", "num_inference_steps": 40}


@pytest.fixture
def sdk(server: LiveServer, api_key: str) -> Iterator[ZImage]:
    with ZImage(base_url=server.base_url, api_key=api_key) as client:
        yield client


@pytest.fixture(scope="module")
def limited_server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[LiveServer]:
    """A server that delivers webhooks to loopback and lets each key create one task every 2 seconds."""
    live = LiveServer(
        data_dir=tmp_path_factory.mktemp("sdk-limited") / "data",
        model=tiny_model_dir,
        env={**WEBHOOK_TEST_ENV, "ZIMAGE_RATE_LIMIT_PER_MINUTE": "30", "ZIMAGE_RATE_LIMIT_BURST": "1"},
    )
    live.start()
    yield live
    live.stop()


def test_the_sdk_loads_no_server_code() -> None:
    code = (
        "import json, sys, zimage_server.client\n"
        "heavy = ('torch', 'diffusers', 'transformers', 'sqlalchemy', 'fastapi', 'uvicorn', 'standardwebhooks')\n"
        "print(json.dumps([name for name in heavy if name in sys.modules]))\n"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(loaded.stdout) == []


def test_run_waits_for_the_images_and_saves_them(sdk: ZImage, tmp_path: Path) -> None:
    seen: list[Task] = []
    task = sdk.run(
        "一只猫坐在红色的沙发上", seed=5, num_images=2, output_format="webp", on_progress=seen.append, **SMALL
    )
    assert task.status == "completed"
    assert seen[0].status == "pending"
    assert seen[-1] is task
    assert task.seed == 5
    assert [image.seed for image in task.images] == [5, 6]
    assert task.usage is not None
    assert task.usage.cost_cents == 2
    assert task.input is not None
    assert task.input["prompt"] == "一只猫坐在红色的沙发上"

    paths = sdk.save(task, tmp_path / "cat.webp")
    assert paths == [tmp_path / "cat.webp", tmp_path / "cat-1.webp"]
    for path in paths:
        with Image.open(path) as image:
            assert (image.format, image.size) == ("WEBP", (256, 256))
    assert sdk.download(task.images[1].url) == paths[1].read_bytes()
    assert sdk.download(task, index=0) == paths[0].read_bytes()

    again = sdk.get(task.id)
    assert (again.id, again.status, again.urls) == (task.id, "completed", task.urls)
    balance = sdk.balance()
    assert (balance.balance_cents, balance.spent_cents_total, balance.reserved_cents) == (98, 2, 0)


def test_models_say_what_is_served(sdk: ZImage) -> None:
    models = {model.id: model for model in sdk.models()}
    assert {"z-image", "z-image-turbo"} <= models.keys()
    weights = models["z-image"].served_weights
    assert weights is not None
    assert weights["random_weights"] is True


def test_configuration_comes_from_the_environment(
    server: LiveServer, api_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("ZIMAGE_BASE_URL", "ZIMAGE_API_KEY", "RUNAPI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    with ZImage() as unset:
        assert unset.base_url == "http://127.0.0.1:8000"
        with pytest.raises(AuthenticationError, match="no API key"):
            unset.balance()

    monkeypatch.setenv("ZIMAGE_BASE_URL", server.base_url + "/")
    monkeypatch.setenv("RUNAPI_API_KEY", api_key)
    with ZImage() as from_runapi_key:
        assert from_runapi_key.base_url == server.base_url
        assert from_runapi_key.balance().balance_cents == 100

    monkeypatch.setenv("RUNAPI_API_KEY", "zimg_wrong")
    monkeypatch.setenv("ZIMAGE_API_KEY", api_key)  # ZIMAGE_API_KEY wins over RUNAPI_API_KEY
    with ZImage() as from_zimage_key:
        assert from_zimage_key.balance().balance_cents == 100
    with ZImage(api_key="zimg_wrong") as explicit, pytest.raises(AuthenticationError):
        explicit.balance()  # and an explicit argument wins over both


def test_server_errors_become_typed_exceptions(server: LiveServer, sdk: ZImage) -> None:
    stranger = ZImage(base_url=server.base_url, api_key="zimg_not_a_key")
    with stranger, pytest.raises(AuthenticationError) as unauthorized:
        stranger.balance()
    assert unauthorized.value.status_code == 401
    assert unauthorized.value.code == "invalid_api_key"
    assert unauthorized.value.request_id

    with pytest.raises(NotFoundError) as missing:
        sdk.get("tsk_does_not_exist")
    assert (missing.value.status_code, missing.value.code) == (404, "task_not_found")

    with pytest.raises(ValidationError) as invalid:
        sdk.create("x", size="100x100")
    assert (invalid.value.status_code, invalid.value.param) == (422, "size")

    task = sdk.run("x", **SMALL)
    tampered = task.images[0].url.replace("signature=", "signature=0")
    with pytest.raises(PermissionDeniedError) as forbidden:
        sdk.download(tampered)
    assert forbidden.value.code == "invalid_signature"

    broke = ZImage(base_url=server.base_url, api_key=server.create_key(f"broke-{time.monotonic_ns()}", 0))
    with broke, pytest.raises(InsufficientCreditsError) as poor:
        broke.create("x", **SMALL)
    assert (poor.value.status_code, poor.value.code) == (402, "insufficient_credits")
    assert isinstance(poor.value, ZImageError)


def test_an_unreachable_server_is_a_connection_error() -> None:
    nowhere = ZImage(base_url=f"http://127.0.0.1:{free_port()}", api_key="zimg_x", max_retries=2)
    with nowhere, pytest.raises(SDKConnectionError) as refused:
        nowhere.get("tsk_x")
    assert isinstance(refused.value, ConnectionError)  # the builtin, too
    assert "GET /v1/tasks/tsk_x failed" in str(refused.value)


def test_cancel_fail_and_timeout(sdk: ZImage) -> None:
    blocker = sdk.create("keeps the worker busy", **BLOCKER)
    queued = sdk.create("waits behind it", **SMALL)

    cancelled = sdk.cancel(queued.id)
    assert (cancelled.status, cancelled.error_code) == ("failed", "cancelled")
    with pytest.raises(ConflictError) as finished:
        sdk.cancel(queued.id)
    assert finished.value.code == "task_finished"

    with pytest.raises(TaskTimeoutError) as slow:
        sdk.run("still waiting", timeout=0.3, poll_interval=0.1, **SMALL)
    assert slow.value.task.status == "pending"
    sdk.cancel(slow.value.task.id)

    with pytest.raises(TaskFailedError) as failed:
        sdk.run("cancelled while pending", on_progress=lambda task: task.done or sdk.cancel(task.id), **SMALL)
    assert failed.value.code == "cancelled"
    assert failed.value.task.status == "failed"

    sdk.cancel(blocker.id)  # a processing task stops at its next step
    deadline = time.monotonic() + 60
    while not (ended := sdk.get(blocker.id)).done and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ended.error_code == "cancelled"
    assert sdk.balance().balance_cents == 100  # every cancelled task was refunded


def test_async_client(server: LiveServer, api_key: str, tmp_path: Path) -> None:
    async def scenario() -> tuple[Task, list[Path], int, list[str]]:
        statuses: list[str] = []

        async def record(task: Task) -> None:
            statuses.append(task.status)

        async with AsyncZImage(base_url=server.base_url, api_key=api_key) as client:
            task = await client.run("一只狗", seed=3, on_progress=record, **SMALL)
            paths = await client.save(task, tmp_path / "dog.png")
            balance = await client.balance()
            with pytest.raises(NotFoundError):
                await client.get("tsk_nope")
            assert "z-image" in {model.id for model in await client.models()}
            return task, paths, balance.balance_cents, statuses

    task, paths, balance, statuses = asyncio.run(scenario())
    assert (task.status, task.seed) == ("completed", 3)
    assert statuses[0] == "pending"
    assert statuses[-1] == "completed"
    with Image.open(paths[0]) as image:
        assert (image.format, image.size) == ("PNG", (256, 256))
    assert balance == 99


def test_rate_limits_are_retried_after_retry_after(limited_server: LiveServer) -> None:
    key = limited_server.create_key(f"limited-{time.monotonic_ns()}", credits=100)
    with (
        ZImage(base_url=limited_server.base_url, api_key=key) as patient,
        ZImage(base_url=limited_server.base_url, api_key=key, max_retries=0) as impatient,
    ):
        patient.create("first", **SMALL)  # takes the only token
        with pytest.raises(RateLimitError) as limited:
            impatient.create("second", **SMALL)
        assert (limited.value.status_code, limited.value.code) == (429, "rate_limited")
        assert limited.value.retry_after is not None
        assert limited.value.retry_after >= 1

        started = time.monotonic()
        third = patient.create("third", **SMALL)  # waits out Retry-After, then goes through
        assert time.monotonic() - started >= 1
        assert third.status in ("pending", "processing", "completed")
        # The Idempotency-Key the SDK sends made the resend safe: two tasks, two charges, no more.
        assert patient.balance().balance_cents == 98


def test_verify_webhook_accepts_the_servers_deliveries_only(
    limited_server: LiveServer, receiver: WebhookReceiver
) -> None:
    key = limited_server.create_key(f"hooks-{time.monotonic_ns()}", credits=100)
    with ZImage(base_url=limited_server.base_url, api_key=key) as client:
        task = client.run("hooked", callback_url=receiver.url, **SMALL)
    secret = httpx.get(
        f"{limited_server.base_url}/api/v1/webhook_secret", headers={"Authorization": f"Bearer {key}"}
    ).json()["secret"]
    delivery = receiver.wait_for(1)[0]

    payload = verify_webhook(delivery.headers, delivery.body, secret)
    assert Task.model_validate(payload).id == task.id
    assert payload["status"] == "completed"
    # Header names are matched in any case, as proxies rewrite them.
    assert verify_webhook({k.upper(): v for k, v in delivery.headers.items()}, delivery.body.decode(), secret)

    forged = delivery.body.replace(b'"completed"', b'"failed"')
    other_secret = "whsec_" + "A" * 32
    without_signature = {k: v for k, v in delivery.headers.items() if k.lower() != "webhook-signature"}
    for headers, body, key_ in [
        (delivery.headers, forged, secret),
        (delivery.headers, delivery.body, other_secret),
        (without_signature, delivery.body, secret),
        ({**delivery.headers, "webhook-timestamp": str(int(time.time()) - 3600)}, delivery.body, secret),
        ({**delivery.headers, "webhook-signature": "garbage"}, delivery.body, secret),
        (delivery.headers, delivery.body, "whsec_%%%"),
    ]:
        with pytest.raises(WebhookVerificationError):
            verify_webhook(headers, body, key_)


# The pure decisions behind the clients, on real httpx responses.


@pytest.mark.parametrize(
    ("status", "error_class"),
    [
        (400, BadRequestError),
        (401, AuthenticationError),
        (402, InsufficientCreditsError),
        (403, PermissionDeniedError),
        (404, NotFoundError),
        (409, ConflictError),
        (410, GoneError),
        (422, ValidationError),
        (429, RateLimitError),
        (500, ServerError),
        (503, ServiceUnavailableError),
        (504, ServerError),
        (418, ZImageError),
    ],
)
def test_statuses_map_to_error_classes(status: int, error_class: type[ZImageError]) -> None:
    response = httpx.Response(
        status,
        json={"error": {"code": "some_code", "message": "what went wrong", "param": "seed"}},
        headers={"x-request-id": "req-1", "Retry-After": "7"},
    )
    error = _core.error_from_response(response)
    assert type(error) is error_class
    assert (error.status_code, error.code, error.message, error.request_id, error.param) == (
        status,
        "some_code",
        "what went wrong",
        "req-1",
        "seed",
    )
    if isinstance(error, RateLimitError | ServiceUnavailableError):
        assert error.retry_after == 7


def test_a_body_that_is_not_an_error_envelope_still_gives_a_message() -> None:
    error = _core.error_from_response(httpx.Response(502, text="<html>bad gateway</html>"))
    assert isinstance(error, ServerError)
    assert error.code is None
    assert "bad gateway" in error.message


def test_retry_decisions() -> None:
    get, cancel = _core.get_call("tsk_1"), _core.cancel_call("tsk_1")
    create = _core.create_call("x", {"seed": None, "size": "256x256"}, None)
    assert create.json == {"prompt": "x", "size": "256x256"}
    assert create.headers["Idempotency-Key"]
    assert create.retryable

    busy = httpx.Response(503, headers={"Retry-After": "3"})
    assert _core.retry_delay(get, 0, 3, busy) == 3
    assert _core.retry_delay(get, 0, 3, httpx.Response(429, headers={"Retry-After": "120"})) == 10
    backoff = _core.retry_delay(get, 2, 3, httpx.Response(502))
    assert backoff is not None
    assert 0 <= backoff <= 2
    transport = _core.retry_delay(get, 0, 3)  # no response: the connection failed
    assert transport is not None
    assert 0 <= transport <= 0.5
    assert _core.retry_delay(get, 3, 3, busy) is None  # out of attempts
    assert _core.retry_delay(get, 0, 3, httpx.Response(500)) is None
    assert _core.retry_delay(get, 0, 3, httpx.Response(404)) is None
    assert _core.retry_delay(cancel, 0, 3, busy) is None
    assert _core.retry_delay(cancel, 0, 3) is None


def test_poll_delays_follow_retry_after_with_a_cap_and_back_off_without_it() -> None:
    now = [0.0]
    poll = _core.Poll(timeout=30, poll_interval=None, clock=lambda: now[0])

    def pending(retry_after: float | None) -> Task:
        task = Task(id="tsk_1", status="pending")
        task._retry_after = retry_after
        return task

    assert poll.next_delay(pending(2)) == 2
    assert poll.next_delay(pending(25)) == 10
    assert [poll.next_delay(pending(None)) for _ in range(6)] == [0.5, 0.75, 1.125, 1.6875, 2.53125, 3.796875]
    assert poll.next_delay(pending(None)) == 5
    now[0] = 27.0
    assert poll.next_delay(pending(10)) == 3  # never sleeps past the deadline
    now[0] = 30.0
    with pytest.raises(TaskTimeoutError):
        poll.next_delay(pending(1))

    fixed = _core.Poll(timeout=30, poll_interval=0.25, clock=lambda: 0.0)
    assert fixed.next_delay(pending(20)) == 0.25
