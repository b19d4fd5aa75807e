"""Idempotency, cancellation, limits, leases and graceful shutdown, against live servers."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from runapi.core.options import RequestOptions
from runapi.z_image import ZImageClient

from tests.conftest import LiveServer, wait_terminal
from zimage_server import accounts
from zimage_server.config import Settings
from zimage_server.db.models import Account, Task
from zimage_server.db.session import Database
from zimage_server.schemas import TextToImageRequest
from zimage_server.storage import ImageStore
from zimage_server.tasks import Lifecycle, Renderer, submit, validate_request
from zimage_server.worker.queue import TaskQueue

SMALL = {"size": "256x256", "num_inference_steps": 2}
SLOW = {"size": "1024x1024", "num_inference_steps": 40}


def wait_processing(http: httpx.Client, task_id: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = http.get(f"/v1/tasks/{task_id}").json()
        if body["status"] == "processing" and body.get("progress", {}).get("step", 0) >= 1:
            return
        time.sleep(0.05)
    raise AssertionError(f"task {task_id} never started")


# ------------------------------------------------------------------------------------ idempotency


def test_idempotency_key_replays_the_original_task(client: httpx.Client) -> None:
    headers = {"Idempotency-Key": "order-17"}
    body = {"prompt": "once", **SMALL}
    first = client.post("/v1/text_to_image", json=body, headers=headers)
    again = client.post("/v1/text_to_image", json=body, headers=headers)
    assert again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    conflict = client.post("/v1/text_to_image", json={**body, "prompt": "twice"}, headers=headers)
    assert conflict.status_code == 409
    assert conflict.json()["error"]["code"] == "idempotency_key_reused"
    # A key is scoped to a surface's request and the account: the RunAPI route is a different request.
    other_route = client.post("/api/v1/z_image/text_to_image", json=body, headers=headers)
    assert other_route.status_code == 409
    wait_terminal(client, first.json()["id"])
    assert client.get("/api/v1/me/balance").json()["balance_cents"] == 99


def test_idempotency_keys_are_scoped_to_the_account(server: LiveServer, client: httpx.Client) -> None:
    other = server.create_key("other-idem")
    body = {"prompt": "mine", **SMALL}
    mine = client.post("/v1/text_to_image", json=body, headers={"Idempotency-Key": "shared"}).json()["id"]
    theirs = httpx.post(
        f"{server.base_url}/v1/text_to_image",
        json=body,
        headers={"Idempotency-Key": "shared", "Authorization": f"Bearer {other}"},
    ).json()["id"]
    assert mine != theirs


def test_concurrent_requests_with_one_key_create_one_task(client: httpx.Client) -> None:
    results: list[str] = []
    barrier = threading.Barrier(8)

    def post() -> None:
        barrier.wait()
        response = client.post(
            "/v1/text_to_image", json={"prompt": "race", **SMALL}, headers={"Idempotency-Key": "race-1"}
        )
        assert response.status_code == 200, response.text
        results.append(response.json()["id"])

    threads = [threading.Thread(target=post) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 8
    assert len(set(results)) == 1
    wait_terminal(client, results[0])
    assert client.get("/api/v1/me/balance").json()["balance_cents"] == 99


def test_idempotency_key_length_is_bounded(client: httpx.Client) -> None:
    response = client.post(
        "/v1/text_to_image", json={"prompt": "x", **SMALL}, headers={"Idempotency-Key": "k" * 513}
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_idempotency_key"


def test_the_official_sdk_retries_safely_with_a_key(server: LiveServer, api_key: str) -> None:
    sdk = ZImageClient(api_key=api_key, base_url=server.base_url)
    # The SDK retries a POST on network errors and 5xx only when it carries an Idempotency-Key.
    options = RequestOptions(headers={"Idempotency-Key": "sdk-1"})
    first = sdk.text_to_image.create(options=options, prompt="sdk once", **SMALL)
    second = sdk.text_to_image.create(options=options, prompt="sdk once", **SMALL)
    assert first.id == second.id


# ----------------------------------------------------------------------------------- cancellation


def test_cancel_a_pending_task_refunds_at_once(client: httpx.Client) -> None:
    blocker = client.post(
        "/v1/text_to_image", json={"prompt": "blocker", "size": "1024x1024", "num_inference_steps": 12}
    ).json()["id"]
    waiting = client.post("/api/v1/z_image/text_to_image", json={"prompt": "waiting", **SMALL}).json()["id"]
    cancelled = client.post(f"/api/v1/z_image/text_to_image/{waiting}/cancel")
    assert cancelled.status_code == 200
    body = cancelled.json()
    assert body["status"] == "failed"
    assert body["error_code"] == "cancelled"
    assert "cancelled" in body["error"]
    assert client.get("/api/v1/me/balance").json()["reserved_cents"] == 1  # only the blocker
    again = client.post(f"/v1/tasks/{waiting}/cancel")
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "task_finished"
    wait_terminal(client, blocker)
    assert client.get("/api/v1/me/balance").json()["balance_cents"] == 99


def test_cancel_a_processing_task_stops_it_at_the_next_step(client: httpx.Client) -> None:
    task_id = client.post("/v1/text_to_image", json={"prompt": "long", **SLOW}).json()["id"]
    wait_processing(client, task_id)
    started = time.monotonic()
    response = client.post(f"/v1/tasks/{task_id}/cancel")
    assert response.status_code == 200
    assert response.json()["status"] == "processing"  # flagged; the worker stops it
    done = wait_terminal(client, task_id, timeout=30)
    assert time.monotonic() - started < 5
    assert done["status"] == "failed"
    assert done["error_code"] == "cancelled"
    assert done["progress"]["step"] < 40 if "progress" in done else True  # type: ignore[index,operator]
    assert client.get("/api/v1/me/balance").json()["balance_cents"] == 100


def test_cancel_someone_elses_task_is_a_404(server: LiveServer, client: httpx.Client) -> None:
    task_id = client.post("/v1/text_to_image", json={"prompt": "mine", **SMALL}).json()["id"]
    other = server.create_key("canceller")
    response = httpx.post(
        f"{server.base_url}/v1/tasks/{task_id}/cancel", headers={"Authorization": f"Bearer {other}"}
    )
    assert response.status_code == 404
    assert wait_terminal(client, task_id)["status"] == "completed"


# ---------------------------------------------------------------------------------------- limits


@pytest.fixture(scope="module")
def tight_server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[LiveServer]:
    live = LiveServer(
        data_dir=tmp_path_factory.mktemp("tight") / "data",
        model=tiny_model_dir,
        env={
            "ZIMAGE_RATE_LIMIT_PER_MINUTE": "30",
            "ZIMAGE_RATE_LIMIT_BURST": "3",
            "ZIMAGE_MAX_PENDING_TASKS_PER_ACCOUNT": "2",
            "ZIMAGE_MAX_PENDING_TASKS_TOTAL": "3",
            "ZIMAGE_MAX_BODY_BYTES": "4096",
        },
    )
    live.start()
    yield live
    live.stop()


def test_rate_limit_per_key(tight_server: LiveServer) -> None:
    key = tight_server.create_key("rate")
    http = httpx.Client(base_url=tight_server.base_url, headers={"Authorization": f"Bearer {key}"})
    codes = [http.post("/v1/text_to_image", json={"prompt": "r", **SMALL}).status_code for _ in range(4)]
    assert codes[:3] == [200, 200, 200]
    limited = http.post("/v1/text_to_image", json={"prompt": "r", **SMALL})
    assert limited.status_code == 429
    assert limited.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(limited.headers["retry-after"]) <= 2
    # Reads are not limited.
    assert http.get("/api/v1/me/balance").status_code == 200
    time.sleep(2.1)
    assert http.post("/v1/text_to_image", json={"prompt": "r", **SMALL}).status_code == 200
    http.close()


def test_queue_bounds(tight_server: LiveServer) -> None:
    keys = [tight_server.create_key(f"queue-{i}") for i in range(2)]
    clients = [
        httpx.Client(base_url=tight_server.base_url, headers={"Authorization": f"Bearer {k}"}) for k in keys
    ]
    # Let earlier tests' tasks drain so the counts below are this test's own.
    deadline = time.monotonic() + 60
    db = tight_server.database()
    while time.monotonic() < deadline:
        with db.session() as session:
            from sqlalchemy import func, select

            if not session.execute(
                select(func.count()).select_from(Task).where(Task.status.in_(("pending", "processing")))
            ).scalar_one():
                break
        time.sleep(0.2)
    clients[0].post("/v1/text_to_image", json={"prompt": "running", **SLOW})
    time.sleep(1.0)  # let the worker take it: the rest queue behind it
    statuses = [
        clients[0].post("/v1/text_to_image", json={"prompt": f"q{i}", **SMALL}).status_code for i in range(3)
    ]
    assert statuses[:2] == [200, 200]
    assert statuses[2] == 429
    own = clients[0].post("/v1/text_to_image", json={"prompt": "q", **SMALL})
    assert own.json()["error"]["code"] in ("too_many_pending_tasks", "rate_limited")
    assert clients[1].post("/v1/text_to_image", json={"prompt": "fills", **SMALL}).status_code == 200
    full = clients[1].post("/v1/text_to_image", json={"prompt": "full", **SMALL})
    assert full.status_code == 503
    assert full.json()["error"]["code"] == "queue_full"
    assert int(full.headers["retry-after"]) >= 1
    for http in clients:
        http.close()
    db.dispose()


def test_body_size_limit(tight_server: LiveServer) -> None:
    key = tight_server.create_key("body")
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    huge = b'{"prompt": "' + b"x" * 10_000 + b'"}'
    declared = httpx.post(f"{tight_server.base_url}/v1/text_to_image", content=huge, headers=headers)
    assert declared.status_code == 413
    assert declared.json()["error"]["code"] == "payload_too_large"

    def chunks() -> Iterator[bytes]:
        for _ in range(10):
            yield b" " * 1000
        yield b'{"prompt": "x"}'

    chunked = httpx.post(f"{tight_server.base_url}/v1/text_to_image", content=chunks(), headers=headers)
    assert chunked.status_code == 413
    assert (
        httpx.get(f"{tight_server.base_url}/api/v1/me/balance", headers=headers).json()["balance_cents"]
        == 100
    )


# ------------------------------------------------------------------------------- leases and crashes


def test_expired_leases_are_retried_then_failed_and_refunded(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, task_lease_seconds=0.2, max_task_attempts=2)
    db = Database(settings.resolved_database_url)
    db.migrate()
    lifecycle = Lifecycle(Renderer(ImageStore(settings.images_dir, b"k"), settings), settings)
    first, second = (TaskQueue(db, lifecycle, settings, worker_id=name) for name in ("w1", "w2"))
    with db.session() as session:
        account = accounts.create_account(session, "a", credits=5)
        principal = accounts.Principal(account.id, accounts.create_key(session, account, "k").key_id)
        task_id = submit(
            session, principal, validate_request(TextToImageRequest(prompt="x"), settings), surface="t"
        ).id
    claimed = first.claim()
    assert claimed is not None
    assert claimed.attempt == 1
    assert second.claim() is None  # leased to w1
    assert first.heartbeat(task_id)
    time.sleep(0.3)  # w1 "dies": no heartbeat
    again = second.claim()
    assert again is not None
    assert again.attempt == 2
    assert not first.heartbeat(task_id)  # w1 lost it, and cannot complete it any more
    assert not first.complete(task_id, ["0.png"])
    time.sleep(0.3)  # w2 dies too: the attempts are used up
    assert second.claim() is None
    with db.session() as session:
        task = session.get(Task, task_id)
        assert task is not None
        assert task.status == "failed"
        assert task.error_code == "worker_lost"
        assert session.get(Account, account.id).balance_cents == 5  # type: ignore[union-attr]
    db.dispose()


def test_sigterm_releases_the_running_task_and_exits(tmp_path: Path, tiny_model_dir: Path) -> None:
    live = LiveServer(data_dir=tmp_path / "data", model=tiny_model_dir)
    live.start()
    try:
        key = live.create_key("term")
        http = httpx.Client(base_url=live.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        task_id = http.post("/v1/text_to_image", json={"prompt": "long", **SLOW}).json()["id"]
        wait_processing(http, task_id)
        assert live.process is not None
        started = time.monotonic()
        live.process.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal so the exit status tells what happened.
        assert live.process.wait(30) in (0, -signal.SIGTERM)
        assert time.monotonic() - started < 10
        db = live.database()
        with db.session() as session:
            task = session.get(Task, task_id)
            assert task is not None
            assert task.status == "pending"
            assert task.attempts == 0  # a graceful hand-back is not a failed attempt
        db.dispose()
        live.start()
        assert wait_terminal(http, task_id, timeout=120)["status"] == "completed"
        http.close()
    finally:
        live.stop()
