"""Chat passthrough: `POST /v1/chat/completions` forwarded to an OpenAI-compatible upstream.

One zimage key then serves an agent's chat and its images. The caller authenticates with its zimage key;
the upstream sees only the server's own upstream key. Token usage is read from the answer (or from the
stream's final chunk, which the server asks for when the client did not) and charged to the account.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse

from zimage_server import chat_usage
from zimage_server.accounts import Principal
from zimage_server.api.deps import CurrentPrincipal, State
from zimage_server.api.errors import ERROR_RESPONSES
from zimage_server.api.state import ServiceState
from zimage_server.config import Settings
from zimage_server.errors import ApiError, BadRequest, ValidationFailed

log = logging.getLogger(__name__)

router = APIRouter(tags=["Chat passthrough"])


class NotConfigured(ApiError):
    status_code = 501
    code = "chat_not_configured"


class BadGateway(ApiError):
    status_code = 502
    code = "upstream_unavailable"


class GatewayTimeout(ApiError):
    status_code = 504
    code = "upstream_timeout"


def _upstream(settings: Settings) -> str:
    if not settings.chat_upstream_url:
        raise NotConfigured(
            "this server has no chat model: set ZIMAGE_CHAT_UPSTREAM_URL to an OpenAI-compatible "
            "base URL (such as http://host:8001/v1) to pass chat completions through"
        )
    return settings.chat_upstream_url.rstrip("/")


def _headers(settings: Settings, accept: str) -> dict[str, str]:
    # The caller's zimage key stops here: the upstream gets the server's own key, or none.
    headers = {"content-type": "application/json", "accept": accept}
    if settings.chat_upstream_api_key:
        headers["authorization"] = f"Bearer {settings.chat_upstream_api_key}"
    return headers


def _timeout(settings: Settings) -> httpx.Timeout:
    return httpx.Timeout(settings.chat_upstream_timeout_seconds, connect=10.0)


def _transport_error(exc: httpx.TransportError) -> ApiError:
    if isinstance(exc, httpx.TimeoutException):
        return GatewayTimeout(f"the chat upstream did not answer in time ({type(exc).__name__})")
    return BadGateway(f"the chat upstream cannot be reached: {type(exc).__name__}: {exc}")


def _upstream_refusal(status: int, content: bytes) -> ApiError:
    """The upstream's error, in our envelope. Its 4xx are the caller's problem and keep their status;
    auth failures and 5xx are the server's (a wrong upstream key, a broken upstream): 502."""
    message, code = f"the chat upstream answered {status}", None
    try:
        error = json.loads(content).get("error")
    except (ValueError, AttributeError):
        error = None
    if isinstance(error, dict):
        message = str(error.get("message") or message)
        code = error.get("code") if isinstance(error.get("code"), str) else None
    elif isinstance(error, str):
        message = error
    if 400 <= status < 500 and status not in (401, 403, 407):
        refusal = ApiError(f"upstream: {message}", code=code or "upstream_rejected")
        refusal.status_code = status
        return refusal
    return BadGateway(f"the chat upstream failed ({status}): {message}", code="upstream_error")


async def _parse_body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body())
    except ValueError:
        raise BadRequest("the request body is not valid JSON", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ValidationFailed("the request body must be a JSON object")
    if "stream" in body and not isinstance(body["stream"], bool | None):
        raise ValidationFailed("stream must be a boolean", param="stream")
    return body


async def _record(state: ServiceState, principal: Principal, usage: chat_usage.TokenUsage) -> None:
    prices = state.settings.chat_price_cents_per_million_tokens

    def write() -> None:
        with state.db.session() as session:
            chat_usage.record(session, principal, usage, prices)

    await anyio.to_thread.run_sync(write)


@router.post(
    "/v1/chat/completions",
    summary="Chat completion, passed through to the configured OpenAI-compatible upstream",
    responses={**ERROR_RESPONSES, 501: {"description": "No chat upstream configured"}},
)
async def chat_completions(request: Request, state: State, principal: CurrentPrincipal) -> Response:
    settings = state.settings
    url = _upstream(settings) + "/chat/completions"
    body = await _parse_body(request)
    prices = settings.chat_price_cents_per_million_tokens

    def check_balance() -> None:
        with state.db.session() as session:
            chat_usage.check_can_spend(session, principal.account_id, prices)

    await anyio.to_thread.run_sync(check_balance)
    requested_model = str(body.get("model") or "")
    if body.get("stream"):
        return await _stream(state, principal, url, body, requested_model)

    async with httpx.AsyncClient(timeout=_timeout(settings)) as client:
        try:
            upstream = await client.post(
                url, content=json.dumps(body).encode(), headers=_headers(settings, "application/json")
            )
        except httpx.TransportError as exc:
            raise _transport_error(exc) from None
    if upstream.status_code >= 400:
        raise _upstream_refusal(upstream.status_code, upstream.content)
    try:
        payload = upstream.json()
    except ValueError:
        raise BadGateway("the chat upstream answered with something that is not JSON") from None
    usage = chat_usage.usage_from(payload, requested_model)
    if usage is None:
        log.warning("chat upstream answered without usage; recording the call with zero tokens")
        usage = chat_usage.TokenUsage(requested_model, 0, 0)
    await _record(state, principal, usage)
    return Response(content=upstream.content, media_type="application/json")


async def _stream(
    state: ServiceState, principal: Principal, url: str, body: dict[str, Any], requested_model: str
) -> Response:
    settings = state.settings
    options = body.get("stream_options")
    options = dict(options) if isinstance(options, dict) else {}
    # Usage is what the account is charged for: ask for it even when the client did not.
    hide_usage = options.get("include_usage") is not True
    options["include_usage"] = True
    body = {**body, "stream_options": options}

    client = httpx.AsyncClient(timeout=_timeout(settings))
    try:
        upstream = await client.send(
            client.build_request(
                "POST",
                url,
                content=json.dumps(body).encode(),
                headers=_headers(settings, "text/event-stream"),
            ),
            stream=True,
        )
    except httpx.TransportError as exc:
        await client.aclose()
        raise _transport_error(exc) from None
    if upstream.status_code >= 400:
        content = await upstream.aread()
        await upstream.aclose()
        await client.aclose()
        raise _upstream_refusal(upstream.status_code, content)

    meter = chat_usage.SseUsageMeter(requested_model, hide_usage_chunk=hide_usage)

    async def relay() -> AsyncIterator[bytes]:
        try:
            async for chunk in upstream.aiter_raw():
                out = meter.feed(chunk)
                if out:
                    yield out
            tail = meter.flush()
            if tail:
                yield tail
        except httpx.TransportError as exc:
            log.warning("chat upstream broke off a stream: %s", exc)
            # The status line is long gone; an error event is what OpenAI clients raise on mid-stream.
            error = {"error": {"code": "upstream_error", "message": f"the chat upstream broke off: {exc}"}}
            yield f"data: {json.dumps(error)}\n\n".encode()
        finally:
            # Shielded: a client that hangs up mid-stream still pays for the tokens the upstream produced.
            with anyio.CancelScope(shield=True):
                await upstream.aclose()
                await client.aclose()
                if meter.usage is not None:
                    await _record(state, principal, meter.usage)
                else:
                    log.warning("chat stream ended without a usage chunk; nothing recorded")

    return StreamingResponse(
        relay(),
        media_type=upstream.headers.get("content-type", "text/event-stream"),
        headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
    )


async def upstream_models(settings: Settings) -> list[dict[str, Any]]:
    """The upstream's model list, for `GET /v1/models`; empty (and logged) when it cannot be read, so
    an unreachable chat model never hides the image models."""
    if not settings.chat_upstream_url:
        return []
    url = settings.chat_upstream_url.rstrip("/") + "/models"
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(10.0)) as client:
            response = await client.get(url, headers=_headers(settings, "application/json"))
        response.raise_for_status()
        data = response.json().get("data")
    except (httpx.HTTPError, ValueError, AttributeError) as exc:
        log.warning("could not list the chat upstream's models: %s", exc)
        return []
    return (
        [model for model in data if isinstance(model, dict) and isinstance(model.get("id"), str)]
        if isinstance(data, list)
        else []
    )
