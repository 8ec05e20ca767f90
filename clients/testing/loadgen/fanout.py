"""Fan-out: one publish ──▶ many subscribers (``fanout_run``), and one ``send`` into a group
through the whole pipeline (``group_fanout_run``); each round is timed until the last receiver."""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

from clients.testing.loadgen.client import Creds, MqttClient, connect
from clients.testing.loadgen.measure import STAMP, Progress, Ticker, close_all, percentiles, stamp

__all__ = ["fanout_run", "group_fanout_run"]


class _Rounds:
    """Publish round r, wait until ``expected`` receivers have it; the time to the last one."""

    def __init__(self, *, repeats: int, expected: int) -> None:
        self.repeats = repeats
        self.expected = expected
        self.got = [0] * repeats
        self.last = [0] * repeats
        self.done: dict[int, asyncio.Future[None]] = {}

    def received(self, r: int) -> None:
        if not 0 <= r < self.repeats:
            return
        self.got[r] += 1
        self.last[r] = time.monotonic_ns()
        fut = self.done.get(r)
        if self.got[r] >= self.expected and fut is not None and not fut.done():
            fut.set_result(None)

    async def run(
        self, publish: Callable[[int, int], None], *, pause_s: float, deadline: float, ticker: Ticker, label: str
    ) -> dict[str, Any]:
        times: list[float] = []
        incomplete = 0
        loop = asyncio.get_running_loop()
        for r in range(self.repeats):
            if time.monotonic() > deadline:
                break
            self.done[r] = loop.create_future()
            t0 = time.monotonic_ns()
            publish(r, t0)
            try:
                async with asyncio.timeout(max(0.1, min(10.0, deadline - time.monotonic()))):
                    await self.done[r]
                times.append((self.last[r] - t0) / 1e6)
            except TimeoutError:
                incomplete += 1
            ticker(functools.partial("{} {}/{}".format, label, r + 1, self.repeats))
            await asyncio.sleep(pause_s)
        return {
            "subscribers": self.expected,
            "repeats": len(times) + incomplete,
            "complete": len(times),
            "incomplete": incomplete,
            "min_delivered": min(self.got[: len(times) + incomplete], default=0),
            **percentiles(times),
        }


async def fanout_run(
    *,
    host: str,
    port: int,
    subscribers: int,
    topic: str,
    repeats: int,
    qos: int = 1,
    pause_s: float = 0.3,
    time_limit: float = 60.0,
    client_prefix: str = "fan",
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Publish one message ``repeats`` times; each time, measure until the last subscriber has it."""
    deadline = time.monotonic() + time_limit
    rounds = _Rounds(repeats=repeats, expected=subscribers)

    def on_message(t: str, payload: bytes, q: int) -> None:
        _intended, seq = STAMP.unpack_from(payload)
        rounds.received(seq)

    ticker = Ticker(progress)
    clients: list[MqttClient] = []
    try:
        for i in range(subscribers):
            c = await connect(host, port, Creds(f"{client_prefix}-s{i}"), on_message=on_message)
            clients.append(c)
            await c.subscribe([(topic, qos)])
            ticker(lambda: f"subscribed {len(clients)}/{subscribers}")
        pub = await connect(host, port, Creds(f"{client_prefix}-pub"))
        clients.append(pub)
        return await rounds.run(
            lambda r, t0: pub.publish(topic, stamp(t0, r, 100), qos),
            pause_s=pause_s,
            deadline=deadline,
            ticker=ticker,
            label="publish",
        )
    finally:
        await close_all(clients)


async def group_fanout_run(
    *,
    host: str,
    port: int,
    conv: str,
    sender: tuple[Creds, str],
    members: Sequence[tuple[Creds, str]],
    repeats: int,
    pause_s: float = 0.3,
    time_limit: float = 120.0,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Send ``repeats`` messages into a group through the full pipeline; each time, measure from
    the send until the last member has the ``msg`` event on its ``u/{user}/in``."""
    deadline = time.monotonic() + time_limit
    rounds = _Rounds(repeats=repeats, expected=len(members))

    def on_message(t: str, payload: bytes, q: int) -> None:
        try:
            env = json.loads(payload)
            if env.get("type") == "msg" and env.get("conv") == conv:
                rounds.received(int(env["body"]))
        except (ValueError, KeyError, TypeError):
            return

    ticker = Ticker(progress)
    clients: list[MqttClient] = []
    try:
        for creds, user in members:
            c = await connect(host, port, creds, on_message=on_message)
            clients.append(c)
            await c.subscribe([(f"u/{user}/in", 1)])
            ticker(lambda: f"members connected {len(clients)}/{len(members)}")
        sender_creds, sender_user = sender
        pub = await connect(host, port, sender_creds)
        clients.append(pub)
        out = f"u/{sender_user}/{sender_creds.client_id}/out"

        def send(r: int, t0: int) -> None:
            envelope = {"type": "send", "id": f"gf-{t0}-{r}", "conv": conv, "body": str(r)}
            pub.publish(out, json.dumps(envelope).encode(), 1)

        return await rounds.run(send, pause_s=pause_s, deadline=deadline, ticker=ticker, label="group send")
    finally:
        await close_all(clients)
