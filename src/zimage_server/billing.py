"""Credits: prices, and every movement of money as a ledger entry.

A task's price is reserved when it is submitted, settled when it completes and refunded when it
fails. Each movement is one ledger row written in the same transaction as the balance change, and a
task can hold at most one row of each kind, so replaying a settle or refund changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, time

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from zimage_server.catalog import CatalogModel
from zimage_server.db.models import Account, LedgerEntry, Task
from zimage_server.errors import InsufficientCredits, NotFound

GRANT_PAID = "grant_paid"
GRANT_BONUS = "grant_bonus"
RESERVE = "reserve"
SETTLE = "settle"
REFUND = "refund"
CHAT = "chat"


def task_price_cents(prices: dict[str, int], model: CatalogModel, num_images: int) -> int:
    return prices.get(model.id, 0) * num_images


def _append(
    session: Session, account_id: int, kind: str, amount: int, *, task_id: str | None, note: str
) -> int:
    balance = session.execute(
        update(Account)
        .where(Account.id == account_id)
        .values(balance_cents=Account.balance_cents + amount)
        .returning(Account.balance_cents)
    ).scalar_one_or_none()
    if balance is None:
        raise NotFound(f"account {account_id} does not exist")
    session.add(
        LedgerEntry(
            account_id=account_id,
            task_id=task_id,
            kind=kind,
            amount_cents=amount,
            balance_after_cents=balance,
            note=note,
        )
    )
    return balance


def grant(
    session: Session, account_id: int, amount_cents: int, *, bonus: bool = False, note: str = ""
) -> int:
    """Add (or, with a negative amount, remove) credits; returns the new balance."""
    return _append(
        session, account_id, GRANT_BONUS if bonus else GRANT_PAID, amount_cents, task_id=None, note=note
    )


def charge(session: Session, account_id: int, amount_cents: int, note: str) -> int | None:
    """Take a usage charge (chat tokens) after the fact; returns the new balance, or None if it was free.

    Usage is only known once it happened, so unlike a task reservation this may take the balance below
    zero; callers refuse new work up front while the balance is not positive.
    """
    if amount_cents <= 0:
        return None
    return _append(session, account_id, CHAT, -amount_cents, task_id=None, note=note)


def reserve(session: Session, task: Task) -> None:
    """Take the task's price from the balance, or refuse with 402 if it is short."""
    if task.price_cents == 0:
        return
    balance = session.execute(
        update(Account)
        .where(Account.id == task.account_id, Account.balance_cents >= task.price_cents)
        .values(balance_cents=Account.balance_cents - task.price_cents)
        .returning(Account.balance_cents)
    ).scalar_one_or_none()
    if balance is None:
        available = session.execute(
            select(Account.balance_cents).where(Account.id == task.account_id)
        ).scalar()
        raise InsufficientCredits(
            f"this task costs {task.price_cents} credits (cents) and the balance is {available or 0}"
        )
    session.add(
        LedgerEntry(
            account_id=task.account_id,
            task_id=task.id,
            kind=RESERVE,
            amount_cents=-task.price_cents,
            balance_after_cents=balance,
            note=f"{task.params.get('num_images', 1)} image(s) on {task.model_id}",
        )
    )


def _has_entry(session: Session, task_id: str, kind: str) -> bool:
    return (
        session.execute(
            select(LedgerEntry.id).where(LedgerEntry.task_id == task_id, LedgerEntry.kind == kind)
        ).first()
        is not None
    )


def settle(session: Session, task: Task) -> None:
    """Make the reservation final. Recorded as a zero-amount entry so the ledger shows the outcome."""
    if task.price_cents == 0 or _has_entry(session, task.id, SETTLE) or _has_entry(session, task.id, REFUND):
        return
    balance = session.execute(select(Account.balance_cents).where(Account.id == task.account_id)).scalar_one()
    session.add(
        LedgerEntry(
            account_id=task.account_id,
            task_id=task.id,
            kind=SETTLE,
            amount_cents=0,
            balance_after_cents=balance,
            note=f"charged {task.price_cents}",
        )
    )


def refund(session: Session, task: Task, reason: str) -> None:
    """Give the reservation back. Does nothing if it was already refunded or settled."""
    if task.price_cents == 0 or _has_entry(session, task.id, REFUND) or _has_entry(session, task.id, SETTLE):
        return
    if not _has_entry(session, task.id, RESERVE):
        return
    _append(session, task.account_id, REFUND, task.price_cents, task_id=task.id, note=reason)


@dataclass(frozen=True)
class BalanceSummary:
    balance_cents: int
    paid_balance_cents: int
    bonus_balance_cents: int
    spent_cents_today: int
    spent_cents_total: int
    reserved_cents: int


def summarize(session: Session, account_id: int) -> BalanceSummary:
    account = session.get(Account, account_id)
    if account is None:
        raise NotFound(f"account {account_id} does not exist")
    by_kind = dict(
        session.execute(
            select(LedgerEntry.kind, func.coalesce(func.sum(LedgerEntry.amount_cents), 0))
            .where(LedgerEntry.account_id == account_id)
            .group_by(LedgerEntry.kind)
        ).all()
    )
    granted = int(by_kind.get(GRANT_PAID, 0)) + int(by_kind.get(GRANT_BONUS, 0))
    bonus_granted = max(0, int(by_kind.get(GRANT_BONUS, 0)))
    # Bonus credits are spent first: whatever has left the account counts against them before paid ones.
    used = max(0, granted - account.balance_cents)
    bonus_left = min(account.balance_cents, max(0, bonus_granted - used))
    start_of_day = datetime.combine(datetime.now(UTC).date(), time.min, tzinfo=UTC)
    completed = select(func.coalesce(func.sum(Task.price_cents), 0)).where(
        Task.account_id == account_id, Task.status == "completed"
    )
    reserved = select(func.coalesce(func.sum(Task.price_cents), 0)).where(
        Task.account_id == account_id, Task.status.in_(("pending", "processing"))
    )
    # Chat usage is charged outright (ledger entries of kind "chat", negative amounts).
    chat = select(func.coalesce(-func.sum(LedgerEntry.amount_cents), 0)).where(
        LedgerEntry.account_id == account_id, LedgerEntry.kind == CHAT
    )
    return BalanceSummary(
        balance_cents=account.balance_cents,
        paid_balance_cents=account.balance_cents - bonus_left,
        bonus_balance_cents=bonus_left,
        spent_cents_today=int(
            session.execute(completed.where(Task.completed_at >= start_of_day)).scalar_one()
        )
        + int(session.execute(chat.where(LedgerEntry.created_at >= start_of_day)).scalar_one()),
        spent_cents_total=int(session.execute(completed).scalar_one())
        + int(session.execute(chat).scalar_one()),
        reserved_cents=int(session.execute(reserved).scalar_one()),
    )


def ledger_sum(session: Session, account_id: int) -> int:
    return int(
        session.execute(
            select(func.coalesce(func.sum(LedgerEntry.amount_cents), 0)).where(
                LedgerEntry.account_id == account_id
            )
        ).scalar_one()
    )
