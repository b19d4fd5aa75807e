"""The caller's account and the price list, in the shapes the official SDK reads."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from datetime import UTC, datetime

from fastapi import APIRouter, Header, Response
from fastapi.responses import JSONResponse

from zimage_server import billing
from zimage_server.api.deps import CurrentPrincipal, State
from zimage_server.api.errors import ERROR_RESPONSES
from zimage_server.catalog import CATALOG, SERVICE, TEXT_TO_IMAGE, CatalogModel, lookup_model
from zimage_server.config import Settings
from zimage_server.db.models import Account
from zimage_server.errors import NotFound, ValidationFailed
from zimage_server.schemas import (
    AccountRecord,
    BalanceOut,
    MeOut,
    PriceQuote,
    PriceQuoteOut,
    PriceQuoteRequest,
    PriceSchedule,
    PriceScheduleList,
)

router = APIRouter(tags=["Account and pricing"])

# Prices change only with the settings, i.e. with a restart: this is when the current list took effect.
_PRICES_AS_OF = datetime.now(UTC).replace(microsecond=0).isoformat()


@router.get("/api/v1/me", response_model=MeOut, responses=ERROR_RESPONSES)
def me(state: State, principal: CurrentPrincipal) -> MeOut:
    with state.db.session() as session:
        account = session.get(Account, principal.account_id)
        if account is None:
            raise NotFound("the account of this key no longer exists")
        return MeOut(
            id=account.id,
            name=account.name,
            email=account.email,
            account=AccountRecord(id=account.id, name=account.name),
        )


@router.get("/api/v1/me/balance", response_model=BalanceOut, responses=ERROR_RESPONSES)
def balance(state: State, principal: CurrentPrincipal) -> BalanceOut:
    with state.db.session() as session:
        summary = billing.summarize(session, principal.account_id)
    return BalanceOut(**dataclasses.asdict(summary))


def _schedule(settings: Settings, model: CatalogModel, name: str) -> PriceSchedule:
    return PriceSchedule(
        service=SERVICE,
        action=TEXT_TO_IMAGE,
        model=name,
        pricing_status="active",
        catalog_status="available",
        currency="USD",
        billing_unit="image",
        billing_strategy="per_image",
        unit_price_cents=billing.task_price_cents(settings.price_cents_per_image, model, 1),
    )


@router.get(
    "/api/v1/price_schedules",
    response_model=PriceScheduleList,
    responses={304: {"description": "The list matches the `If-None-Match` ETag"}},
)
def price_schedules(
    state: State,
    service: str | None = None,
    action: str | None = None,
    model: str | None = None,
    if_none_match: str | None = Header(default=None),
) -> Response:
    """Public: what each model costs. Answers 304 when the client's ETag is current."""
    schedules = [
        _schedule(state.settings, entry, name)
        for entry in CATALOG
        for name in (*entry.aliases, entry.id)
        if (service in (None, SERVICE)) and (action in (None, TEXT_TO_IMAGE)) and (model in (None, name))
    ]
    body = PriceScheduleList(as_of=_PRICES_AS_OF, price_schedules=schedules).model_dump(mode="json")
    etag = '"' + hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:32] + '"'
    if if_none_match is not None and etag in [tag.strip() for tag in if_none_match.split(",")]:
        return Response(status_code=304, headers={"ETag": etag})
    return JSONResponse(body, headers={"ETag": etag, "Cache-Control": "no-cache"})


@router.post("/api/v1/price_quotes", response_model=PriceQuoteOut, responses=ERROR_RESPONSES)
def price_quote(request: PriceQuoteRequest, state: State) -> PriceQuoteOut:
    """What a task with these parameters would reserve. Public, like the price list."""
    if request.service != SERVICE or request.action != TEXT_TO_IMAGE:
        raise NotFound(
            f"no price for {request.service}/{request.action}: this server offers {SERVICE}/{TEXT_TO_IMAGE}",
            code="price_schedule_not_found",
        )
    name = request.model or "z-image"
    model = lookup_model(name)
    if model is None:
        raise ValidationFailed(f"unknown model {name!r}", param="model")
    num_images = (request.params or {}).get("num_images", 1)
    if type(num_images) is not int or not 1 <= num_images <= state.settings.max_images_per_task:
        raise ValidationFailed(
            f"params.num_images must be an integer between 1 and {state.settings.max_images_per_task}",
            param="params.num_images",
        )
    return PriceQuoteOut(
        price_quote=PriceQuote(
            service=SERVICE,
            action=TEXT_TO_IMAGE,
            model=name,
            pricing_status="active",
            currency="USD",
            reservation_amount_cents=billing.task_price_cents(
                state.settings.price_cents_per_image, model, num_images
            ),
            estimate_basis="per_image",
            as_of=_PRICES_AS_OF,
        )
    )
