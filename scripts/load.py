"""Load a running zimage-server: TASKS tasks from CLIENTS concurrent clients; wait for all; print figures.

    .venv/bin/python scripts/load.py --base-url http://127.0.0.1:8000 --api-key zimg_... \\
        --tasks 60 --clients 4
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from typing import Any

import httpx


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--tasks", type=int, default=60)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--size", default="256x256")
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()

    headers = {"Authorization": f"Bearer {args.api_key}"}
    submit_latencies: list[float] = []
    throttled: list[int] = []
    ids: list[str] = []
    lock = threading.Lock()
    counter = iter(range(args.tasks))

    def client_loop() -> None:
        with httpx.Client(base_url=args.base_url, headers=headers) as http:
            for index in counter:
                body = {"prompt": f"load test {index}", "size": args.size, "num_inference_steps": args.steps}
                while True:
                    started = time.perf_counter()
                    response = http.post("/v1/text_to_image", json=body)
                    elapsed = time.perf_counter() - started
                    if response.status_code != 429:
                        break
                    # Rate limited: come back when the server says, as a well-behaved client does.
                    with lock:
                        throttled.append(index)
                    time.sleep(float(response.headers.get("retry-after", "1")))
                response.raise_for_status()
                with lock:
                    submit_latencies.append(elapsed)
                    ids.append(response.json()["id"])

    started = time.perf_counter()
    threads = [threading.Thread(target=client_loop) for _ in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    submitted = time.perf_counter() - started

    results: dict[str, Any] = {}
    with httpx.Client(base_url=args.base_url, headers=headers) as http:
        pending = set(ids)
        while pending:
            for task_id in list(pending):
                body = http.get(f"/v1/tasks/{task_id}").json()
                if body["status"] in ("completed", "failed"):
                    results[task_id] = body
                    pending.discard(task_id)
            time.sleep(0.2)
    finished = time.perf_counter() - started
    completed = sum(1 for body in results.values() if body["status"] == "completed")
    print(f"tasks {len(ids)} ({args.size}, {args.steps} steps) from {args.clients} clients")
    print(
        f"submit latency ms: p50 {statistics.median(submit_latencies) * 1000:.1f}  "
        f"p90 {percentile(submit_latencies, 0.9) * 1000:.1f}  max {max(submit_latencies) * 1000:.1f}"
    )
    print(
        f"all submitted in {submitted:.2f}s ({len(throttled)} answers were 429); all terminal in {finished:.1f}s"
    )
    rate = completed / finished * 60
    print(f"completed {completed}, failed {len(ids) - completed}; {rate:.1f} tasks/minute")


if __name__ == "__main__":
    main()
