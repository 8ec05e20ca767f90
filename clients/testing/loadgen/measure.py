"""What the load patterns share: the payload stamp, percentiles, pacing, progress, clean-up.

Latency is measured with ``time.monotonic_ns()``, which on Linux is one clock for every process
on the machine: payloads carry the *intended* send time (open-loop load), so a slow sender cannot
hide queueing delay. Every loop here is bounded in count and in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from clients.testing.loadgen.client import MqttClient

__all__ = [
    "STAMP",
    "Progress",
    "Ticker",
    "close_all",
    "drain",
    "open_loop",
    "percentiles",
    "stamp",
    "stderr_progress",
    "wait_writable",
]

Progress = Callable[[str], None]

STAMP = struct.Struct(">QI")  # intended send time (monotonic ns), sequence number


def percentiles(values_ms: Sequence[float]) -> dict[str, float | None]:
    """p50/p90/p99/max (nearest rank) of latencies in milliseconds; None when there are none."""
    if not values_ms:
        return {"p50_ms": None, "p90_ms": None, "p99_ms": None, "max_ms": None}
    s = sorted(values_ms)
    n = len(s)

    def rank(p: float) -> float:
        return round(s[min(n - 1, max(0, int(p * n + 0.999999) - 1))], 3)

    return {"p50_ms": rank(0.50), "p90_ms": rank(0.90), "p99_ms": rank(0.99), "max_ms": round(s[-1], 3)}


def stamp(intended_ns: int, seq: int, size: int) -> bytes:
    """A ``size``-byte payload that starts with its intended send time and sequence number."""
    head = STAMP.pack(intended_ns, seq)
    return head + b"x" * max(0, size - len(head))


class Ticker:
    """Progress lines, at most one a second."""

    def __init__(self, progress: Progress | None) -> None:
        self._progress = progress
        self._last = time.monotonic()

    def __call__(self, line: Callable[[], str]) -> None:
        if self._progress is None:
            return
        now = time.monotonic()
        if now - self._last >= 1.0:
            self._last = now
            self._progress(line())


def stderr_progress(label: str) -> Progress:
    """A progress callback that writes ``[label] line`` to stderr."""

    def emit(line: str) -> None:
        print(f"  [{label}] {line}", file=sys.stderr, flush=True)

    return emit


async def close_all(clients: Sequence[MqttClient], wait_s: float = 2.0) -> None:
    """Disconnect every client; wait up to ``wait_s`` for their sockets to close."""
    for c in clients:
        c.disconnect()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(wait_s):
            for c in clients:
                await c.wait_closed()


async def wait_writable(clients: Sequence[MqttClient]) -> None:
    """Return when every client's write buffer is below its high-water mark."""
    for c in clients:
        await c.wait_writable()


async def open_loop(
    rate: float,
    count: int,
    deadline: float,
    send: Callable[[int, int], None],
    writable: Callable[[], Any],
    tick: Callable[[int], None] | None = None,
) -> int:
    """Call send(i, intended_ns) for i < count at ``rate``/s from now; return how many were sent."""
    t0 = time.monotonic_ns()
    step = 1e9 / rate
    i = 0
    while i < count and time.monotonic() < deadline:
        due = min(count, int((time.monotonic_ns() - t0) / step) + 1)
        while i < due:
            send(i, t0 + int(i * step))
            i += 1
        if tick is not None:
            tick(i)
        await writable()
        await asyncio.sleep(0.001)
    return i


async def drain(pending: Callable[[], bool], limit_s: float, tick: Callable[[], None]) -> None:
    """After the sends: wait (up to ``limit_s``) while ``pending()`` holds, ticking progress."""
    deadline = time.monotonic() + limit_s
    while pending() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        tick()
