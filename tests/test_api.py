"""The HTTP API end to end, through a live `zimage serve` process, with the official SDK and plain HTTP."""

from __future__ import annotations

import io
import time
from typing import Any

import httpx
import pytest
from PIL import Image
from runapi.core import (
    AuthenticationError,
    InsufficientCreditsError,
    NotFoundError,
    ValidationError,
)
from runapi.z_image import ZImageClient

from tests.conftest import LiveServer, wait_terminal

SMALL = {"size": "256x256", "num_inference_steps": 2}


def sdk(server: LiveServer, key: str) -> ZImageClient:
    return ZImageClient(api_key=key, base_url=server.base_url)


def download(url: str) -> Image.Image:
    response = httpx.get(url, timeout=30)
    assert response.status_code == 200, response.text
    return Image.open(io.BytesIO(response.content))


def test_official_sdk_run_returns_a_16_9_png(server: LiveServer, api_key: str) -> None:
    client = sdk(server, api_key)
    task = client.text_to_image.run(model="z-image", prompt="一只猫", aspect_ratio="16:9")
    assert task.status == "completed"
    image = download(task.images[0].url)
    assert image.format == "PNG"
    assert image.size == (1280, 720)
    assert task.usage.cost == pytest.approx(0.01)
    assert task.usage.generated_images == 1


def test_official_sdk_create_get_and_account(server: LiveServer, api_key: str) -> None:
    client = sdk(server, api_key)
    created = client.text_to_image.create(model="z-image", prompt="a lighthouse at dusk", aspect_ratio="1:1")
    assert created.status in ("pending", "processing")
    fetched = client.text_to_image.get(created.id)
    assert fetched.id == created.id
    deadline = time.monotonic() + 120
    while fetched.status not in ("completed", "failed") and time.monotonic() < deadline:
        time.sleep(0.2)
        fetched = client.text_to_image.get(created.id)
    assert fetched.status == "completed"
    assert download(fetched.images[0].url).size == (1024, 1024)

    info = client.account.info()
    assert info.account.id == info.id
    assert info.email.endswith("@example.test")
    balance = client.account.balance()
    assert balance.balance_cents == 99
    assert balance.spent_cents_total == balance.spent_cents_today == 1

    schedules = client.pricing.list_schedules(service="z_image", action="text_to_image", model="z-image")
    assert [(s.model, s.unit_price_cents) for s in schedules.price_schedules] == [("z-image", 1)]
    quote = client.pricing.create_quote("z_image", "text_to_image", model="z-image", params={"num_images": 3})
    assert quote.price_quote.reservation_amount_cents == 3


def test_price_list_answers_304_to_its_etag(server: LiveServer) -> None:
    first = httpx.get(f"{server.base_url}/api/v1/price_schedules")
    assert first.status_code == 200
    assert first.headers["etag"]
    again = httpx.get(
        f"{server.base_url}/api/v1/price_schedules", headers={"If-None-Match": first.headers["etag"]}
    )
    assert again.status_code == 304
    assert httpx.get(f"{server.base_url}/api/v1/price_schedules?model=nope").json()["price_schedules"] == []


def test_seed_shape_and_one_store_behind_both_surfaces(client: httpx.Client) -> None:
    response = client.post(
        "/v1/text_to_image", json={"model": "z-image", "prompt": "a cat", "size": "512x256"}
    )
    assert response.status_code == 200
    body = response.json()
    assert body["task_id"] == body["id"]
    assert body["status"] == "pending"
    assert body["model"] == "z-image"
    assert response.headers["x-runapi-task-id"] == body["id"]
    done = wait_terminal(client, body["id"])
    assert done["status"] == "completed"
    same = client.get(f"/api/v1/z_image/text_to_image/{body['id']}").json()
    assert same["images"] == done["images"]
    assert same["output"]["images"] == [same["images"][0]["url"]]
    assert download(same["images"][0]["url"]).size == (512, 256)


def test_pending_tasks_carry_retry_after_and_queue_position(client: httpx.Client) -> None:
    first = client.post(
        "/v1/text_to_image", json={"prompt": "a", "size": "512x512", "num_inference_steps": 8}
    )
    second = client.post("/v1/text_to_image", json={"prompt": "b", **SMALL})
    assert second.json()["status"] == "pending"
    assert int(second.headers["retry-after"]) >= 1
    assert second.json()["queue_position"] >= 1
    seen_processing = False
    while True:
        current = client.get(f"/v1/tasks/{first.json()['id']}")
        if current.json()["status"] != "processing":
            if current.json()["status"] in ("completed", "failed"):
                break
        else:
            seen_processing = True
            assert int(current.headers["retry-after"]) >= 1
        time.sleep(0.05)
    assert "retry-after" not in current.headers
    wait_terminal(client, second.json()["id"])
    assert seen_processing


def test_same_seed_same_image_and_seed_is_returned(client: httpx.Client) -> None:
    bodies = [
        client.post("/v1/text_to_image", json={"prompt": "seeded", "seed": 42, **SMALL}).json()
        for _ in range(2)
    ]
    results = [wait_terminal(client, body["id"]) for body in bodies]
    assert [result["seed"] for result in results] == [42, 42]
    images = [httpx.get(result["images"][0]["url"]).content for result in results]  # type: ignore[index]
    assert images[0] == images[1]
    unseeded = wait_terminal(
        client, client.post("/v1/text_to_image", json={"prompt": "x", **SMALL}).json()["id"]
    )
    assert isinstance(unseeded["seed"], int)


@pytest.mark.parametrize("output_format", ["jpeg", "webp"])
def test_output_formats(client: httpx.Client, output_format: str) -> None:
    task = client.post(
        "/v1/text_to_image", json={"prompt": "x", "output_format": output_format, "num_images": 2, **SMALL}
    )
    done = wait_terminal(client, task.json()["id"])
    assert len(done["images"]) == 2  # type: ignore[arg-type]
    assert done["usage"] == {"cost": 0.02, "cost_cents": 2, "currency": "USD", "generated_images": 2}
    for image in done["images"]:  # type: ignore[attr-defined]
        assert download(image["url"]).format == output_format.upper()


def test_every_response_carries_a_request_id(server: LiveServer, client: httpx.Client) -> None:
    assert client.get("/v1/tasks/tsk_missing").headers["x-request-id"].startswith("req_")
    assert httpx.get(f"{server.base_url}/healthz").headers["x-request-id"]
    echoed = httpx.get(f"{server.base_url}/healthz", headers={"x-request-id": "trace-123"})
    assert echoed.headers["x-request-id"] == "trace-123"
    assert httpx.post(f"{server.base_url}/v1/text_to_image", json={}).headers["x-request-id"]


def test_auth_failures(server: LiveServer, api_key: str) -> None:
    url = f"{server.base_url}/api/v1/z_image/text_to_image"
    body = {"prompt": "x", **SMALL}
    missing = httpx.post(url, json=body)
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "missing_api_key"
    wrong = httpx.post(url, json=body, headers={"Authorization": "Bearer zimg_not-a-key"})
    assert wrong.status_code == 401
    assert wrong.json()["error"]["code"] == "invalid_api_key"
    not_bearer = httpx.get(f"{server.base_url}/api/v1/me", headers={"Authorization": f"Basic {api_key}"})
    assert not_bearer.status_code == 401
    with pytest.raises(AuthenticationError):
        sdk(server, "zimg_wrong").account.balance()


def test_revoked_key_is_refused(server: LiveServer) -> None:
    from zimage_server import accounts

    key = server.create_key("to-revoke")
    assert (
        httpx.get(f"{server.base_url}/api/v1/me", headers={"Authorization": f"Bearer {key}"}).status_code
        == 200
    )
    db = server.database()
    with db.session() as session:
        accounts.revoke_key(session, key[:11])
    db.dispose()
    assert (
        httpx.get(f"{server.base_url}/api/v1/me", headers={"Authorization": f"Bearer {key}"}).status_code
        == 401
    )


def test_another_accounts_task_is_a_404(server: LiveServer, client: httpx.Client) -> None:
    task_id = client.post("/v1/text_to_image", json={"prompt": "mine", **SMALL}).json()["id"]
    other = server.create_key("intruder")
    for path in (f"/v1/tasks/{task_id}", f"/api/v1/z_image/text_to_image/{task_id}"):
        response = httpx.get(server.base_url + path, headers={"Authorization": f"Bearer {other}"})
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "task_not_found"
    with pytest.raises(NotFoundError):
        sdk(server, other).text_to_image.get(task_id)
    wait_terminal(client, task_id)


INVALID_BODIES: list[tuple[dict[str, Any], int, str, str | None]] = [
    ({}, 422, "missing_parameter", "prompt"),
    ({"prompt": ""}, 422, "validation_error", "prompt"),
    ({"prompt": "   "}, 422, "validation_error", "prompt"),
    ({"prompt": "x" * 1001}, 422, "validation_error", "prompt"),
    ({"prompt": 5}, 422, "validation_error", "prompt"),
    ({"prompt": "a\x00b"}, 422, "validation_error", "prompt"),
    ({"prompt": "x", "model": "dall-e-3"}, 422, "validation_error", "model"),
    ({"prompt": "x", "aspect_ratio": "2:1"}, 422, "validation_error", "aspect_ratio"),
    ({"prompt": "x", "size": "1000x1000"}, 422, "validation_error", "size"),
    ({"prompt": "x", "size": "big"}, 422, "validation_error", "size"),
    ({"prompt": "x", "size": "0x512"}, 422, "validation_error", "size"),
    ({"prompt": "x", "size": "4096x4096"}, 422, "validation_error", "size"),
    ({"prompt": "x", "size": "128x128"}, 422, "validation_error", "size"),
    ({"prompt": "x", "size": "512x512", "aspect_ratio": "1:1"}, 422, "validation_error", "size"),
    ({"prompt": "x", "seed": -1}, 422, "validation_error", "seed"),
    ({"prompt": "x", "seed": 2**40}, 422, "validation_error", "seed"),
    ({"prompt": "x", "seed": "7"}, 422, "validation_error", "seed"),
    ({"prompt": "x", "num_images": 0}, 422, "validation_error", "num_images"),
    ({"prompt": "x", "num_images": 5}, 422, "validation_error", "num_images"),
    ({"prompt": "x", "num_inference_steps": 0}, 422, "validation_error", "num_inference_steps"),
    ({"prompt": "x", "num_inference_steps": 51}, 422, "validation_error", "num_inference_steps"),
    ({"prompt": "x", "guidance_scale": -1}, 422, "validation_error", "guidance_scale"),
    ({"prompt": "x", "guidance_scale": 21}, 422, "validation_error", "guidance_scale"),
    ({"prompt": "x", "output_format": "gif"}, 422, "validation_error", "output_format"),
    ({"prompt": "x", "callback_url": "ftp://example.com/hook"}, 422, "validation_error", "callback_url"),
    ({"prompt": "x", "callback_url": "not a url"}, 422, "validation_error", "callback_url"),
    ({"prompt": "x", "enable_safety_checker": True}, 422, "validation_error", "enable_safety_checker"),
    ({"prompt": "x", "style": "anime"}, 422, "unknown_parameter", "style"),
    ({"prompt": "x", "negative_prompt": "n" * 1001}, 422, "validation_error", "negative_prompt"),
]


@pytest.mark.parametrize(("body", "status", "code", "param"), INVALID_BODIES)
def test_validation_errors(
    client: httpx.Client, body: dict[str, Any], status: int, code: str, param: str | None
) -> None:
    for path in ("/api/v1/z_image/text_to_image", "/v1/text_to_image"):
        response = client.post(path, json=body)
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["code"] == code
        assert error.get("param") == param
        assert error["message"]
    # Nothing was reserved for a refused request.
    assert client.get("/api/v1/me/balance").json()["balance_cents"] == 100


def test_malformed_bodies(client: httpx.Client, server: LiveServer) -> None:
    broken = client.post(
        "/v1/text_to_image", content=b'{"prompt": ', headers={"Content-Type": "application/json"}
    )
    assert broken.status_code == 400
    assert broken.json()["error"]["code"] == "invalid_json"
    not_object = client.post("/v1/text_to_image", json=["prompt"])
    assert not_object.status_code == 422
    assert not_object.json()["error"]["code"] == "validation_error"
    with pytest.raises(ValidationError):
        sdk(server, client.headers["Authorization"].split()[1]).text_to_image.create(
            prompt="x", aspect_ratio="7:3"
        )


def test_safety_checker_false_is_accepted(client: httpx.Client) -> None:
    response = client.post("/v1/text_to_image", json={"prompt": "x", "enable_safety_checker": False, **SMALL})
    assert response.status_code == 200
    wait_terminal(client, response.json()["id"])


def test_insufficient_credits_is_a_402_and_creates_nothing(server: LiveServer) -> None:
    key = server.create_key("broke", credits=1)
    headers = {"Authorization": f"Bearer {key}"}
    response = httpx.post(
        f"{server.base_url}/v1/text_to_image", json={"prompt": "x", "num_images": 2, **SMALL}, headers=headers
    )
    assert response.status_code == 402
    assert response.json()["error"]["code"] == "insufficient_credits"
    with pytest.raises(InsufficientCreditsError):
        sdk(server, key).text_to_image.create(prompt="x", num_images=2, **SMALL)
    assert httpx.get(f"{server.base_url}/api/v1/me/balance", headers=headers).json()["balance_cents"] == 1


def test_signed_urls_refuse_tampering_and_expiry(server: LiveServer, client: httpx.Client) -> None:
    from zimage_server.storage import ImageStore

    done = wait_terminal(client, client.post("/v1/text_to_image", json={"prompt": "x", **SMALL}).json()["id"])
    url = httpx.URL(done["images"][0]["url"])  # type: ignore[index]
    task_id = str(done["id"])
    assert httpx.get(url).status_code == 200
    forged = url.copy_set_param("signature", "0" * 64)
    assert httpx.get(forged).status_code == 403
    assert httpx.get(forged).json()["error"]["code"] == "invalid_signature"
    longer = url.copy_set_param("expires", str(int(url.params["expires"]) + 1))
    assert httpx.get(longer).status_code == 403
    other_file = httpx.URL(str(url).replace("/0.png", "/1.png"))
    assert httpx.get(other_file).status_code == 403
    assert httpx.get(url.copy_remove_param("signature")).status_code in (403, 404)
    assert (
        httpx.get(f"{server.base_url}/files/{task_id}/..%2Fzimage.db?expires=1&signature=x").status_code
        == 404
    )
    # A correctly signed URL whose time is up: signed with the server's own key, expiry in the past.
    store = ImageStore(
        server.data_dir / "images", (server.data_dir / "url-signing.key").read_text().strip().encode()
    )
    expired = httpx.get(server.base_url + store.signed_path(task_id, "0.png", int(time.time()) - 1))
    assert expired.status_code == 410
    assert expired.json()["error"]["code"] == "url_expired"


def test_health_readiness_and_models(server: LiveServer) -> None:
    assert httpx.get(f"{server.base_url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{server.base_url}/readyz")
    assert ready.status_code == 200
    assert ready.json()["model"]["random_weights"] is True
    models = httpx.get(f"{server.base_url}/v1/models").json()
    assert {card["id"] for card in models["data"]} == {"z-image", "z-image-turbo"}
    weights = models["data"][0]["served_weights"]
    assert weights["random_weights"] is True
    assert "noise" in weights["warning"]
    assert weights["source"] == str(server.model)


def test_unknown_route_and_method_use_the_envelope(server: LiveServer, client: httpx.Client) -> None:
    missing = httpx.get(f"{server.base_url}/nope")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"
    wrong_method = client.delete("/v1/text_to_image")
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"]["code"] == "method_not_allowed"


@pytest.mark.parametrize(
    "prompt",
    [
        "猫🐈‍⬛ with emoji and ZWJ sequences 👩‍👩‍👧",
        "مرحبا بالعالم right-to-left \u202e override",
        "e\u0301\u0301\u0301 combining marks",
        "\ufeffbyte order mark and \u200b zero width",
        "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 outside the BMP",
    ],
)
def test_unicode_prompts_round_trip(client: httpx.Client, prompt: str) -> None:
    response = client.post("/v1/text_to_image", json={"prompt": prompt, **SMALL})
    assert response.status_code == 200, response.text
    assert client.get(f"/v1/tasks/{response.json()['id']}").json()["input"]["prompt"] == prompt


@pytest.mark.parametrize(
    "raw",
    [
        b'{"prompt": "\\ud800 lone surrogate"}',
        b'{"prompt": "x", "seed": 1e400}',
        b'{"prompt": "x", "seed": 100000000000000000000000000000000000000}',
        b'{"prompt": "x", "num_images": 1.5}',
        b'{"prompt": "x", "guidance_scale": NaN}',
        b'{"prompt": "x", "guidance_scale": "Infinity"}',
        b'{"prompt": "x", "size": "16777216x16777216"}',
        b'{"prompt": "x", "size": "99999999999999999999x16"}',
        b'{"prompt": ["x"]}',
        b'{"prompt": null}',
        b"\xff\xfe not utf-8",
        b"",
    ],
)
def test_hostile_bodies_get_a_clean_4xx(client: httpx.Client, raw: bytes) -> None:
    response = client.post("/v1/text_to_image", content=raw, headers={"Content-Type": "application/json"})
    assert 400 <= response.status_code < 500, response.text
    assert response.json()["error"]["code"]
    assert client.get("/api/v1/me/balance").json()["balance_cents"] == 100
