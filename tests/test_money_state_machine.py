"""Exactly-once money: random sequences of submit, cancel, claim, crash, restart, complete and fail.

After every step each balance equals its ledger, no task is charged twice, and money sits where the
task's state says it should. At the end, draining the queue leaves every task terminal.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import func, select

from tests.test_durability import assert_ledger_balances
from zimage_server import accounts, billing
from zimage_server.config import Settings
from zimage_server.db.models import LedgerEntry, Task
from zimage_server.db.session import Database
from zimage_server.errors import InsufficientCredits
from zimage_server.schemas import TextToImageRequest
from zimage_server.storage import ImageStore
from zimage_server.tasks import ACTIVE_STATUSES, Lifecycle, Renderer, submit, validate_request
from zimage_server.worker.queue import ClaimedTask, TaskQueue

WORKERS = ("w0", "w1", "w2")


class MoneyMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.directory = Path(tempfile.mkdtemp(prefix="zimage-money-"))
        self.settings = Settings(data_dir=self.directory, task_lease_seconds=3600, max_task_attempts=3)
        self.db = Database(self.settings.resolved_database_url)
        self.db.migrate()
        self.lifecycle = Lifecycle(
            Renderer(ImageStore(self.settings.images_dir, b"k"), self.settings), self.settings
        )
        self.queues = {
            name: TaskQueue(self.db, self.lifecycle, self.settings, worker_id=name) for name in WORKERS
        }
        self.claimed: dict[str, ClaimedTask] = {}
        self.task_ids: list[str] = []
        self.principals: list[accounts.Principal] = []
        with self.db.session() as session:
            for index, credits in enumerate((3, 10)):
                account = accounts.create_account(session, f"a{index}", credits=credits)
                self.principals.append(
                    accounts.Principal(account.id, accounts.create_key(session, account, "k").key_id)
                )

    def teardown(self) -> None:
        try:
            self.drain()
            with self.db.session() as session:
                active = session.execute(
                    select(func.count()).select_from(Task).where(Task.status.in_(ACTIVE_STATUSES))
                ).scalar_one()
                assert active == 0, "a task was left non-terminal"
                reservations = session.execute(
                    select(func.count()).select_from(LedgerEntry).where(LedgerEntry.kind == "reserve")
                ).scalar_one()
                assert reservations == len(self.task_ids), "a task was charged twice or never"
            assert_ledger_balances(self.db)
        finally:
            self.db.dispose()
            shutil.rmtree(self.directory, ignore_errors=True)

    @rule(who=st.integers(0, 1), images=st.integers(1, 4))
    def submit(self, who: int, images: int) -> None:
        request = validate_request(
            TextToImageRequest(prompt="p", num_images=images, size="256x256"), self.settings
        )
        try:
            with self.db.session() as session:
                self.task_ids.append(submit(session, self.principals[who], request, surface="test").id)
        except InsufficientCredits:
            pass

    @rule(who=st.integers(0, 1), cents=st.integers(1, 5))
    def grant(self, who: int, cents: int) -> None:
        with self.db.session() as session:
            billing.grant(session, self.principals[who].account_id, cents)

    @precondition(lambda self: self.task_ids)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        task_id = data.draw(st.sampled_from(self.task_ids))
        with self.db.session() as session:
            task = session.get(Task, task_id)
            assert task is not None
            if task.status in ACTIVE_STATUSES:
                self.lifecycle.cancel(session, task)

    @rule(worker=st.sampled_from(WORKERS))
    def claim(self, worker: str) -> None:
        if worker in self.claimed:
            return
        claimed = self.queues[worker].claim()
        if claimed is not None:
            self.claimed[worker] = claimed

    @precondition(lambda self: self.claimed)
    @rule(data=st.data(), outcome=st.sampled_from(["complete", "fail", "cancelled"]))
    def finish(self, data: st.DataObject, outcome: str) -> None:
        worker = data.draw(st.sampled_from(sorted(self.claimed)))
        task = self.claimed.pop(worker)
        queue = self.queues[worker]
        if outcome == "complete":
            queue.complete(task.id, ["0.png"])
        elif outcome == "fail":
            queue.fail(task.id, "generation_failed", "boom")
        else:
            queue.end_cancelled(task.id)

    @precondition(lambda self: self.claimed)
    @rule(data=st.data())
    def crash(self, data: st.DataObject) -> None:
        # The worker dies mid-task: its claim stays in the database with nobody behind it.
        self.claimed.pop(data.draw(st.sampled_from(sorted(self.claimed))))

    @rule()
    def restart(self) -> None:
        self.claimed.clear()
        self.queues["w0"].expire_all_leases()

    @precondition(lambda self: self.task_ids)
    @rule(data=st.data())
    def replay_money_moves(self, data: st.DataObject) -> None:
        # Settling or refunding again (a retried message, a duplicate worker) must change nothing.
        task_id = data.draw(st.sampled_from(self.task_ids))
        with self.db.session() as session:
            task = session.get(Task, task_id)
            assert task is not None
            if task.status == "completed":
                billing.settle(session, task)
                billing.refund(session, task, "replayed")
            elif task.status == "failed":
                billing.refund(session, task, "replayed")
                billing.settle(session, task)

    @invariant()
    def ledger_balances(self) -> None:
        assert_ledger_balances(self.db)

    def drain(self) -> None:
        self.claimed.clear()
        self.queues["w0"].expire_all_leases()
        for _ in range(len(self.task_ids) * (self.settings.max_task_attempts + 1) + 1):
            claimed = self.queues["w0"].claim()
            if claimed is None:
                break
            self.queues["w0"].complete(claimed.id, ["0.png"])


def test_money_state_machine() -> None:
    run_state_machine_as_test(
        MoneyMachine,
        settings=settings(
            max_examples=40, stateful_step_count=30, deadline=None, suppress_health_check=list(HealthCheck)
        ),
    )
