"""Chat passthrough accounting: what a completion's tokens cost, recorded and charged in one transaction."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from zimage_server import billing
from zimage_server.accounts import Principal
from zimage_server.db.models import Account, ChatUsage
from zimage_server.errors import InsufficientCredits

MICRO = 1_000_000


@dataclass(frozen=True)
class TokenUsage:
    model: str
    prompt_tokens: int
    completion_tokens: int


def usage_from(payload: Any, fallback_model: str) -> TokenUsage | None:
    """The `usage` of a completion (or of a stream's final chunk), if the payload carries one."""
    if not isinstance(payload, dict):
        return None
    usage = payload.get("usage")
    if not isinstance(usage, dict):
        return None
    model = payload.get("model")
    return TokenUsage(
        model=model if isinstance(model, str) and model else fallback_model,
        prompt_tokens=_count(usage.get("prompt_tokens")),
        completion_tokens=_count(usage.get("completion_tokens")),
    )


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def is_priced(prices: dict[str, int]) -> bool:
    return any(price > 0 for price in prices.values())


def check_can_spend(session: Session, account_id: int, prices: dict[str, int]) -> None:
    """Refuse up front: a completion's cost is known only afterwards, so an empty account gets no more."""
    if not is_priced(prices):
        return
    balance = session.execute(select(Account.balance_cents).where(Account.id == account_id)).scalar()
    if balance is None or balance <= 0:
        raise InsufficientCredits(
            f"chat is billed per token and this account's balance is {balance or 0}; add credits first"
        )


def record(session: Session, principal: Principal, usage: TokenUsage, prices: dict[str, int]) -> ChatUsage:
    micro = usage.prompt_tokens * prices.get("prompt", 0) + usage.completion_tokens * prices.get(
        "completion", 0
    )
    before = int(
        session.execute(
            select(func.coalesce(func.sum(ChatUsage.cost_micro_cents), 0)).where(
                ChatUsage.account_id == principal.account_id
            )
        ).scalar_one()
    )
    # Charge the whole cents the running total crossed: over many calls the account pays the exact
    # price rounded down once, rather than a rounding on every call.
    cents = (before + micro) // MICRO - before // MICRO
    row = ChatUsage(
        account_id=principal.account_id,
        api_key_id=principal.api_key_id,
        model=usage.model[:200],
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        cost_micro_cents=micro,
        cost_cents=cents,
    )
    session.add(row)
    billing.charge(
        session,
        principal.account_id,
        cents,
        note=f"chat {usage.model[:100]}: {usage.prompt_tokens} prompt, "
        f"{usage.completion_tokens} completion tokens",
    )
    session.flush()
    return row


_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")


class SseUsageMeter:
    """Passes a chat completion's server-sent events through unchanged while reading its token usage.

    When the server asked the upstream for usage on the client's behalf, the usage-only chunk the client
    did not ask for is taken out again, so the client sees the stream it requested.
    """

    def __init__(self, fallback_model: str, *, hide_usage_chunk: bool) -> None:
        self.usage: TokenUsage | None = None
        self._fallback_model = fallback_model
        self._hide_usage_chunk = hide_usage_chunk
        self._buffer = b""

    def feed(self, chunk: bytes) -> bytes:
        self._buffer += chunk
        out: list[bytes] = []
        while (match := _EVENT_END.search(self._buffer)) is not None:
            event, self._buffer = self._buffer[: match.end()], self._buffer[match.end() :]
            if self._keep(event):
                out.append(event)
        return b"".join(out)

    def flush(self) -> bytes:
        rest, self._buffer = self._buffer, b""
        return rest if rest.strip() and self._keep(rest) else b""

    def _keep(self, event: bytes) -> bool:
        data = b"\n".join(
            line[5:].lstrip(b" ") for line in event.splitlines() if line.startswith(b"data:")
        ).strip()
        if not data or data == b"[DONE]":
            return True
        try:
            payload = json.loads(data)
        except ValueError:
            return True
        usage = usage_from(payload, self._fallback_model)
        if usage is None:
            return True
        self.usage = usage
        return not (self._hide_usage_chunk and not payload.get("choices"))
