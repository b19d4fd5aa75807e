"""Chat passthrough: the official `openai` package → a live zimage server → a real upstream HTTP server."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy import select

from tests.conftest import LiveServer, free_port
from zimage_server import accounts, billing
from zimage_server.db.models import Account, ChatUsage, LedgerEntry

UPSTREAM_KEY = "upstream-secret"
PROMPT_TOKENS, COMPLETION_TOKENS = 11, 7
# Cents per million tokens: 11 prompt tokens cost 11 cents and 7 completion tokens 14, 25 in all.
PRICES = {"prompt": 1_000_000, "completion": 2_000_000}
CALL_CENTS = 25


@dataclass
class Upstream:
    """A small OpenAI-compatible chat server on a loopback port, recording what reaches it."""

    port: int = field(default_factory=free_port)
    received: list[tuple[dict[str, str], dict[str, Any]]] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def app(self) -> FastAPI:
        app = FastAPI()
        usage = {
            "prompt_tokens": PROMPT_TOKENS,
            "completion_tokens": COMPLETION_TOKENS,
            "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS,
        }

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            body = {
                "id": "chatcmpl-1",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": "upstream-llm",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                "usage": None,
            }
            return f"data: {json.dumps(body)}\n\n".encode()

        @app.get("/v1/models")
        async def models(request: Request) -> JSONResponse:
            if request.headers.get("authorization") != f"Bearer {UPSTREAM_KEY}":
                return JSONResponse({"error": {"message": "bad key"}}, status_code=401)
            return JSONResponse(
                {"object": "list", "data": [{"id": "upstream-llm", "object": "model", "owned_by": "lab"}]}
            )

        @app.post("/v1/chat/completions", response_model=None)
        async def completions(request: Request) -> JSONResponse | StreamingResponse:
            body = await request.json()
            self.received.append((dict(request.headers), body))
            if request.headers.get("authorization") != f"Bearer {UPSTREAM_KEY}":
                return JSONResponse({"error": {"message": "bad key"}}, status_code=401)
            if body.get("model") == "missing-model":
                return JSONResponse(
                    {"error": {"message": "model 'missing-model' does not exist", "code": "model_not_found"}},
                    status_code=404,
                )
            text = " ".join(message["content"] for message in body["messages"]).upper()
            if not body.get("stream"):
                return JSONResponse(
                    {
                        "id": "chatcmpl-1",
                        "object": "chat.completion",
                        "created": 1,
                        "model": "upstream-llm",
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": text},
                                "finish_reason": "stop",
                            }
                        ],
                        "usage": usage,
                    }
                )
            include_usage = (body.get("stream_options") or {}).get("include_usage")

            async def events() -> AsyncIterator[bytes]:
                yield chunk({"role": "assistant", "content": ""})
                for word in text.split(" "):
                    yield chunk({"content": word + " "})
                yield chunk({}, finish="stop")
                if include_usage:
                    final = {
                        "id": "chatcmpl-1",
                        "object": "chat.completion.chunk",
                        "created": 1,
                        "model": "upstream-llm",
                        "choices": [],
                        "usage": usage,
                    }
                    yield f"data: {json.dumps(final)}\n\n".encode()
                yield b"data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

        return app


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    fake = Upstream()
    server = uvicorn.Server(uvicorn.Config(fake.app(), host="127.0.0.1", port=fake.port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "upstream did not start"
        time.sleep(0.05)
    yield fake
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def chat_server(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, upstream: Upstream
) -> Iterator[LiveServer]:
    live = LiveServer(
        data_dir=tmp_path_factory.mktemp("chat") / "zimage",
        model=tiny_model_dir,
        env={
            "ZIMAGE_CHAT_UPSTREAM_URL": upstream.base_url,
            "ZIMAGE_CHAT_UPSTREAM_API_KEY": UPSTREAM_KEY,
            "ZIMAGE_CHAT_PRICE_CENTS_PER_MILLION_TOKENS": json.dumps(PRICES),
        },
    )
    live.start()
    yield live
    live.stop()


def chat_client(server: LiveServer, key: str) -> openai.OpenAI:
    # No retries: a test must see the first answer, not a retried one.
    return openai.OpenAI(api_key=key, base_url=server.base_url + "/v1", max_retries=0)


@dataclass
class Books:
    balance: int
    ledger: int
    usage: list[tuple[str, int, int, int]]
    chat_entries: list[int]


def books(server: LiveServer, key: str) -> Books:
    db = server.database()
    try:
        with db.session() as session:
            principal = accounts.authenticate(session, key)
            assert principal is not None
            account = session.get(Account, principal.account_id)
            assert account is not None
            rows = session.execute(
                select(ChatUsage).where(ChatUsage.account_id == principal.account_id).order_by(ChatUsage.id)
            ).scalars()
            entries = session.execute(
                select(LedgerEntry.amount_cents).where(
                    LedgerEntry.account_id == principal.account_id, LedgerEntry.kind == "chat"
                )
            ).scalars()
            return Books(
                balance=account.balance_cents,
                ledger=billing.ledger_sum(session, principal.account_id),
                usage=[(r.model, r.prompt_tokens, r.completion_tokens, r.cost_cents) for r in rows],
                chat_entries=list(entries),
            )
    finally:
        db.dispose()


def wait_for_usage(server: LiveServer, key: str, count: int) -> Books:
    # A stream's usage is written as the stream closes, a moment after the client read its last byte.
    deadline = time.monotonic() + 10
    while len((state := books(server, key)).usage) < count:
        assert time.monotonic() < deadline, f"expected {count} usage rows, have {state.usage}"
        time.sleep(0.05)
    return state


def test_non_stream_completion_is_passed_through_and_charged(
    chat_server: LiveServer, upstream: Upstream
) -> None:
    key = chat_server.create_key(f"chat-{time.monotonic_ns()}", credits=100)
    client = chat_client(chat_server, key)
    answer = client.chat.completions.create(
        model="upstream-llm", messages=[{"role": "user", "content": "hello there"}]
    )
    assert answer.choices[0].message.content == "HELLO THERE"
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (PROMPT_TOKENS, COMPLETION_TOKENS)

    headers, body = upstream.received[-1]
    # The upstream sees the server's key, never the caller's zimage key.
    assert headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert key not in json.dumps(headers)
    assert body["messages"] == [{"role": "user", "content": "hello there"}]

    state = books(chat_server, key)
    assert state.usage == [("upstream-llm", PROMPT_TOKENS, COMPLETION_TOKENS, CALL_CENTS)]
    assert state.chat_entries == [-CALL_CENTS]
    assert state.balance == state.ledger == 100 - CALL_CENTS
    balance = httpx.get(
        chat_server.base_url + "/api/v1/me/balance", headers={"Authorization": f"Bearer {key}"}
    ).json()
    assert (balance["balance_cents"], balance["spent_cents_today"], balance["spent_cents_total"]) == (
        100 - CALL_CENTS,
        CALL_CENTS,
        CALL_CENTS,
    )


def test_stream_relays_content_and_charges_from_the_usage_it_asked_for(
    chat_server: LiveServer, upstream: Upstream
) -> None:
    key = chat_server.create_key(f"stream-{time.monotonic_ns()}", credits=100)
    client = chat_client(chat_server, key)
    chunks = list(
        client.chat.completions.create(
            model="upstream-llm", messages=[{"role": "user", "content": "stream me please"}], stream=True
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "STREAM ME PLEASE "
    # The client did not ask for usage, so the usage-only chunk the server requested is not shown to it.
    assert all(chunk.choices for chunk in chunks)
    assert all(chunk.usage is None for chunk in chunks)
    _, body = upstream.received[-1]
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}

    state = wait_for_usage(chat_server, key, 1)
    assert state.usage == [("upstream-llm", PROMPT_TOKENS, COMPLETION_TOKENS, CALL_CENTS)]
    assert state.balance == state.ledger == 100 - CALL_CENTS


def test_stream_with_usage_requested_by_the_client_shows_it(chat_server: LiveServer) -> None:
    key = chat_server.create_key(f"usage-{time.monotonic_ns()}", credits=100)
    client = chat_client(chat_server, key)
    chunks = list(
        client.chat.completions.create(
            model="upstream-llm",
            messages=[{"role": "user", "content": "count"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == COMPLETION_TOKENS
    state = wait_for_usage(chat_server, key, 1)
    assert state.balance == state.ledger == 100 - CALL_CENTS


def test_an_empty_account_is_refused_before_the_upstream_is_called(
    chat_server: LiveServer, upstream: Upstream
) -> None:
    key = chat_server.create_key(f"broke-{time.monotonic_ns()}", credits=0)
    calls = len(upstream.received)
    with pytest.raises(openai.APIStatusError) as raised:
        chat_client(chat_server, key).chat.completions.create(
            model="upstream-llm", messages=[{"role": "user", "content": "hi"}]
        )
    assert raised.value.status_code == 402
    assert isinstance(raised.value.body, dict)
    assert raised.value.body["code"] == "insufficient_credits"
    assert len(upstream.received) == calls
    assert books(chat_server, key).usage == []


def test_usage_may_overdraw_once_then_refuses(chat_server: LiveServer) -> None:
    """Usage is known only afterwards: a call may take the balance below zero, the next one is refused."""
    key = chat_server.create_key(f"overdraw-{time.monotonic_ns()}", credits=10)
    client = chat_client(chat_server, key)
    client.chat.completions.create(model="upstream-llm", messages=[{"role": "user", "content": "a"}])
    state = books(chat_server, key)
    assert state.balance == state.ledger == 10 - CALL_CENTS
    with pytest.raises(openai.APIStatusError) as raised:
        client.chat.completions.create(model="upstream-llm", messages=[{"role": "user", "content": "b"}])
    assert raised.value.status_code == 402


def test_upstream_client_errors_keep_their_status_in_our_envelope(chat_server: LiveServer) -> None:
    key = chat_server.create_key(f"missing-{time.monotonic_ns()}", credits=100)
    with pytest.raises(openai.NotFoundError) as raised:
        chat_client(chat_server, key).chat.completions.create(
            model="missing-model", messages=[{"role": "user", "content": "hi"}]
        )
    assert isinstance(raised.value.body, dict)
    assert raised.value.body["code"] == "model_not_found"
    assert "does not exist" in raised.value.body["message"]
    assert books(chat_server, key).usage == []


def test_bad_bodies_and_keys(chat_server: LiveServer) -> None:
    key = chat_server.create_key(f"bodies-{time.monotonic_ns()}", credits=100)
    url = chat_server.base_url + "/v1/chat/completions"
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    not_json = httpx.post(url, content=b"{nope", headers=headers)
    assert (not_json.status_code, not_json.json()["error"]["code"]) == (400, "invalid_json")
    not_object = httpx.post(url, content=b"[1, 2]", headers=headers)
    assert (not_object.status_code, not_object.json()["error"]["code"]) == (422, "validation_error")
    bad_stream = httpx.post(url, json={"model": "m", "messages": [], "stream": "yes"}, headers=headers)
    assert (bad_stream.status_code, bad_stream.json()["error"]["param"]) == (422, "stream")
    with pytest.raises(openai.AuthenticationError):
        chat_client(chat_server, "zimg_wrong").chat.completions.create(
            model="upstream-llm", messages=[{"role": "user", "content": "hi"}]
        )


def test_models_list_merges_the_upstreams(chat_server: LiveServer) -> None:
    key = chat_server.create_key(f"models-{time.monotonic_ns()}", credits=1)
    ids = [model.id for model in chat_client(chat_server, key).models.list()]
    assert ids == ["z-image", "z-image-turbo", "upstream-llm"]
    assert "/v1/chat/completions" in httpx.get(chat_server.base_url + "/openapi.json").json()["paths"]


def test_without_an_upstream_chat_is_501_and_models_are_ours(server: LiveServer, api_key: str) -> None:
    client = chat_client(server, api_key)
    with pytest.raises(openai.APIStatusError) as raised:
        client.chat.completions.create(model="any", messages=[{"role": "user", "content": "hi"}])
    assert raised.value.status_code == 501
    assert isinstance(raised.value.body, dict)
    assert raised.value.body["code"] == "chat_not_configured"
    assert [model.id for model in client.models.list()] == ["z-image", "z-image-turbo"]
    # A route that can only answer 501 is not advertised.
    assert "/v1/chat/completions" not in httpx.get(server.base_url + "/openapi.json").json()["paths"]


def test_upstream_down_is_a_502_and_images_still_list(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> None:
    live = LiveServer(
        data_dir=tmp_path_factory.mktemp("chat-down") / "zimage",
        model=tiny_model_dir,
        # Nothing listens on a freshly freed port.
        env={"ZIMAGE_CHAT_UPSTREAM_URL": f"http://127.0.0.1:{free_port()}/v1"},
    )
    live.start()
    try:
        key = live.create_key("down", credits=100)
        client = chat_client(live, key)
        for stream in (False, True):
            with pytest.raises(openai.InternalServerError) as raised:
                client.chat.completions.create(
                    model="upstream-llm", messages=[{"role": "user", "content": "hi"}], stream=stream
                )
            assert raised.value.status_code == 502
            assert isinstance(raised.value.body, dict)
            assert raised.value.body["code"] == "upstream_unavailable"
        assert [model.id for model in client.models.list()] == ["z-image", "z-image-turbo"]
        state = books(live, key)
        assert state.usage == []
        assert state.balance == state.ledger == 100
    finally:
        live.stop()
