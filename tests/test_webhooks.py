"""Webhooks end to end: signed deliveries to a real receiver, retries, 410, Retry-After, SSRF, restarts."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from standardwebhooks import Webhook

from tests.conftest import WEBHOOK_TEST_ENV, LiveServer, WebhookReceiver, wait_terminal

SMALL = {"size": "256x256", "num_inference_steps": 2}


@pytest.fixture(scope="module")
def hook_server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[LiveServer]:
    live = LiveServer(
        data_dir=tmp_path_factory.mktemp("hooks") / "data", model=tiny_model_dir, env=WEBHOOK_TEST_ENV
    )
    live.start()
    yield live
    live.stop()


@pytest.fixture
def http(hook_server: LiveServer) -> Iterator[httpx.Client]:
    key = hook_server.create_key(f"hooks-{time.monotonic_ns()}", credits=100)
    with httpx.Client(
        base_url=hook_server.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30
    ) as client:
        yield client


def deliveries(http: httpx.Client, task_id: str) -> list[dict[str, object]]:
    data: list[dict[str, object]] = http.get(
        "/api/v1/webhook_deliveries", params={"task_id": task_id}
    ).json()["data"]
    return data


def wait_delivery(http: httpx.Client, task_id: str, status: str, timeout: float = 30.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = deliveries(http, task_id)
        if found and found[0]["status"] == status:
            return found[0]
        time.sleep(0.1)
    raise AssertionError(f"delivery for {task_id} never became {status}: {deliveries(http, task_id)}")


def test_completed_task_is_delivered_signed_with_the_get_envelope(
    http: httpx.Client, receiver: WebhookReceiver
) -> None:
    task_id = http.post(
        "/v1/text_to_image", json={"prompt": "hook", "callback_url": receiver.url, **SMALL}
    ).json()["id"]
    request = receiver.wait_for(1)[0]
    secret = http.get("/api/v1/webhook_secret").json()["secret"]
    assert secret.startswith("whsec_")
    payload = Webhook(secret).verify(request.body, request.headers)
    current = http.get(f"/v1/tasks/{task_id}").json()
    assert payload["id"] == task_id
    assert payload["status"] == "completed"
    assert payload["images"][0]["url"].split("?")[0] == current["images"][0]["url"].split("?")[0]
    assert request.headers["webhook-id"].startswith("msg_")
    # A forged body does not verify with the account's secret.
    with pytest.raises(Exception, match="signature"):
        Webhook(secret).verify(request.body.replace(b"completed", b"failed"), request.headers)
    delivered = wait_delivery(http, task_id, "succeeded")
    assert delivered["attempts"] == 1
    assert delivered["last_status_code"] == 200


def test_failures_are_retried_with_backoff_then_succeed(
    http: httpx.Client, receiver: WebhookReceiver
) -> None:
    receiver.script = [(500, {}, 0.0), (502, {}, 0.0)]
    task_id = http.post(
        "/v1/text_to_image", json={"prompt": "retry", "callback_url": receiver.url, **SMALL}
    ).json()["id"]
    received = receiver.wait_for(3)
    assert len({r.headers["webhook-id"] for r in received}) == 1  # one message, retried
    # Backoff: the first retry waits at least half of 0.3 s, the second at least half of 0.6 s.
    assert received[1].at - received[0].at >= 0.14
    assert received[2].at - received[1].at >= 0.29
    delivery = wait_delivery(http, task_id, "succeeded")
    assert delivery["attempts"] == 3
    assert [attempt["status_code"] for attempt in delivery["attempt_log"]] == [500, 502, 200]  # type: ignore[attr-defined]


def test_retry_after_is_honoured(http: httpx.Client, receiver: WebhookReceiver) -> None:
    receiver.script = [(503, {"Retry-After": "2"}, 0.0)]
    http.post("/v1/text_to_image", json={"prompt": "later", "callback_url": receiver.url, **SMALL})
    first, second = receiver.wait_for(2)
    assert second.at - first.at >= 1.9


def test_410_stops_delivery(http: httpx.Client, receiver: WebhookReceiver) -> None:
    receiver.script = [(410, {}, 0.0)]
    task_id = http.post(
        "/v1/text_to_image", json={"prompt": "gone", "callback_url": receiver.url, **SMALL}
    ).json()["id"]
    delivery = wait_delivery(http, task_id, "failed")
    assert delivery["attempts"] == 1
    assert "410" in str(delivery["last_error"])
    time.sleep(1.0)
    assert len(receiver.received) == 1


def test_gives_up_after_the_attempt_bound(http: httpx.Client, receiver: WebhookReceiver) -> None:
    receiver.script = [(500, {}, 0.0)] * 10
    task_id = http.post(
        "/v1/text_to_image", json={"prompt": "never", "callback_url": receiver.url, **SMALL}
    ).json()["id"]
    delivery = wait_delivery(http, task_id, "failed", timeout=60)
    assert delivery["attempts"] == 4
    assert "gave up" in str(delivery["last_error"])
    # The user can send it again by hand, with the same webhook-id.
    receiver.script = []
    redelivered = http.post(f"/api/v1/webhook_deliveries/{delivery['id']}/redeliver")
    assert redelivered.status_code == 200
    wait_delivery(http, task_id, "succeeded")
    assert receiver.received[-1].headers["webhook-id"] == delivery["id"]


def test_a_hanging_receiver_delays_nothing_else(
    hook_server: LiveServer, http: httpx.Client, receiver: WebhookReceiver
) -> None:
    slow = WebhookReceiver()
    slow.script = [(200, {}, 30.0)] * 4
    try:
        hanging = http.post(
            "/v1/text_to_image", json={"prompt": "hang", "callback_url": slow.url, **SMALL}
        ).json()["id"]
        slow.wait_for(1)
        started = time.monotonic()
        quick = http.post(
            "/v1/text_to_image", json={"prompt": "quick", "callback_url": receiver.url, **SMALL}
        ).json()["id"]
        receiver.wait_for(1, timeout=10)
        assert time.monotonic() - started < 5
        assert wait_terminal(http, quick)["status"] == "completed"
        assert httpx.get(f"{hook_server.base_url}/readyz").status_code == 200
        # The hanging attempt timed out and is scheduled again.
        delivery = wait_delivery(http, hanging, "pending")
        deadline = time.monotonic() + 10
        while "timed out" not in str(delivery["last_error"]) and time.monotonic() < deadline:
            time.sleep(0.2)
            delivery = deliveries(http, hanging)[0]
        assert "timed out" in str(delivery["last_error"])
    finally:
        slow.close()


def test_cancelled_task_is_delivered_as_failed(http: httpx.Client, receiver: WebhookReceiver) -> None:
    http.post("/v1/text_to_image", json={"prompt": "blocker", "size": "1024x1024", "num_inference_steps": 12})
    task_id = http.post(
        "/v1/text_to_image", json={"prompt": "cancel me", "callback_url": receiver.url, **SMALL}
    ).json()["id"]
    assert http.post(f"/v1/tasks/{task_id}/cancel").json()["status"] == "failed"
    payload = json.loads(receiver.wait_for(1)[0].body)
    assert payload["status"] == "failed"
    assert payload["error_code"] == "cancelled"


def test_secret_rotation_changes_the_signature(http: httpx.Client, receiver: WebhookReceiver) -> None:
    old = http.get("/api/v1/webhook_secret").json()["secret"]
    new = http.post("/api/v1/webhook_secret/rotate").json()["secret"]
    assert new != old
    assert http.get("/api/v1/webhook_secret").json()["secret"] == new
    http.post("/v1/text_to_image", json={"prompt": "rotated", "callback_url": receiver.url, **SMALL})
    request = receiver.wait_for(1)[0]
    Webhook(new).verify(request.body, request.headers)
    with pytest.raises(Exception, match="signature"):
        Webhook(old).verify(request.body, request.headers)


def test_deliveries_survive_a_restart(
    tmp_path: Path, tiny_model_dir: Path, receiver: WebhookReceiver
) -> None:
    live = LiveServer(
        data_dir=tmp_path / "data",
        model=tiny_model_dir,
        env={
            **WEBHOOK_TEST_ENV,
            "ZIMAGE_WEBHOOK_BACKOFF_BASE_SECONDS": "3",
            "ZIMAGE_WEBHOOK_MAX_ATTEMPTS": "10",
        },
    )
    live.start()
    try:
        key = live.create_key("restart")
        client = httpx.Client(base_url=live.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        receiver.script = [(500, {}, 0.0)]
        task_id = client.post(
            "/v1/text_to_image", json={"prompt": "x", "callback_url": receiver.url, **SMALL}
        ).json()["id"]
        receiver.wait_for(1)
        live.kill()
        live.start()
        received = receiver.wait_for(2, timeout=30)
        assert received[1].headers["webhook-id"] == received[0].headers["webhook-id"]
        assert wait_delivery(client, task_id, "succeeded")["attempts"] == 2
        client.close()
    finally:
        live.stop()


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/hook",
        "http://localhost/hook",
        "http://10.1.2.3/hook",
        "http://192.168.0.1/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://0.0.0.0/hook",
        "http://user:pass@example.com/hook",
        "http://no-such-host.invalid/hook",
    ],
)
def test_callback_urls_into_private_networks_are_refused(client: httpx.Client, url: str) -> None:
    # The shared server allows no private networks (the default).
    response = client.post("/v1/text_to_image", json={"prompt": "ssrf", "callback_url": url, **SMALL})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == "callback_url"
    assert client.get("/api/v1/me/balance").json()["balance_cents"] == 100
