"""The load generator's MQTT 3.1.1 client: one small ``asyncio.Protocol`` per connection.

::

    MqttClient (asyncio.Protocol, raw socket, no third-party MQTT code)
      ├─ CONNECT(username, password, clean session, keepalive) ─▶ CONNACK
      ├─ SUBSCRIBE ─▶ SUBACK          PUBLISH QoS0/1 out ─▶ PUBACK (inflight window)
      ├─ PUBLISH QoS0/1 in ─▶ PUBACK ─▶ on_message(topic, payload, qos)
      └─ PINGREQ every keepalive, DISCONNECT

A client costs one small object, one transport and one timer, so one process holds ~10,000
idle connections. Every packet is encoded and decoded by :mod:`mqchat.mqtt_codec`.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

from mqchat import mqtt_codec as codec
from mqchat.errors import MqchatError

__all__ = ["ConnectRefused", "Creds", "LoadgenError", "MessageCallback", "MqttClient", "connect"]

MessageCallback = Callable[[str, bytes, int], None]


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
