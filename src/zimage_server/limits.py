"""Per-key rate limiting of task creation: a token bucket per API key, in this process's memory.

Memory is enough for one server process; a fleet behind one database would share buckets in Redis.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

from zimage_server.errors import RateLimited


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    def __init__(self, per_minute: float, burst: int) -> None:
        self._rate = per_minute / 60.0
        self._burst = float(burst)
        self._buckets: dict[int, _Bucket] = {}
        self._lock = threading.Lock()

    def acquire(self, key_id: int) -> None:
        """Take one token for this key or raise 429 with the seconds until the next one."""
        now = time.monotonic()
        with self._lock:
            bucket = self._buckets.setdefault(key_id, _Bucket(self._burst, now))
            bucket.tokens = min(self._burst, bucket.tokens + (now - bucket.updated) * self._rate)
            bucket.updated = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return
            wait = (1.0 - bucket.tokens) / self._rate
        raise RateLimited(
            f"too many tasks created with this API key: at most {self._rate * 60:g} per minute "
            f"(bursts of {self._burst:g}); try again in {math.ceil(wait)}s",
            code="rate_limited",
            headers={"Retry-After": str(max(1, math.ceil(wait)))},
        )
