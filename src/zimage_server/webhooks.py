"""Webhooks: terminal task events delivered to `callback_url`, signed with the Standard Webhooks scheme.

A delivery is a database row written in the same transaction as the task's terminal state, so no event
is lost to a crash. A dispatcher thread sends due deliveries from a small thread pool: a receiver that
hangs ties up one pool thread for at most the timeout, never the worker or the API.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import random
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from zimage_server import __version__
from zimage_server.config import Settings
from zimage_server.db.models import Account, Task, WebhookAttempt, WebhookDelivery, utcnow
from zimage_server.db.session import Database
from zimage_server.errors import NotFound, ValidationFailed

log = logging.getLogger(__name__)

PENDING = "pending"
SUCCEEDED = "succeeded"
FAILED = "failed"

SECRET_PREFIX = "whsec_"


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()


def account_secret(session: Session, account_id: int, *, rotate: bool = False) -> str:
    """The account's signing secret, created on first use; ``rotate`` replaces it."""
    account = session.get(Account, account_id)
    if account is None:
        raise NotFound(f"account {account_id} does not exist")
    if account.webhook_secret is None or rotate:
        account.webhook_secret = new_secret()
    return account.webhook_secret


# ---------------------------------------------------------------------------------------------- SSRF


def _allowed(address: ipaddress.IPv4Address | ipaddress.IPv6Address, allowed: Iterable[str]) -> bool:
    return any(address in ipaddress.ip_network(network, strict=False) for network in allowed)


def _is_internal(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
    )


def check_target(url: str, settings: Settings) -> None:
    """Refuse callback URLs that point into the server's own network (SSRF), unless the operator allows it.

    Checked when the task is submitted and again before every attempt, since DNS can change in between.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValidationFailed("callback_url must be an absolute http or https URL", param="callback_url")
    if parts.username or parts.password:
        raise ValidationFailed("callback_url must not carry credentials", param="callback_url")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        infos = socket.getaddrinfo(parts.hostname, port, proto=socket.IPPROTO_TCP)
    except (OSError, ValueError, UnicodeError):
        raise ValidationFailed(
            f"callback_url host {parts.hostname!r} does not resolve", param="callback_url"
        ) from None
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if _is_internal(address) and not _allowed(address, settings.webhook_allowed_networks):
            raise ValidationFailed(
                f"callback_url resolves to {address}, a private, loopback or link-local address; "
                "the operator can allow such networks with ZIMAGE_WEBHOOK_ALLOWED_NETWORKS",
                param="callback_url",
            )


# ------------------------------------------------------------------------------------------ outbox


def enqueue(session: Session, task: Task, payload: dict[str, Any]) -> WebhookDelivery | None:
    """Record the task's terminal event for delivery, in the caller's transaction."""
    if not task.callback_url:
        return None
    delivery = WebhookDelivery(
        id=f"msg_{uuid.uuid4().hex}",
        account_id=task.account_id,
        task_id=task.id,
        url=task.callback_url,
        event=f"task.{task.status}",
        payload=payload,
        status=PENDING,
        next_attempt_at=utcnow(),
    )
    session.add(delivery)
    return delivery


def describe(session: Session, delivery: WebhookDelivery) -> dict[str, Any]:
    attempts = session.execute(
        select(WebhookAttempt).where(WebhookAttempt.delivery_id == delivery.id).order_by(WebhookAttempt.id)
    ).scalars()
    return {
        "id": delivery.id,
        "task_id": delivery.task_id,
        "event": delivery.event,
        "url": delivery.url,
        "status": delivery.status,
        "attempts": delivery.attempts,
        "next_attempt_at": delivery.next_attempt_at.isoformat()
        if delivery.next_attempt_at and delivery.status == PENDING
        else None,
        "last_status_code": delivery.last_status_code,
        "last_error": delivery.last_error,
        "created_at": delivery.created_at.isoformat(),
        "delivered_at": delivery.delivered_at.isoformat() if delivery.delivered_at else None,
        "attempt_log": [
            {
                "attempted_at": attempt.attempted_at.isoformat(),
                "status_code": attempt.status_code,
                "error": attempt.error,
                "duration_ms": attempt.duration_ms,
            }
            for attempt in attempts
        ],
    }


def redeliver(session: Session, account_id: int, delivery_id: str) -> WebhookDelivery:
    """Send a delivery again now, with a fresh retry budget; its attempt history is kept."""
    delivery = session.get(WebhookDelivery, delivery_id)
    if delivery is None or delivery.account_id != account_id:
        raise NotFound(f"no webhook delivery with id {delivery_id!r}", code="delivery_not_found")
    delivery.status = PENDING
    delivery.attempts = 0
    delivery.next_attempt_at = utcnow()
    return delivery


# ---------------------------------------------------------------------------------------- delivery


def retry_delay(attempt: int, settings: Settings, retry_after: float | None) -> float:
    """Exponential backoff, jittered between half and all of the step, and never sooner than Retry-After."""
    step = min(
        settings.webhook_backoff_max_seconds, settings.webhook_backoff_base_seconds * 2 ** (attempt - 1)
    )
    delay: float = step * random.uniform(0.5, 1.0)
    if retry_after is not None:
        delay = max(delay, min(retry_after, settings.webhook_backoff_max_seconds))
    return delay


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


class WebhookDispatcher:
    """Sends due deliveries on a thread pool; one slow receiver never holds up the others."""

    def __init__(self, db: Database, settings: Settings) -> None:
        self._db = db
        self._settings = settings
        self._pool = ThreadPoolExecutor(settings.webhook_concurrency, thread_name_prefix="zimage-webhook")
        self._in_flight: set[str] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._client = httpx.Client(
            timeout=settings.webhook_timeout_seconds,
            follow_redirects=False,
            headers={
                "User-Agent": f"zimage-server/{__version__} (webhooks)",
                "Content-Type": "application/json",
            },
        )

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="zimage-webhooks", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, flush_seconds: float = 5.0) -> None:
        """Send what is due for up to ``flush_seconds``, then stop; the rest stays queued for next start."""
        deadline = time.monotonic() + flush_seconds
        while time.monotonic() < deadline and (self._due_ids(1) or self._in_flight):
            self._wake.set()
            time.sleep(0.05)
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _due_ids(self, limit: int) -> list[str]:
        with self._db.session() as session:
            return list(
                session.execute(
                    select(WebhookDelivery.id)
                    .where(WebhookDelivery.status == PENDING, WebhookDelivery.next_attempt_at <= utcnow())
                    .order_by(WebhookDelivery.next_attempt_at)
                    .limit(limit)
                ).scalars()
            )

    def _main(self) -> None:
        while not self._stopping.is_set():
            try:
                self._dispatch_due()
            except Exception:  # the dispatcher must outlive a database hiccup
                log.exception("webhook dispatch round failed")
            self._wake.wait(0.5)
            self._wake.clear()

    def _dispatch_due(self) -> None:
        free = self._settings.webhook_concurrency - len(self._in_flight)
        if free <= 0:
            return
        for delivery_id in self._due_ids(free + len(self._in_flight)):
            with self._lock:
                if delivery_id in self._in_flight:
                    continue
                self._in_flight.add(delivery_id)
            self._pool.submit(self._attempt_guarded, delivery_id)

    def _attempt_guarded(self, delivery_id: str) -> None:
        try:
            self.attempt(delivery_id)
        except Exception:
            log.exception("webhook delivery %s failed unexpectedly", delivery_id)
        finally:
            with self._lock:
                self._in_flight.discard(delivery_id)

    def attempt(self, delivery_id: str) -> None:
        """One attempt: sign, POST, record, and schedule the next try or stop."""
        lease = timedelta(seconds=self._settings.webhook_timeout_seconds + 30)
        with self._db.session() as session:
            # Claim by pushing next_attempt_at past the attempt's lifetime: another process will not pick it.
            claimed = session.execute(
                update(WebhookDelivery)
                .where(
                    WebhookDelivery.id == delivery_id,
                    WebhookDelivery.status == PENDING,
                    WebhookDelivery.next_attempt_at <= utcnow(),
                )
                .values(next_attempt_at=utcnow() + lease, attempts=WebhookDelivery.attempts + 1)
            )
            if not claimed.rowcount:  # type: ignore[attr-defined]
                return
            delivery = session.get(WebhookDelivery, delivery_id)
            assert delivery is not None
            url, payload, attempt_number = delivery.url, delivery.payload, delivery.attempts
            created_at = delivery.created_at
            secret = account_secret(session, delivery.account_id)

        from standardwebhooks import Webhook

        body = _canonical_json(payload)
        sent_at = datetime.now(UTC)
        headers = {
            "webhook-id": delivery_id,
            "webhook-timestamp": str(int(sent_at.timestamp())),
            "webhook-signature": Webhook(secret).sign(delivery_id, sent_at, body),
        }
        status_code: int | None = None
        error: str | None = None
        retry_after: float | None = None
        started = time.monotonic()
        try:
            check_target(url, self._settings)
            response = self._client.post(url, content=body.encode(), headers=headers)
            status_code = response.status_code
            retry_after = parse_retry_after(response.headers.get("retry-after"))
            if not response.is_success:
                error = f"receiver answered {status_code}"
        except ValidationFailed as exc:
            error = exc.message
        except httpx.TimeoutException:
            error = f"timed out after {self._settings.webhook_timeout_seconds:g}s"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        duration_ms = int((time.monotonic() - started) * 1000)

        with self._db.session() as session:
            delivery = session.get(WebhookDelivery, delivery_id)
            assert delivery is not None
            session.add(
                WebhookAttempt(
                    delivery_id=delivery_id, status_code=status_code, error=error, duration_ms=duration_ms
                )
            )
            delivery.last_status_code = status_code
            delivery.last_error = error
            too_old = utcnow() - created_at > timedelta(seconds=self._settings.webhook_max_age_seconds)
            if error is None:
                delivery.status = SUCCEEDED
                delivery.delivered_at = utcnow()
            elif status_code == 410:
                delivery.status = FAILED
                delivery.last_error = "the receiver answered 410 Gone: it wants no more deliveries"
            elif attempt_number >= self._settings.webhook_max_attempts or too_old:
                delivery.status = FAILED
                delivery.last_error = f"gave up after {attempt_number} attempts: {error}"
            else:
                delay = retry_delay(attempt_number, self._settings, retry_after)
                delivery.next_attempt_at = utcnow() + timedelta(seconds=delay)


def _canonical_json(payload: dict[str, Any]) -> str:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
