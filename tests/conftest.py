"""Shared fixtures: one tiny model per session, and live servers running as real processes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from zimage_server import accounts
from zimage_server.db.session import Database
from zimage_server.engine.tiny import save_tiny_model
from zimage_server.process import ServerProcess, free_port

__all__ = ["LiveServer", "WebhookReceiver", "free_port", "wait_terminal"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


class LiveServer(ServerProcess):
    """`zimage serve` in its own process, as a user runs it, on a loopback port."""

    def __init__(self, data_dir: Path, model: Path, env: dict[str, str] | None = None) -> None:
        super().__init__(data_dir, model, env=env)

    def database(self) -> Database:
        return Database(f"sqlite:///{self.data_dir / 'zimage.db'}")

    def create_key(self, name: str, credits: int = 100) -> str:
        # Straight into the database: much faster than the CLI, and tests make hundreds of accounts.
        db = self.database()
        try:
            with db.session() as session:
                account = accounts.create_account(
                    session, name, email=f"{name}@example.test", credits=credits
                )
                return accounts.create_key(session, account, name).key
        finally:
            db.dispose()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[LiveServer]:
    live = LiveServer(data_dir=tmp_path_factory.mktemp("data") / "zimage", model=tiny_model_dir)
    live.start()
    yield live
    live.stop()


@pytest.fixture
def api_key(server: LiveServer, request: pytest.FixtureRequest) -> str:
    """A fresh account with 100 cents for each test, so tests cannot see each other's tasks or money."""
    return server.create_key(f"acct-{request.node.name[:40]}-{time.monotonic_ns()}", credits=100)


@pytest.fixture
def client(server: LiveServer, api_key: str) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=server.base_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=30
    ) as http:
        yield http


def wait_terminal(http: httpx.Client, task_id: str, timeout: float = 120.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body: dict[str, object] = http.get(f"/v1/tasks/{task_id}").json()
        if body["status"] in ("completed", "failed"):
            return body
        time.sleep(0.1)
    raise AssertionError(f"task {task_id} not terminal after {timeout}s")


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    at: float


class WebhookReceiver:
    """A real HTTP server on a loopback port that records what it receives and answers as told."""

    def __init__(self) -> None:
        import http.server
        import threading

        self.received: list[Received] = []
        # Each entry answers one request, in order: (status, headers, delay seconds); then 200s.
        self.script: list[tuple[int, dict[str, str], float]] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                receiver.received.append(Received(dict(self.headers.items()), body, time.monotonic()))
                status, headers, delay = receiver.script.pop(0) if receiver.script else (200, {}, 0.0)
                time.sleep(delay)
                try:
                    self.send_response(status)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("content-length", "0")
                    self.end_headers()
                except OSError:
                    pass  # the sender gave up waiting: that is what the delay was for

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hook"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def wait_for(self, count: int, timeout: float = 60.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while len(self.received) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"expected {count} webhook requests, got {len(self.received)}")
            time.sleep(0.05)
        return self.received

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    hook = WebhookReceiver()
    yield hook
    hook.close()


# Settings for servers that deliver webhooks to a receiver on this machine, quickly.
WEBHOOK_TEST_ENV = {
    "ZIMAGE_WEBHOOK_ALLOWED_NETWORKS": '["127.0.0.0/8"]',
    "ZIMAGE_WEBHOOK_BACKOFF_BASE_SECONDS": "0.3",
    "ZIMAGE_WEBHOOK_MAX_ATTEMPTS": "4",
    "ZIMAGE_WEBHOOK_TIMEOUT_SECONDS": "1.5",
}
