"""Token buckets: how many requests of a kind a device or a user may make.

Each key (a device, a user) has a bucket of ``burst`` tokens that refills at ``rate`` per
second; a request takes one. An empty bucket answers how long until the next token, which
becomes ``rate_limited`` with ``retry_after_ms`` (MQTT) or HTTP 429 with ``Retry-After``. A
request refused this way is not processed at all: nothing is stored. ``take`` never awaits, so
the pipeline still reaches the store in arrival order. Memory is bounded: past ``max_keys``,
buckets that have refilled (idle keys) are forgotten, then the oldest.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

from mqchat.clock import SYSTEM_CLOCK, Clock


@dataclass(frozen=True, slots=True)
class RateLimit:
    rate: float  # tokens per second
    burst: float  # bucket size: requests allowed at once after a quiet spell


UNLIMITED = RateLimit(rate=1e9, burst=1e9)  # no budget to speak of


class RateLimiter:
    def __init__(self, limit: RateLimit, *, max_keys: int = 100_000, clock: Clock = SYSTEM_CLOCK) -> None:
        if limit.rate <= 0 or limit.burst < 1:
            raise ValueError("a rate limit needs rate > 0 and burst >= 1")
        self._limit = limit
        self._max_keys = max_keys
        self._clock = clock
        self._buckets: dict[Hashable, tuple[float, float]] = {}  # key -> (tokens, at)

    def take(self, key: Hashable) -> float:
        """Take a token for key: 0.0 when allowed, else the seconds until one is available."""
        now = self._clock.monotonic()
        rate, burst = self._limit.rate, self._limit.burst
        tokens, at = self._buckets.pop(key, (burst, now))  # popped: re-inserted last (most recent)
        tokens = min(burst, tokens + (now - at) * rate)
        if tokens >= 1:
            self._buckets[key] = (tokens - 1, now)
            wait = 0.0
        else:
            self._buckets[key] = (tokens, now)
            wait = (1 - tokens) / rate
        if len(self._buckets) > self._max_keys:
            self._forget(now)
        return wait

    def _forget(self, now: float) -> None:
        rate, burst = self._limit.rate, self._limit.burst
        self._buckets = {k: v for k, v in self._buckets.items() if v[0] + (now - v[1]) * rate < burst}
        while len(self._buckets) > self._max_keys // 2:
            del self._buckets[next(iter(self._buckets))]

    def __len__(self) -> int:
        return len(self._buckets)
