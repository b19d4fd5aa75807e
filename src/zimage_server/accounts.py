"""Accounts and API keys. Keys are random secrets shown once; only their SHA-256 is stored."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from zimage_server import billing
from zimage_server.db.models import Account, ApiKey, utcnow
from zimage_server.errors import NotFound

KEY_PREFIX = "zimg_"


def hash_key(key: str) -> str:
    # Keys carry 256 bits of randomness, so a fast hash is enough: there is nothing to brute-force.
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class CreatedKey:
    """The only moment the plain key exists outside the client's hands."""

    key: str
    key_id: int
    account_id: int
    account_name: str


@dataclass(frozen=True)
class Principal:
    """Who is calling: resolved from a bearer key on every private request."""

    account_id: int
    api_key_id: int


def create_account(
    session: Session, name: str, *, email: str = "", credits: int = 0, bonus: bool = False
) -> Account:
    account = Account(name=name, email=email, balance_cents=0)
    session.add(account)
    session.flush()
    if credits:
        billing.grant(session, account.id, credits, bonus=bonus, note="initial credits")
    return account


def create_key(session: Session, account: Account, name: str) -> CreatedKey:
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(account_id=account.id, name=name, prefix=key[: len(KEY_PREFIX) + 6], key_hash=hash_key(key))
    session.add(row)
    session.flush()
    return CreatedKey(key=key, key_id=row.id, account_id=account.id, account_name=account.name)


def authenticate(session: Session, key: str) -> Principal | None:
    row = session.execute(
        select(ApiKey).where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None))
    ).scalar_one_or_none()
    if row is None:
        return None
    now = utcnow()
    # Coarse on purpose: a write on every poll would cost more than the information is worth.
    if row.last_used_at is None or (now - row.last_used_at).total_seconds() > 60:
        row.last_used_at = now
    return Principal(account_id=row.account_id, api_key_id=row.id)


def find_account(session: Session, ref: str) -> Account:
    """An account by numeric id or by exact name."""
    account = session.get(Account, int(ref)) if ref.isdigit() else None
    if account is None:
        account = (
            session.execute(select(Account).where(Account.name == ref).order_by(Account.id)).scalars().first()
        )
    if account is None:
        raise NotFound(f"no account with id or name {ref!r}")
    return account


def list_keys(session: Session) -> list[tuple[ApiKey, Account]]:
    rows = session.execute(
        select(ApiKey, Account).join(Account, Account.id == ApiKey.account_id).order_by(ApiKey.id)
    )
    return [(key, account) for key, account in rows.tuples()]


def revoke_key(session: Session, ref: str) -> ApiKey:
    """Revoke a key by its id or its displayed prefix."""
    query = (
        select(ApiKey).where(ApiKey.id == int(ref))
        if ref.isdigit()
        else select(ApiKey).where(ApiKey.prefix == ref)
    )
    matches = list(session.execute(query).scalars())
    if len(matches) != 1:
        raise NotFound(f"no single key matches {ref!r}" if matches else f"no key matches {ref!r}")
    key = matches[0]
    if key.revoked_at is None:
        key.revoked_at = utcnow()
    return key
