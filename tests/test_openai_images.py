"""OpenAI's Images API, driven by the official `openai` package against a live server."""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from PIL import Image
from sqlalchemy import select

from tests.conftest import LiveServer
from zimage_server import accounts, billing
from zimage_server.db.models import Account, Task

SMALL: dict[str, Any] = {"size": "256x256", "extra_body": {"num_inference_steps": 2}}


def openai_client(server: LiveServer, key: str, **options: Any) -> openai.OpenAI:
    return openai.OpenAI(api_key=key, base_url=server.base_url + "/v1", **options)


def account_state(server: LiveServer, key: str) -> tuple[int, int, list[Task]]:
    """The account's balance, its ledger sum and its tasks, read from the database."""
    db = server.database()
    try:
        with db.session() as session:
            principal = accounts.authenticate(session, key)
            assert principal is not None
            account = session.get(Account, principal.account_id)
            assert account is not None
            owned = list(
                session.execute(select(Task).where(Task.account_id == principal.account_id)).scalars()
            )
            return account.balance_cents, billing.ledger_sum(session, principal.account_id), owned
    finally:
        db.dispose()


def test_url_response_is_a_billed_task_with_a_fetchable_png(server: LiveServer, api_key: str) -> None:
    client = openai_client(server, api_key)
    result = client.images.generate(
        model="z-image",
        prompt="a red bicycle",
        size="256x256",
        extra_body={"num_inference_steps": 2, "seed": 7},
    )

    assert len(result.data) == 1
    assert result.data[0].b64_json is None
    url = result.data[0].url
    assert url is not None
    assert url.startswith(server.base_url + "/files/")
    image = Image.open(io.BytesIO(httpx.get(url, timeout=30).content))
    assert (image.format, image.size) == ("PNG", (256, 256))
    assert abs(result.created - time.time()) < 120
    extras = result.model_extra or {}
    assert extras["seed"] == 7

    balance, ledger, owned = account_state(server, api_key)
    assert balance == 99 == ledger
    assert [(task.surface, task.status, task.id) for task in owned] == [
        ("openai", "completed", extras["task_id"])
    ]
    # The task behind the answer is an ordinary task: readable on the generic surface.
    task = httpx.get(
        f"{server.base_url}/v1/tasks/{extras['task_id']}", headers={"Authorization": f"Bearer {api_key}"}
    ).json()
    assert task["status"] == "completed"
    assert task["usage"]["cost_cents"] == 1


def test_b64_json_with_two_images_in_jpeg(server: LiveServer, api_key: str) -> None:
    client = openai_client(server, api_key)
    result = client.images.generate(
        prompt="两只猫", n=2, response_format="b64_json", output_format="jpeg", **SMALL
    )

    assert len(result.data) == 2
    images = [Image.open(io.BytesIO(base64.b64decode(item.b64_json or ""))) for item in result.data]
    assert [(image.format, image.size) for image in images] == [("JPEG", (256, 256))] * 2
    assert all(item.url is None for item in result.data)
    assert result.output_format == "jpeg"
    assert result.size == "256x256"
    balance, ledger, owned = account_state(server, api_key)
    assert balance == 98 == ledger
    assert len(owned) == 1
    assert owned[0].params["num_images"] == 2


def test_defaults_are_what_the_official_client_sends(server: LiveServer, api_key: str) -> None:
    """Only `prompt`: the package adds no field of its own (anything unknown would be a 422), and the
    server fills in z-image, one 1024x1024 PNG and a URL."""
    client = openai_client(server, api_key)
    result = client.images.generate(prompt="a quiet harbour", extra_body={"num_inference_steps": 1})
    assert len(result.data) == 1
    assert result.size == "1024x1024"
    assert result.output_format == "png"
    assert result.data[0].url is not None
    _, _, owned = account_state(server, api_key)
    assert owned[0].requested_model == "z-image"


def test_size_auto_is_1024_square(server: LiveServer, api_key: str) -> None:
    client = openai_client(server, api_key)
    result = client.images.generate(prompt="auto", size="auto", extra_body={"num_inference_steps": 1})
    assert result.size == "1024x1024"


@pytest.mark.parametrize(
    ("options", "param", "code"),
    [
        ({"size": "1000x1000"}, "size", "validation_error"),
        ({"size": "4096x4096"}, "size", "validation_error"),
        ({"size": "big"}, "size", "validation_error"),
        ({"n": 5}, "n", "validation_error"),
        ({"n": 0}, "n", "validation_error"),
        ({"model": "dall-e-3"}, "model", "validation_error"),
        ({"output_format": "gif"}, "output_format", "validation_error"),
        ({"response_format": "base64"}, "response_format", "validation_error"),
        ({"quality": "hd"}, "quality", "unknown_parameter"),
        ({"style": "vivid"}, "style", "unknown_parameter"),
        ({"user": "someone"}, "user", "unknown_parameter"),
        ({"prompt": "x" * 1001}, "prompt", "validation_error"),
        ({"prompt": "   "}, "prompt", "validation_error"),
    ],
)
def test_bad_requests_are_422_errors_in_the_envelope(
    server: LiveServer, api_key: str, options: dict[str, Any], param: str, code: str
) -> None:
    client = openai_client(server, api_key)
    arguments = {"prompt": "a cat", **options}
    with pytest.raises(openai.UnprocessableEntityError) as raised:
        client.images.generate(**arguments)
    error = raised.value.body
    assert isinstance(error, dict)
    assert error["code"] == code
    assert error["param"] == param
    assert error["message"]
    balance, ledger, owned = account_state(server, api_key)
    assert (balance, ledger, owned) == (100, 100, [])


def test_no_credits_is_a_402_and_nothing_is_created(server: LiveServer) -> None:
    key = server.create_key(f"broke-{time.monotonic_ns()}", credits=0)
    client = openai_client(server, key)
    with pytest.raises(openai.APIStatusError) as raised:
        client.images.generate(prompt="a cat", **SMALL)
    assert raised.value.status_code == 402
    assert isinstance(raised.value.body, dict)
    assert raised.value.body["code"] == "insufficient_credits"
    assert account_state(server, key) == (0, 0, [])


def test_bad_key_is_an_authentication_error(server: LiveServer) -> None:
    client = openai_client(server, "zimg_not-a-key")
    with pytest.raises(openai.AuthenticationError):
        client.images.generate(prompt="a cat", **SMALL)


def test_cancelled_task_is_a_server_error_with_the_task_id_and_a_refund(
    server: LiveServer, api_key: str
) -> None:
    """A task that fails while the client waits: the error names the task, the money comes back, and the
    client does not retry (a retry would submit and bill a new task)."""
    client = openai_client(server, api_key, max_retries=2)
    raised: list[BaseException] = []

    def generate() -> None:
        try:
            client.images.generate(prompt="slow", size="2048x2048", extra_body={"num_inference_steps": 50})
        except BaseException as exc:
            raised.append(exc)

    waiter = threading.Thread(target=generate)
    waiter.start()
    headers = {"Authorization": f"Bearer {api_key}"}
    deadline = time.monotonic() + 60
    while not (owned := account_state(server, api_key)[2]):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    cancel = httpx.post(f"{server.base_url}/v1/tasks/{owned[0].id}/cancel", headers=headers, timeout=30)
    assert cancel.status_code == 200, cancel.text
    waiter.join(120)

    assert len(raised) == 1
    error = raised[0]
    assert isinstance(error, openai.InternalServerError)
    assert error.status_code == 500
    assert isinstance(error.body, dict)
    assert error.body["code"] == "cancelled"
    assert error.body["task_id"] == owned[0].id
    assert owned[0].id in error.body["message"]
    balance, ledger, after = account_state(server, api_key)
    assert (balance, ledger) == (100, 100)
    assert [task.status for task in after] == ["failed"]


@pytest.fixture(scope="module")
def impatient_server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[LiveServer]:
    """A server that waits almost no time for a task before answering 504."""
    live = LiveServer(
        data_dir=tmp_path_factory.mktemp("impatient") / "zimage",
        model=tiny_model_dir,
        env={"ZIMAGE_OPENAI_WAIT_SECONDS": "0.001"},
    )
    live.start()
    yield live
    live.stop()


def test_timeout_is_a_504_naming_the_task_which_still_completes(impatient_server: LiveServer) -> None:
    key = impatient_server.create_key("impatient")
    client = openai_client(impatient_server, key, max_retries=3)
    with pytest.raises(openai.APIStatusError) as raised:
        client.images.generate(prompt="patience", size="512x512", extra_body={"num_inference_steps": 20})
    error = raised.value
    assert error.status_code == 504
    assert isinstance(error.body, dict)
    assert error.body["code"] == "task_timeout"
    task_id = error.body["task_id"]
    assert error.response.headers["x-runapi-task-id"] == task_id

    headers = {"Authorization": f"Bearer {key}"}
    deadline = time.monotonic() + 120
    while True:
        task = httpx.get(f"{impatient_server.base_url}/v1/tasks/{task_id}", headers=headers).json()
        if task["status"] == "completed" or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert task["status"] == "completed"
    # The client was told not to retry: exactly one task, charged once.
    balance, ledger, owned = account_state(impatient_server, key)
    assert [t.id for t in owned] == [task_id]
    assert balance == ledger == 99
