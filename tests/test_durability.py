"""Crash and failure paths: a killed server, a failing engine, and the ledger after all of it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from sqlalchemy import func, select

from tests.conftest import LiveServer, wait_terminal
from zimage_server import accounts, billing
from zimage_server.config import Settings
from zimage_server.db.models import Account, LedgerEntry, Task
from zimage_server.db.session import Database
from zimage_server.engine import GenerationSpec
from zimage_server.schemas import TextToImageRequest
from zimage_server.storage import ImageStore
from zimage_server.tasks import Lifecycle, Renderer, submit, validate_request
from zimage_server.worker.queue import TaskQueue
from zimage_server.worker.runner import Runner


def assert_ledger_balances(db: Database) -> None:
    """Every balance equals its ledger; every task's money is where its state says it is."""
    with db.session() as session:
        for account in session.execute(select(Account)).scalars():
            assert account.balance_cents == billing.ledger_sum(session, account.id), account.name
            assert account.balance_cents >= 0
        for task in session.execute(select(Task)).scalars():
            kinds = sorted(
                session.execute(select(LedgerEntry.kind).where(LedgerEntry.task_id == task.id)).scalars()
            )
            expected = {
                "pending": ["reserve"],
                "processing": ["reserve"],
                "completed": ["reserve", "settle"],
                "failed": ["refund", "reserve"],
            }[task.status]
            assert kinds == expected, (task.id, task.status, kinds)
            charged = -sum(
                session.execute(
                    select(LedgerEntry.amount_cents).where(LedgerEntry.task_id == task.id)
                ).scalars()
            )
            assert charged == (0 if task.status == "failed" else task.price_cents)


def test_restart_with_a_task_mid_flight(tmp_path: Path, tiny_model_dir: Path) -> None:
    live = LiveServer(data_dir=tmp_path / "data", model=tiny_model_dir)
    live.start()
    try:
        key = live.create_key("crash", credits=10)
        http = httpx.Client(base_url=live.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        slow = http.post(
            "/v1/text_to_image",
            json={"prompt": "slow", "size": "1024x1024", "num_inference_steps": 40, "seed": 7},
        )
        queued = http.post(
            "/v1/text_to_image", json={"prompt": "queued", "size": "256x256", "num_inference_steps": 2}
        )
        slow_id, queued_id = slow.json()["id"], queued.json()["id"]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            body = http.get(f"/v1/tasks/{slow_id}").json()
            if body["status"] == "processing" and body.get("progress", {}).get("step", 0) >= 1:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the slow task never started")
        live.kill()
        live.start()
        slow_done = wait_terminal(http, slow_id, timeout=180)
        queued_done = wait_terminal(http, queued_id, timeout=60)
        assert slow_done["status"] == queued_done["status"] == "completed"
        image = Image.open(__import__("io").BytesIO(httpx.get(slow_done["images"][0]["url"]).content))  # type: ignore[index]
        assert image.size == (1024, 1024)
        assert http.get("/api/v1/me/balance").json()["balance_cents"] == 8
        db = live.database()
        with db.session() as session:
            assert session.get(Task, slow_id).attempts == 2  # type: ignore[union-attr]
        assert_ledger_balances(db)
        db.dispose()
        http.close()
    finally:
        live.stop()


class ExplodingEngine:
    """Fault injection: the engine API, failing the way a GPU does when memory runs out."""

    device = "cpu"

    def __init__(self, fail_prompts: set[str]) -> None:
        self.fail_prompts = fail_prompts

    def generate_batch(self, specs: list[GenerationSpec], on_step: Any = None) -> list[list[Image.Image]]:
        if any(spec.prompt in self.fail_prompts for spec in specs):
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return [[Image.new("RGB", (spec.width, spec.height), "white")] * spec.num_images for spec in specs]


def test_a_failing_task_is_refunded_and_the_worker_goes_on(tmp_path: Path) -> None:
    # Batches of one, so the failing task does not take the good one down with it.
    settings = Settings(data_dir=tmp_path, worker_idle_poll_seconds=0.05, max_batch_images=1)
    db = Database(settings.resolved_database_url)
    db.migrate()
    store = ImageStore(settings.images_dir, b"secret")
    queue = TaskQueue(db, Lifecycle(Renderer(store, settings), settings), settings)
    runner = Runner(queue, store, settings, lambda: ExplodingEngine({"boom"}))  # type: ignore[arg-type,return-value]
    with db.session() as session:
        account = accounts.create_account(session, "a", credits=5)
        key = accounts.create_key(session, account, "k")
        principal = accounts.Principal(account.id, key.key_id)
        ids = [
            submit(
                session,
                principal,
                validate_request(TextToImageRequest(prompt=p, size="256x256"), settings),
                surface="test",
            ).id
            for p in ("boom", "fine")
        ]
    runner.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with db.session() as session:
            states = [session.get(Task, task_id).status for task_id in ids]  # type: ignore[union-attr]
        if all(state in ("completed", "failed") for state in states):
            break
        time.sleep(0.05)
    runner.stop()
    assert states == ["failed", "completed"]
    with db.session() as session:
        failed = session.get(Task, ids[0])
        assert failed is not None
        assert failed.error_code == "out_of_memory"
        assert "out of memory" in (failed.error_message or "")
        assert (
            session.execute(
                select(func.count()).select_from(LedgerEntry).where(LedgerEntry.kind == "refund")
            ).scalar_one()
            == 1
        )
        assert session.get(Account, account.id).balance_cents == 4  # type: ignore[union-attr]
    assert_ledger_balances(db)
    db.dispose()


def test_the_shared_server_ledger_balances(server: LiveServer) -> None:
    # Runs against whatever the rest of the suite did to the shared server, once its queue drains.
    db = server.database()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with db.session() as session:
            active = session.execute(
                select(func.count()).select_from(Task).where(Task.status.in_(("pending", "processing")))
            ).scalar_one()
        if not active:
            break
        time.sleep(0.2)
    assert_ledger_balances(db)
    db.dispose()


def test_claim_batch_groups_tasks_of_one_shape_oldest_first(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    db = Database(settings.resolved_database_url)
    db.migrate()
    queue = TaskQueue(
        db, Lifecycle(Renderer(ImageStore(settings.images_dir, b"k"), settings), settings), settings
    )
    with db.session() as session:
        account = accounts.create_account(session, "a", credits=100)
        principal = accounts.Principal(account.id, accounts.create_key(session, account, "k").key_id)

        def add(size: str, images: int = 1) -> str:
            request = TextToImageRequest(prompt="p", size=size, num_images=images)
            return submit(session, principal, validate_request(request, settings), surface="t").id

        small_1 = add("256x256")
        large = add("512x512")
        small_2 = add("256x256", images=2)
        small_3 = add("256x256", images=2)
    first = queue.claim_batch(max_images=4)
    # The oldest, then the next of its shape that fits; the 512 task and the overflow wait.
    assert [claimed.id for claimed in first] == [small_1, small_2]
    assert [claimed.id for claimed in queue.claim_batch(max_images=4)] == [large]
    assert [claimed.id for claimed in queue.claim_batch(max_images=4)] == [small_3]
    assert queue.claim_batch(max_images=4) == []
    db.dispose()
