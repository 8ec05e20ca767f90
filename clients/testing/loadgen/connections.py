"""``ramp_connections``: many idle devices (connect + auth + subscribe), held open until released."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

from clients.testing.loadgen.client import Creds, LoadgenError, MqttClient, connect
from clients.testing.loadgen.measure import close_all

__all__ = ["ramp_connections"]


async def ramp_connections(
    *,
    host: str,
    port: int,
    devices: Sequence[tuple[Creds, Sequence[str]]],
    concurrency: int,
    should_stop: Callable[[], bool],
    on_connected: Callable[[int], None],
    hold: Callable[[], bool],
    report: Callable[[dict[str, Any]], None],
    keepalive: int = 120,
    time_limit: float = 900.0,
) -> None:
    """Connect, authenticate and subscribe each device; ``report`` the completion times; keep the
    connections open (pinging) while ``hold()`` is true, then disconnect them.

    ``should_stop()`` ends the ramp early (a stalled broker); ``on_connected(total)`` is called
    after each device completes.
    """
    deadline = time.monotonic() + time_limit
    clients: list[MqttClient] = []
    done_at: list[float] = []
    errors: list[str] = []
    next_index = 0
    t_start = time.monotonic()

    async def worker() -> None:
        nonlocal next_index
        while next_index < len(devices) and not should_stop() and len(errors) < 50:
            if time.monotonic() > deadline:
                return
            creds, filters = devices[next_index]
            next_index += 1
            try:
                c = await connect(host, port, creds, keepalive=keepalive)
                clients.append(c)
                codes = await c.subscribe([(f, 1) for f in filters])
                if any(code >= 0x80 for code in codes):
                    errors.append(f"subscribe refused for {creds.client_id}")
                    continue
            except (OSError, LoadgenError, TimeoutError) as exc:
                errors.append(f"{creds.client_id}: {exc!r}"[:200])
                continue
            done_at.append(time.monotonic())
            on_connected(len(done_at))

    async with asyncio.TaskGroup() as tg:
        for k in range(concurrency):
            tg.create_task(worker(), name=f"ramp-{k}")
    report({"started": t_start, "done_at": done_at, "errors": errors[:5], "error_count": len(errors)})
    while hold() and time.monotonic() < deadline:  # noqa: ASYNC110 - hold() is another process's flag
        await asyncio.sleep(0.2)
    await close_all(clients, wait_s=10.0)
