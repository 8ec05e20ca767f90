"""``reconnect_storm``: many devices on one node; the node is killed; how long until every device
is back online on the others (through the load balancer) and has caught up over HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any

from clients.testing.loadgen.client import Creds, LoadgenError, MqttClient, connect
from clients.testing.loadgen.measure import close_all

__all__ = ["reconnect_storm"]

FIRST_RETRY_S = 0.2  # a device's first reconnect after a random wait up to this (spreads the herd)
RETRY_CAP_S = 2.0


async def _get(host: str, port: int, path: str, token: str, limit_s: float = 30.0) -> int:
    """The status of one HTTP/1.1 GET on a connection of its own, as a phone's first call after a
    reconnect. (A pooled client library spent more CPU here than the server did.)"""
    async with asyncio.timeout(limit_s):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            head = [f"GET {path} HTTP/1.1", f"Host: {host}", f"Authorization: Bearer {token}", "Connection: close"]
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
            status_line = await reader.readline()
            await reader.read()  # headers and body, to the close
            return int(status_line.split()[1])
        finally:
            writer.close()


def _filters(creds: Creds) -> list[tuple[str, int]]:
    return [(f"u/{creds.username}/in", 1), (f"u/{creds.username}/{creds.client_id}/in", 1)]


async def reconnect_storm(
    *,
    host: str,
    node_port: int,
    port: int,
    http_port: int,
    devices: Sequence[Creds],
    kill_pids: Sequence[int],
    concurrency: int = 200,
    limit_s: float = 120.0,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Connect every device to one node (``node_port``), kill -9 ``kill_pids`` (that node's
    processes), and time each device's way back through the load balancer (``port``, and
    ``http_port`` for HTTP): reconnected and subscribed (online), then one catch-up call answered
    (``GET /v1/conversations``, as the SDK's sync after a connect). Times are from the kill."""
    clients: dict[str, MqttClient] = {}
    queue = list(devices)

    async def first() -> None:
        while queue:
            creds = queue.pop()
            client = await connect(host, node_port, creds, keepalive=60)
            await client.subscribe(_filters(creds))
            clients[creds.client_id] = client

    await asyncio.gather(*(first() for _ in range(concurrency)))
    if progress is not None:
        progress(f"{len(clients)} devices connected to the node; killing it")
    online: dict[str, float] = {}
    caught_up: dict[str, float] = {}
    attempts = 0
    errors: list[str] = []
    deadline = time.monotonic() + limit_s
    slots = asyncio.Semaphore(concurrency)

    async def back(creds: Creds, rng: random.Random) -> None:
        nonlocal attempts
        await clients[creds.client_id].wait_closed()
        wait = rng.uniform(0, FIRST_RETRY_S)
        while time.monotonic() < deadline:
            await asyncio.sleep(wait)
            attempts += 1
            try:
                async with slots:
                    client = await connect(host, port, creds, keepalive=60, limit_s=10)
                    codes = await client.subscribe(_filters(creds))
                    if any(code >= 0x80 for code in codes):
                        raise LoadgenError(f"subscribe refused: {codes}")
            except (OSError, LoadgenError, TimeoutError) as exc:
                if len(errors) < 10:
                    errors.append(f"{type(exc).__name__}: {exc}"[:160])
                wait = min(RETRY_CAP_S, max(0.1, wait * 2)) * rng.uniform(0.5, 1.0)
                continue
            clients[creds.client_id] = client
            online[creds.client_id] = time.monotonic() - killed
            status: int | str
            try:
                async with slots:
                    status = await _get(host, http_port, "/v1/conversations", creds.password or "")
            except (OSError, TimeoutError, ValueError) as exc:
                status = f"{type(exc).__name__}: {exc}"[:160]
            if status == 200:
                caught_up[creds.client_id] = time.monotonic() - killed
            elif len(errors) < 10:
                errors.append(f"catch-up answered {status}")
            return

    async def ticker() -> None:
        while progress is not None:
            await asyncio.sleep(1.0)
            since = time.monotonic() - killed
            progress(f"{since:4.1f} s after the kill: {len(online)} online, {len(caught_up)} caught up")

    killed = time.monotonic()
    for pid in kill_pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    tick = asyncio.create_task(ticker())
    try:
        await asyncio.gather(*(back(c, random.Random(i)) for i, c in enumerate(devices)))
    finally:
        tick.cancel()
        await close_all(list(clients.values()))
    return {
        "devices": len(devices),
        "online": sorted(online.values()),
        "caught_up": sorted(caught_up.values()),
        "connect_attempts": attempts,
        "errors": errors,
    }
