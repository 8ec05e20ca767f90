"""Time, injected: services take a Clock so tests can control it instead of sleeping."""

from __future__ import annotations

import asyncio
import time


class Clock:
    """Wall time in milliseconds, monotonic seconds, and sleeping."""

    def time_ms(self) -> int:
        return time.time_ns() // 1_000_000

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


SYSTEM_CLOCK = Clock()
