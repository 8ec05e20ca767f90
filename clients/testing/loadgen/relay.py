"""``relay_run``: publishers ──▶ broker ──▶ one subscriber; throughput and open-loop latency."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from clients.testing.loadgen.client import Creds, LoadgenError, MqttClient, connect
from clients.testing.loadgen.measure import (
    STAMP,
    Progress,
    Ticker,
    close_all,
    open_loop,
    percentiles,
    stamp,
    wait_writable,
)

__all__ = ["relay_run"]


async def relay_run(
    *,
    host: str,
    port: int,
    publishers: Sequence[tuple[Creds, str]],
    subscriber: Creds,
    sub_filters: Sequence[str],
    qos: int,
    count: int,
    rate: float | None,
    payload_size: int = 100,
    time_limit: float = 60.0,
    window: int = 64,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Publish ``count`` messages (spread over the publishers) and receive them on one subscriber.

    ``rate=None`` publishes as fast as the broker takes them (a QoS1 window of ``window`` per
    publisher; QoS0 paced by TCP back-pressure); a rate is an open-loop schedule.
    """
    latencies: list[float] = []
    received = 0
    done = asyncio.get_running_loop().create_future()
    first_recv = last_recv = 0.0

    def on_message(topic: str, payload: bytes, q: int) -> None:
        nonlocal received, first_recv, last_recv
        now = time.monotonic_ns()
        if len(payload) < STAMP.size:
            return
        intended, _seq = STAMP.unpack_from(payload)
        latencies.append((now - intended) / 1e6)
        received += 1
        if received == 1:
            first_recv = now / 1e9
        last_recv = now / 1e9
        if received >= count and not done.done():
            done.set_result(None)

    deadline = time.monotonic() + time_limit
    sub = await connect(host, port, subscriber, on_message=on_message)
    codes = await sub.subscribe([(f, qos) for f in sub_filters])
    if any(c >= 0x80 for c in codes):
        raise LoadgenError(f"subscription refused: {codes}")
    pubs = [await connect(host, port, creds) for creds, _topic in publishers]
    topics = [topic for _creds, topic in publishers]
    ticker = Ticker(progress)

    def line(sent: int) -> str:
        return f"sent {sent}/{count}, received {received}"

    load = _Publishers(pubs, topics, qos=qos, size=payload_size, deadline=deadline)
    t_start = time.monotonic()
    try:
        if rate is None:
            sent = await _publish_max(load, count=count, window=window, ticker=ticker, line=line)
        else:
            sent = await _publish_at(load, count=count, rate=rate, tick=lambda i: ticker(lambda: line(i)))
        t_sent = time.monotonic()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
                while not done.done():
                    await asyncio.wait([done], timeout=1.0)
                    ticker(lambda: line(sent))
    finally:
        await close_all([*pubs, sub])
    elapsed = (last_recv - t_start) if received else 0.0
    return {
        "qos": qos,
        "rate": rate,
        "messages": count,
        "sent": sent,
        "received": received,
        "lost": sent - received,
        "send_seconds": round(t_sent - t_start, 4),
        "seconds": round(elapsed, 4),
        "receive_window_seconds": round(last_recv - first_recv, 4) if received else 0.0,
        "msg_per_s": round(received / elapsed, 1) if elapsed > 0 else 0.0,
        **percentiles(latencies),
    }


@dataclass(frozen=True, slots=True)
class _Publishers:
    """The publishing side of a relay run: clients, their topics, QoS, payload size, deadline."""

    clients: Sequence[MqttClient]
    topics: Sequence[str]
    qos: int
    size: int
    deadline: float


async def _publish_max(
    load: _Publishers, *, count: int, window: int, ticker: Ticker, line: Callable[[int], str]
) -> int:
    """Each publisher publishes its share as fast as the broker takes it; return how many were sent."""
    pubs, topics, qos, size, deadline = load.clients, load.topics, load.qos, load.size, load.deadline
    sent = 0
    per = [count // len(pubs) + (1 if i < count % len(pubs) else 0) for i in range(len(pubs))]

    def status() -> str:
        return line(sent)

    async def pump(k: int) -> None:
        nonlocal sent
        client, topic = pubs[k], topics[k]
        for i in range(per[k]):
            if time.monotonic() > deadline:
                return
            client.publish(topic, stamp(time.monotonic_ns(), i, size), qos)
            sent += 1
            if qos:
                await client.wait_inflight_at_most(window - 1)
            elif i % 64 == 63:
                await client.wait_writable()
                await asyncio.sleep(0)
            ticker(status)

    async with asyncio.TaskGroup() as tg:
        for k in range(len(pubs)):
            tg.create_task(pump(k), name=f"publisher-{k}")
    return sent


async def _publish_at(load: _Publishers, *, count: int, rate: float, tick: Callable[[int], None]) -> int:
    """Publish on an open-loop schedule of ``rate``/s, round robin; return how many were sent."""
    pubs, topics, qos, size = load.clients, load.topics, load.qos, load.size
    n = len(pubs)

    def send(i: int, intended: int) -> None:
        pubs[i % n].publish(topics[i % n], stamp(intended, i, size), qos)

    return await open_loop(rate, count, load.deadline, send, functools.partial(wait_writable, pubs), tick)
