"""Completion without polling: `Prefer: wait=N` and the server-sent event stream."""

from __future__ import annotations

import json
import time
from datetime import datetime

import httpx

from tests.conftest import wait_terminal

SMALL = {"size": "256x256", "num_inference_steps": 2}


def test_prefer_wait_on_create_answers_with_the_finished_task(client: httpx.Client) -> None:
    response = client.post(
        "/v1/text_to_image", json={"prompt": "wait", **SMALL}, headers={"Prefer": "wait=30"}
    )
    assert response.status_code == 200
    assert response.json()["status"] == "completed"
    assert response.headers["preference-applied"] == "wait=30"
    assert "retry-after" not in response.headers


def test_prefer_wait_sees_completion_within_100_ms(client: httpx.Client) -> None:
    lags: list[float] = []
    for index in range(5):
        task_id = client.post(
            "/v1/text_to_image", json={"prompt": f"lag {index}", "size": "512x512", "num_inference_steps": 4}
        ).json()["id"]
        body = client.get(f"/v1/tasks/{task_id}", headers={"Prefer": "wait=60"}).json()
        seen = time.time()
        assert body["status"] == "completed"
        lags.append(seen - datetime.fromisoformat(body["completed_at"]).timestamp())
    lags.sort()
    print(f"completion seen after (s): {lags}")
    assert lags[len(lags) // 2] < 0.1


def test_prefer_wait_is_bounded_and_returns_the_task_as_it_is(client: httpx.Client) -> None:
    task_id = client.post(
        "/v1/text_to_image", json={"prompt": "long", "size": "1024x1024", "num_inference_steps": 30}
    ).json()["id"]
    started = time.monotonic()
    body = client.get(f"/v1/tasks/{task_id}", headers={"Prefer": "wait=1"})
    assert 0.9 < time.monotonic() - started < 3
    assert body.json()["status"] in ("pending", "processing")
    assert int(body.headers["retry-after"]) >= 1
    client.post(f"/v1/tasks/{task_id}/cancel")


def test_event_stream_reports_queue_progress_and_completion(client: httpx.Client) -> None:
    blocker = client.post(
        "/v1/text_to_image", json={"prompt": "blocker", "size": "768x768", "num_inference_steps": 6}
    ).json()["id"]
    task_id = client.post(
        "/v1/text_to_image", json={"prompt": "watched", "size": "512x512", "num_inference_steps": 8}
    ).json()["id"]
    events: list[tuple[str, dict[str, object]]] = []
    with client.stream("GET", f"/v1/tasks/{task_id}/events", timeout=120) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        name = ""
        for line in stream.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((name, json.loads(line.removeprefix("data: "))))
    names = [name for name, _ in events]
    assert names[0] == "queued"
    assert events[0][1]["queue_position"] >= 1  # type: ignore[operator]
    assert "progress" in names
    steps = [data["step"] for name, data in events if name == "progress"]
    assert steps == sorted(steps)
    assert names[-1] == "completed"
    assert events[-1][1]["images"][0]["url"].startswith("http")  # type: ignore[index]
    wait_terminal(client, blocker)


def test_event_stream_of_another_accounts_task_is_a_404(server, client: httpx.Client) -> None:  # type: ignore[no-untyped-def]
    task_id = client.post("/v1/text_to_image", json={"prompt": "mine", **SMALL}).json()["id"]
    other = server.create_key("sse-intruder")
    response = httpx.get(
        f"{server.base_url}/v1/tasks/{task_id}/events", headers={"Authorization": f"Bearer {other}"}
    )
    assert response.status_code == 404
    wait_terminal(client, task_id)


def test_the_sdk_sees_completion_within_100_ms(server, api_key: str) -> None:  # type: ignore[no-untyped-def]
    from zimage_server.client import ZImage

    lags: list[float] = []
    with ZImage(base_url=server.base_url, api_key=api_key) as sdk:
        for index in range(5):
            task = sdk.run(f"sdk lag {index}", size="512x512", num_inference_steps=4)
            seen = time.time()
            assert task.status == "completed"
            assert task.completed_at is not None
            lags.append(seen - task.completed_at.timestamp())
    lags.sort()
    print(f"SDK saw completion after (s): {[round(lag, 4) for lag in lags]}")
    assert lags[len(lags) // 2] < 0.1
