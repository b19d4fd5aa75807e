"""Webhook deliveries and the account's signing secret."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from sqlalchemy import select

from zimage_server import tasks, webhooks
from zimage_server.api.deps import CurrentPrincipal, State
from zimage_server.api.errors import ERROR_RESPONSES
from zimage_server.db.models import WebhookDelivery

router = APIRouter(tags=["Webhooks"], responses=ERROR_RESPONSES)


@router.get("/api/v1/webhook_deliveries", summary="Deliveries of a task's webhook, with every attempt")
def list_deliveries(
    state: State, principal: CurrentPrincipal, task_id: str | None = None, limit: int = 50
) -> dict[str, Any]:
    with state.db.session() as session:
        query = select(WebhookDelivery).where(WebhookDelivery.account_id == principal.account_id)
        if task_id is not None:
            tasks.get_owned(session, principal, task_id)
            query = query.where(WebhookDelivery.task_id == task_id)
        rows = session.execute(
            query.order_by(WebhookDelivery.created_at.desc()).limit(max(1, min(limit, 200)))
        ).scalars()
        return {"object": "list", "data": [webhooks.describe(session, row) for row in rows]}


@router.post("/api/v1/webhook_deliveries/{delivery_id}/redeliver", summary="Send a delivery again now")
def redeliver(delivery_id: str, state: State, principal: CurrentPrincipal) -> dict[str, Any]:
    with state.db.session() as session:
        delivery = webhooks.redeliver(session, principal.account_id, delivery_id)
        described = webhooks.describe(session, delivery)
    state.webhooks.wake()
    return described


@router.get("/api/v1/webhook_secret", summary="The secret that signs this account's webhooks")
def get_secret(state: State, principal: CurrentPrincipal) -> dict[str, str]:
    with state.db.session() as session:
        return {"secret": webhooks.account_secret(session, principal.account_id)}


@router.post("/api/v1/webhook_secret/rotate", summary="Replace the webhook signing secret")
def rotate_secret(state: State, principal: CurrentPrincipal) -> dict[str, str]:
    with state.db.session() as session:
        return {"secret": webhooks.account_secret(session, principal.account_id, rotate=True)}
