"""Soak test: hundreds of tasks from many concurrent clients while the server is killed and restarted.

    .venv/bin/python scripts/soak.py --tasks 300 --clients 12 --kills 2

Starts its own `zimage serve` on the tiny model in a fresh data directory, submits with Idempotency-Keys
(retrying through the outages, as a careful client does), SIGKILLs and restarts the server while tasks
run, then checks that every accepted task is terminal, every completed image downloads, and the ledger
balances. Prints the figures; exits 1 if anything was lost or the money does not add up.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
from sqlalchemy import func, select

from zimage_server import billing
from zimage_server.db.models import Account, LedgerEntry, Task
from zimage_server.db.session import Database
from zimage_server.process import ServerProcess


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", type=int, default=300)
    parser.add_argument("--clients", type=int, default=12)
    parser.add_argument("--kills", type=int, default=2)
    parser.add_argument("--size", default="256x256")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="zimage-soak-"))
    # Limits out of the way: this measures durability, not back-pressure.
    unlimited = {
        "ZIMAGE_RATE_LIMIT_BURST": "100000",
        "ZIMAGE_RATE_LIMIT_PER_MINUTE": "100000",
        "ZIMAGE_MAX_PENDING_TASKS_PER_ACCOUNT": "100000",
        "ZIMAGE_MAX_PENDING_TASKS_TOTAL": "100000",
        "ZIMAGE_WORKER_IDLE_POLL_SECONDS": "0.1",
    }
    server = ServerProcess(workdir / "data", "tiny", env=unlimited, log_path=workdir / "server.log")
    started = time.monotonic()
    server.start()
    key = server.create_key("soak", args.tasks * 2)
    headers = {"Authorization": f"Bearer {key}"}

    accepted: dict[str, str] = {}  # idempotency key -> task id
    lock = threading.Lock()
    next_index = iter(range(args.tasks))
    retries = Counter[str]()

    def client() -> None:
        with httpx.Client(base_url=server.base_url, headers=headers, timeout=10) as http:
            for index in next_index:
                idempotency_key = f"soak-{index}-{uuid.uuid4().hex[:8]}"
                body = {"prompt": f"soak {index}", "size": args.size, "num_inference_steps": args.steps}
                while True:
                    try:
                        response = http.post(
                            "/v1/text_to_image", json=body, headers={"Idempotency-Key": idempotency_key}
                        )
                    except httpx.TransportError:
                        retries["connection"] += 1
                        time.sleep(0.2)
                        continue
                    if response.status_code >= 500 or response.status_code == 429:
                        retries[str(response.status_code)] += 1
                        time.sleep(0.2)
                        continue
                    response.raise_for_status()
                    with lock:
                        accepted[idempotency_key] = response.json()["id"]
                    break

    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    for thread in threads:
        thread.start()
    kills_done = 0
    for kill in range(args.kills):
        target = args.tasks * (kill + 1) // (args.kills + 1)
        while len(accepted) < target and any(thread.is_alive() for thread in threads):
            time.sleep(0.05)
        server.kill()
        time.sleep(0.5)
        server.start()
        kills_done += 1
    for thread in threads:
        thread.join()
    submitted_at = time.monotonic()

    task_ids = set(accepted.values())
    final: dict[str, dict[str, object]] = {}
    deadline = time.monotonic() + 1800
    with httpx.Client(base_url=server.base_url, headers=headers, timeout=10) as http:
        while len(final) < len(task_ids) and time.monotonic() < deadline:
            for task_id in task_ids - set(final):
                body = http.get(f"/v1/tasks/{task_id}").json()
                if body["status"] in ("completed", "failed"):
                    final[task_id] = body
            time.sleep(0.5)
        downloaded = broken = 0
        for body in final.values():
            for image in body.get("images", []):  # type: ignore[attr-defined]
                response = http.get(image["url"])
                if response.status_code == 200 and response.content.startswith(b"\x89PNG"):
                    downloaded += 1
                else:
                    broken += 1
    finished = time.monotonic()
    server.stop()

    db = Database(f"sqlite:///{server.data_dir / 'zimage.db'}")
    with db.session() as session:
        ledger_difference = sum(
            abs(account.balance_cents - billing.ledger_sum(session, account.id))
            for account in session.execute(select(Account)).scalars()
        )
        rows = int(session.execute(select(func.count()).select_from(Task)).scalar_one())
        reservations = int(
            session.execute(
                select(func.count()).select_from(LedgerEntry).where(LedgerEntry.kind == "reserve")
            ).scalar_one()
        )
        spent = -int(
            session.execute(
                select(func.coalesce(func.sum(LedgerEntry.amount_cents), 0)).where(
                    LedgerEntry.task_id.is_not(None)
                )
            ).scalar_one()
        )
    db.dispose()

    statuses = Counter(str(body["status"]) for body in final.values())
    failures = Counter(str(body.get("error_code")) for body in final.values() if body["status"] == "failed")
    lost = len(task_ids) - len(final)
    print(
        f"tasks requested {args.tasks} from {args.clients} clients; server SIGKILLed and restarted {kills_done} times"
    )
    print(
        f"accepted {len(task_ids)}  completed {statuses['completed']}  failed {statuses['failed']} {dict(failures)}  lost {lost}"
    )
    print(f"task rows {rows} (duplicates {rows - len(task_ids)}), reservations {reservations}")
    print(f"images downloaded {downloaded}, broken {broken}")
    print(f"credits spent {spent} cents for {statuses['completed']} completed single-image tasks")
    print(f"ledger difference {ledger_difference}")
    print(f"client retries through outages {dict(retries)}")
    print(f"submitted in {submitted_at - started:.1f}s, all terminal after {finished - started:.1f}s")
    ok = (
        lost == 0
        and broken == 0
        and ledger_difference == 0
        and rows == len(task_ids) == args.tasks
        and reservations == rows
        and spent == statuses["completed"]
    )
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
