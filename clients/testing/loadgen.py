"""A light MQTT 3.1.1 client and the load patterns of ``mqchat bench``.

::

    MqttClient (asyncio.Protocol, raw socket, no third-party MQTT code)
      ├─ CONNECT(username, password, clean session, keepalive) ─▶ CONNACK
      ├─ SUBSCRIBE ─▶ SUBACK          PUBLISH QoS0/1 out ─▶ PUBACK (inflight window)
      ├─ PUBLISH QoS0/1 in ─▶ PUBACK ─▶ on_message(topic, payload, qos)
      └─ PINGREQ every keepalive, DISCONNECT

    relay_run        publishers ──▶ broker ──▶ one subscriber   throughput / open-loop latency
    fanout_run       one publisher ──▶ broker ──▶ many subscribers of one topic
    ramp_connections many idle devices (connect + auth + subscribe), held open until released
    chat_run         senders ──send──▶ mqchat ──ack──▶ senders, ──msg──▶ recipients

A client costs one small object, one transport and one timer, so one process holds ~10,000
idle connections. Latency is measured with ``time.monotonic_ns()``, which on Linux is one clock
for every process on the machine: payloads carry the *intended* send time (open-loop load), so
a slow sender cannot hide queueing delay. Every loop here is bounded in count and in time.

This module imports only mqchat's leaves (the wire protocol, the MQTT codec), never server code.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import random
import struct
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from mqchat import mqtt_codec as codec
from mqchat.errors import MqchatError
from mqchat.ids import dm_conv

__all__ = [
    "ConnectRefused",
    "Creds",
    "LoadgenError",
    "MqttClient",
    "chat_run",
    "connect",
    "fanout_run",
    "percentiles",
    "ramp_connections",
    "relay_run",
]

MessageCallback = Callable[[str, bytes, int], None]
Progress = Callable[[str], None]

_STAMP = struct.Struct(">QI")  # intended send time (monotonic ns), sequence number


class LoadgenError(MqchatError):
    """A load-generator connection failed (closed, timed out, protocol error)."""


class ConnectRefused(LoadgenError):
    """The broker answered CONNACK with a non-zero return code."""

    def __init__(self, code: int) -> None:
        super().__init__(f"CONNACK return code {code}")
        self.code = code


@dataclass(frozen=True, slots=True)
class Creds:
    """What one MQTT connection presents: client id, and username/password when not anonymous."""

    client_id: str
    username: str | None = None
    password: str | None = None


# --- wire encoding (mqchat.mqtt_codec) ---------------------------------------------------------


def _connect_packet(creds: Creds, keepalive: int, clean_session: bool) -> bytes:
    password = creds.password if creds.username is not None else None
    return codec.encode_connect(
        creds.client_id, creds.username, password, keepalive=keepalive, clean_session=clean_session
    )


# --- the client --------------------------------------------------------------------------------


class MqttClient(asyncio.Protocol):
    """One MQTT 3.1.1 connection. Build it with :func:`connect`."""

    __slots__ = (
        "_buf",
        "_closed",
        "_connack",
        "_inflight_waiter",
        "_keepalive",
        "_loop",
        "_next_id",
        "_ping_handle",
        "_subacks",
        "_writable",
        "inflight",
        "on_message",
        "transport",
    )

    def __init__(self, on_message: MessageCallback | None = None) -> None:
        self.on_message = on_message
        self.transport: asyncio.Transport | None = None
        self.inflight = 0  # QoS1 publishes sent and not yet PUBACKed
        self._loop = asyncio.get_running_loop()
        self._buf = bytearray()
        self._connack: asyncio.Future[int] = self._loop.create_future()
        self._closed: asyncio.Future[None] = self._loop.create_future()
        self._subacks: dict[int, asyncio.Future[list[int]]] = {}
        self._inflight_waiter: tuple[int, asyncio.Future[None]] | None = None
        self._writable: asyncio.Future[None] | None = None
        self._next_id = 0
        self._keepalive = 0
        self._ping_handle: asyncio.TimerHandle | None = None

    # asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport subclass

    def connection_lost(self, exc: Exception | None) -> None:
        if self._ping_handle is not None:
            self._ping_handle.cancel()
        error = LoadgenError(f"connection closed: {exc!r}" if exc else "connection closed")
        for fut in (self._connack, *self._subacks.values(), self._writable):
            if fut is not None and not fut.done():
                fut.set_exception(error)
                fut.exception()  # mark retrieved: nobody may be waiting
        if self._inflight_waiter is not None and not self._inflight_waiter[1].done():
            self._inflight_waiter[1].set_exception(error)
            self._inflight_waiter[1].exception()
        if not self._closed.done():
            self._closed.set_result(None)

    def pause_writing(self) -> None:
        if self._writable is None:
            self._writable = self._loop.create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        try:
            for first, body in codec.split_packets(buf):
                self._dispatch(first, body)
        except codec.MalformedPacket as exc:
            self._protocol_error(str(exc))

    # incoming packets ------------------------------------------------------------------------

    def _dispatch(self, first: int, body: bytes) -> None:
        kind = first >> 4
        if kind == 3:  # PUBLISH
            publish = codec.decode_publish(first, body)
            if publish.packet_id is not None:
                assert self.transport is not None
                self.transport.write(codec.encode_puback(publish.packet_id))
            if self.on_message is not None:
                self.on_message(publish.topic, publish.payload, publish.qos)
        elif kind == 4:  # PUBACK
            self.inflight -= 1
            waiter = self._inflight_waiter
            if waiter is not None and self.inflight <= waiter[0] and not waiter[1].done():
                waiter[1].set_result(None)
        elif kind == 2:  # CONNACK
            if not self._connack.done():
                self._connack.set_result(body[1] if len(body) >= 2 else 255)
        elif kind == 9:  # SUBACK
            pid, codes = codec.decode_suback(body)
            fut = self._subacks.pop(pid, None)
            if fut is not None and not fut.done():
                fut.set_result(codes)
        elif kind == 13:  # PINGRESP
            pass
        else:
            self._protocol_error(f"unexpected packet type {kind}")

    def _protocol_error(self, why: str) -> None:
        if self.transport is not None:
            self.transport.abort()
        if not self._connack.done():
            self._connack.set_exception(LoadgenError(why))

    # keepalive -------------------------------------------------------------------------------

    def _start_keepalive(self, keepalive: int) -> None:
        self._keepalive = keepalive
        if keepalive > 0:
            # Jittered first ping, so that a ramp of connections does not ping in lockstep.
            self._ping_handle = self._loop.call_later(keepalive * random.uniform(0.5, 0.9), self._ping)

    def _ping(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.write(codec.PINGREQ_BYTES)
        self._ping_handle = self._loop.call_later(self._keepalive * 0.9, self._ping)

    # requests --------------------------------------------------------------------------------

    def _packet_id(self) -> int:
        self._next_id = self._next_id % 65535 + 1
        return self._next_id

    async def subscribe(self, filters: Sequence[tuple[str, int]], *, limit_s: float = 30.0) -> list[int]:
        """Subscribe and return the SUBACK return codes (0x80 = refused)."""
        assert self.transport is not None
        pid = self._packet_id()
        fut: asyncio.Future[list[int]] = self._loop.create_future()
        self._subacks[pid] = fut
        self.transport.write(codec.encode_subscribe(pid, filters))
        async with asyncio.timeout(limit_s):
            return await fut

    def publish(self, topic: str, payload: bytes, qos: int = 0) -> None:
        """Write one PUBLISH (QoS 0 or 1) without waiting; QoS1 raises :attr:`inflight`."""
        assert self.transport is not None
        if qos:
            self.inflight += 1
            self.transport.write(codec.encode_publish(topic, payload, 1, self._packet_id()))
        else:
            self.transport.write(codec.encode_publish(topic, payload))

    async def wait_writable(self) -> None:
        """Return when the transport's write buffer is below its high-water mark."""
        if self._writable is not None:
            await asyncio.shield(self._writable)

    async def wait_inflight_at_most(self, n: int) -> None:
        """Return when at most n QoS1 publishes await their PUBACK."""
        if self.inflight <= n:
            return
        fut: asyncio.Future[None] = self._loop.create_future()
        self._inflight_waiter = (n, fut)
        try:
            await fut
        finally:
            self._inflight_waiter = None

    @property
    def is_closed(self) -> bool:
        return self._closed.done()

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)

    def disconnect(self) -> None:
        """Send DISCONNECT and close the socket."""
        if self._ping_handle is not None:
            self._ping_handle.cancel()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(codec.DISCONNECT_BYTES)
            self.transport.close()


async def connect(
    host: str,
    port: int,
    creds: Creds,
    *,
    keepalive: int = 60,
    clean_session: bool = True,
    on_message: MessageCallback | None = None,
    limit_s: float = 30.0,
) -> MqttClient:
    """Open a TCP connection, CONNECT and wait for CONNACK; raise ConnectRefused on refusal."""
    loop = asyncio.get_running_loop()
    transport: asyncio.Transport | None = None
    try:
        async with asyncio.timeout(limit_s):
            transport, client = await loop.create_connection(lambda: MqttClient(on_message), host, port)
            transport.write(_connect_packet(creds, keepalive, clean_session))
            code = await client._connack
    except BaseException:
        if transport is not None:
            transport.abort()
        raise
    if code != 0:
        transport.close()
        raise ConnectRefused(code)
    client._start_keepalive(keepalive)
    return client


# --- measurements ------------------------------------------------------------------------------


def percentiles(values_ms: Sequence[float]) -> dict[str, float | None]:
    """p50/p90/p99/max (nearest rank) of latencies in milliseconds; None when there are none."""
    if not values_ms:
        return {"p50_ms": None, "p90_ms": None, "p99_ms": None, "max_ms": None}
    s = sorted(values_ms)
    n = len(s)

    def rank(p: float) -> float:
        return round(s[min(n - 1, max(0, int(p * n + 0.999999) - 1))], 3)

    return {"p50_ms": rank(0.50), "p90_ms": rank(0.90), "p99_ms": rank(0.99), "max_ms": round(s[-1], 3)}


def _stamp(intended_ns: int, seq: int, size: int) -> bytes:
    head = _STAMP.pack(intended_ns, seq)
    return head + b"x" * max(0, size - len(head))


class _Ticker:
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


async def _close_all(clients: Sequence[MqttClient], wait_s: float = 2.0) -> None:
    for c in clients:
        c.disconnect()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(wait_s):
            for c in clients:
                await c.wait_closed()


async def _open_loop(
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


# --- relay: publishers → broker → one subscriber -----------------------------------------------


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
        if len(payload) < _STAMP.size:
            return
        intended, _seq = _STAMP.unpack_from(payload)
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
    ticker = _Ticker(progress)
    sent = 0

    def line() -> str:
        return f"sent {sent}/{count}, received {received}"

    t_start = time.monotonic()
    try:
        if rate is None:
            per = [count // len(pubs) + (1 if i < count % len(pubs) else 0) for i in range(len(pubs))]

            async def pump(k: int) -> None:
                nonlocal sent
                client, topic = pubs[k], topics[k]
                for i in range(per[k]):
                    if time.monotonic() > deadline:
                        return
                    client.publish(topic, _stamp(time.monotonic_ns(), i, payload_size), qos)
                    sent += 1
                    if qos:
                        await client.wait_inflight_at_most(window - 1)
                    elif i % 64 == 63:
                        await client.wait_writable()
                        await asyncio.sleep(0)
                    ticker(line)

            async with asyncio.TaskGroup() as tg:
                for k in range(len(pubs)):
                    tg.create_task(pump(k), name=f"publisher-{k}")
        else:
            n = len(pubs)

            def send(i: int, intended: int) -> None:
                pubs[i % n].publish(topics[i % n], _stamp(intended, i, payload_size), qos)

            async def writable() -> None:
                for p in pubs:
                    await p.wait_writable()

            sent = await _open_loop(
                rate,
                count,
                deadline,
                send,
                writable,
                lambda i: ticker(lambda: f"sent {i}/{count}, received {received}"),
            )
        t_sent = time.monotonic()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
                while not done.done():
                    await asyncio.wait([done], timeout=1.0)
                    ticker(line)
    finally:
        await _close_all([*pubs, sub])
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


# --- fan-out: one publish → many subscribers ---------------------------------------------------


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
        self, publish: Callable[[int, int], None], *, pause_s: float, deadline: float, ticker: _Ticker, label: str
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
        _intended, seq = _STAMP.unpack_from(payload)
        rounds.received(seq)

    ticker = _Ticker(progress)
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
            lambda r, t0: pub.publish(topic, _stamp(t0, r, 100), qos),
            pause_s=pause_s,
            deadline=deadline,
            ticker=ticker,
            label="publish",
        )
    finally:
        await _close_all(clients)


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

    ticker = _Ticker(progress)
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
        await _close_all(clients)


# --- idle connections --------------------------------------------------------------------------


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
    await _close_all(clients, wait_s=10.0)


# --- chat: the full pipeline -------------------------------------------------------------------


async def chat_run(
    *,
    host: str,
    port: int,
    pairs: Sequence[tuple[str, Creds, str, Creds]],
    rates: Sequence[float],
    duration: float,
    id_prefix: str,
    drain_s: float = 15.0,
    body_size: int = 100,
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """Sender a_i sends to b_i over ``dm:{a_i}:{b_i}``; each rate (total sends/s, open loop) runs
    for ``duration`` seconds. Measures send→ack and send→recipient latency and what was lost.

    ``pairs`` are (user a, device creds of a, user b, device creds of b). A rate that loses more
    than a fifth of its messages ends the run (higher rates would only pile on)."""
    sent_at: dict[str, int] = {}
    ack_ms: list[float] = []
    deliver_ms: list[float] = []
    delivered: set[str] = set()
    acked: set[str] = set()
    errors: list[str] = []

    def on_sender(topic: str, payload: bytes, qos: int) -> None:
        if not topic.endswith("/in"):
            return
        env = json.loads(payload)
        mid = env.get("id")
        if env.get("type") == "ack" and isinstance(mid, str) and mid in sent_at and mid not in acked:
            acked.add(mid)
            ack_ms.append((time.monotonic_ns() - sent_at[mid]) / 1e6)
        elif env.get("type") == "error" and len(errors) < 5:
            errors.append(str(env.get("code")))

    def on_recipient(topic: str, payload: bytes, qos: int) -> None:
        env = json.loads(payload)
        if env.get("type") != "msg":
            return
        mid = env.get("id")
        if isinstance(mid, str) and mid in sent_at and mid not in delivered:
            delivered.add(mid)
            deliver_ms.append((time.monotonic_ns() - sent_at[mid]) / 1e6)

    senders: list[tuple[MqttClient, str, str]] = []
    recipients: list[MqttClient] = []
    try:
        for a, ca, b, cb in pairs:
            s = await connect(host, port, ca, on_message=on_sender)
            await s.subscribe([(f"u/{a}/in", 1), (f"u/{a}/{ca.client_id}/in", 1)])
            r = await connect(host, port, cb, on_message=on_recipient)
            await r.subscribe([(f"u/{b}/in", 1), (f"u/{b}/{cb.client_id}/in", 1)])
            senders.append((s, f"u/{a}/{ca.client_id}/out", dm_conv(a, b)))
            recipients.append(r)
        results: list[dict[str, Any]] = []
        ticker = _Ticker(progress)
        pad = "." * max(0, body_size - 20)
        n = len(senders)
        ids: list[str] = []
        step = {"rate": 0.0, "count": 0}

        def send(i: int, intended: int) -> None:
            client, topic, conv = senders[i % n]
            mid = ids[i]
            sent_at[mid] = intended
            env = {"type": "send", "id": mid, "conv": conv, "kind": "text", "body": f"{intended:020d}{pad}"}
            client.publish(topic, json.dumps(env, separators=(",", ":")).encode(), 1)

        async def writable() -> None:
            for c, _t, _v in senders:
                await c.wait_writable()

        def line() -> str:
            return (
                f"{step['rate']:g}/s: sent {len(sent_at)}/{step['count']}, acked {len(acked)}, "
                f"delivered {len(delivered)}"
            )

        for rate in rates:
            for coll in (sent_at, acked, delivered, ack_ms, deliver_ms, errors):
                coll.clear()
            count = int(rate * duration)
            step.update(rate=rate, count=count)
            ids[:] = [f"{id_prefix}-{int(rate)}-{i}" for i in range(count)]
            t0 = time.monotonic()
            sent = await _open_loop(rate, count, t0 + duration * 3 + 5, send, writable, lambda i: ticker(line))
            drain_deadline = time.monotonic() + drain_s
            while (len(acked) < sent or len(delivered) < sent) and time.monotonic() < drain_deadline:
                await asyncio.sleep(0.05)
                ticker(line)
            result = {
                "rate": rate,
                "sent": sent,
                "send_seconds": round(time.monotonic() - t0, 3),
                "acked": len(acked),
                "delivered": len(delivered),
                "lost_ack": sent - len(acked),
                "lost_delivery": sent - len(delivered),
                "errors": list(errors),
                "ack": percentiles(ack_ms),
                "delivery": percentiles(deliver_ms),
            }
            results.append(result)
            if progress is not None:
                progress(line() + " (done)")
            if sent == 0 or (sent - len(delivered)) > sent / 5:
                break
            await asyncio.sleep(1.0)
        return results
    finally:
        await _close_all([*(c for c, _t, _v in senders), *recipients])


# --- abuse: one device floods while another user chats -----------------------------------------


async def abuse_run(
    *,
    host: str,
    port: int,
    legit: tuple[str, Creds, str],
    flooder: tuple[str, Creds, str] | None,
    legit_rate: float,
    duration: float,
    id_prefix: str,
    flood_inflight: int = 200,
    drain_s: float = 10.0,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """``legit`` = (user, creds, conv) sends at ``legit_rate``/s (open loop) for ``duration`` s
    and measures send→ack; meanwhile ``flooder`` (if any) publishes sends as fast as the broker
    acknowledges them (at most ``flood_inflight`` unacknowledged). Counts what the flood got:
    acks, and errors by code."""
    sent_at: dict[str, int] = {}
    ack_ms: list[float] = []
    flood = {"sent": 0, "acked": 0}
    flood_errors: dict[str, int] = {}

    def on_legit(topic: str, payload: bytes, qos: int) -> None:
        env = json.loads(payload)
        mid = env.get("id")
        if env.get("type") == "ack" and isinstance(mid, str) and mid in sent_at:
            ack_ms.append((time.monotonic_ns() - sent_at.pop(mid)) / 1e6)

    def on_flood(topic: str, payload: bytes, qos: int) -> None:
        env = json.loads(payload)
        if env.get("type") == "ack":
            flood["acked"] += 1
        elif env.get("type") == "error":
            code = str(env.get("code"))
            flood_errors[code] = flood_errors.get(code, 0) + 1

    user, creds, conv = legit
    clients: list[MqttClient] = []
    try:
        good = await connect(host, port, creds, on_message=on_legit)
        clients.append(good)
        await good.subscribe([(f"u/{user}/in", 1), (f"u/{user}/{creds.client_id}/in", 1)])
        good_topic = f"u/{user}/{creds.client_id}/out"
        end = time.monotonic() + duration

        async def pump() -> None:
            if flooder is None:
                return
            f_user, f_creds, f_conv = flooder
            bad = await connect(host, port, f_creds, on_message=on_flood)
            clients.append(bad)
            await bad.subscribe([(f"u/{f_user}/{f_creds.client_id}/in", 1)])
            topic = f"u/{f_user}/{f_creds.client_id}/out"
            while time.monotonic() < end:
                await bad.wait_inflight_at_most(flood_inflight)
                env = {"type": "send", "id": f"{id_prefix}-f{flood['sent']}", "conv": f_conv, "body": "spam"}
                bad.publish(topic, json.dumps(env, separators=(",", ":")).encode(), 1)
                flood["sent"] += 1
                if flood["sent"] % 64 == 0:
                    await bad.wait_writable()
                    await asyncio.sleep(0)

        def send(i: int, intended: int) -> None:
            mid = f"{id_prefix}-l{i}"
            sent_at[mid] = intended
            env = {"type": "send", "id": mid, "conv": conv, "body": f"hello {i}"}
            good.publish(good_topic, json.dumps(env, separators=(",", ":")).encode(), 1)

        ticker = _Ticker(progress)

        def line() -> str:
            return f"legit acked {len(ack_ms)}, flood sent {flood['sent']} acked {flood['acked']} errors {flood_errors}"

        count = int(legit_rate * duration)
        flooding = asyncio.create_task(pump(), name="abuse-flood")
        sent = await _open_loop(legit_rate, count, end + duration, send, good.wait_writable, lambda i: ticker(line))
        await flooding
        deadline = time.monotonic() + drain_s
        while len(ack_ms) < sent and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            ticker(line)
        return {
            "legit_sent": sent,
            "legit_acked": len(ack_ms),
            "ack": percentiles(ack_ms),
            "flood_sent": flood["sent"],
            "flood_acked": flood["acked"],
            "flood_errors": dict(flood_errors),
        }
    finally:
        await _close_all(clients)
