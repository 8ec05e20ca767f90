"""The broker's inbound reader: PUBLISH/PUBACK/PINGREQ handled inline, everything else through
amqtt's handlers; malformed and forbidden packets close only their own connection."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import struct
from collections.abc import AsyncIterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.serve import Listeners, serve_broker
from broker.server import MqchatBroker
from mqchat import mqtt_codec as codec
from mqchat.tokens import issue_token
from tests.mqtt_raw import connect_packet, packet, publish_packet, subscribe_packet

SECRET = secrets.token_urlsafe(32)


@pytest.fixture
async def broker() -> AsyncIterator[MqchatBroker]:
    async with serve_broker(listeners=Listeners(host="127.0.0.1", mqtt=0), secret=SECRET) as b:
        yield b


class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self._buffer = bytearray()
        self._ready: list[tuple[int, bytes]] = []

    async def packet(self, timeout: float = 5.0) -> tuple[int, bytes]:
        """(first byte, body) of the next packet from the broker, framed by the codec."""
        async with asyncio.timeout(timeout):
            while not self._ready:
                chunk = await self.reader.read(65536)
                if not chunk:
                    raise ConnectionError("closed by the broker")
                self._buffer += chunk
                self._ready = codec.split_packets(self._buffer)
        return self._ready.pop(0)

    async def closed_by_broker(self, timeout: float = 5.0) -> bool:
        try:
            async with asyncio.timeout(timeout):
                while await self.reader.read(65536):
                    pass
            return True
        except TimeoutError:
            return False
        except ConnectionError:
            return True

    def send(self, data: bytes) -> None:
        self.writer.write(data)


@contextlib.asynccontextmanager
async def device(broker: MqchatBroker, user: str, dev: str) -> AsyncIterator[Conn]:
    reader, writer = await asyncio.open_connection("127.0.0.1", broker.bound_port)
    conn = Conn(reader, writer)
    try:
        conn.send(connect_packet(dev, user, issue_token(secret=SECRET, user=user, device=dev, ttl_s=60)))
        first, body = await conn.packet()
        assert (first, body[1]) == (0x20, 0), "CONNACK accepted"
        yield conn
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_publish_puback_ping_and_subscribe_through_the_lean_reader(broker: MqchatBroker) -> None:
    async with device(broker, "alice", "a1") as alice:
        alice.send(subscribe_packet(7, "u/alice/in"))
        first, body = await alice.packet()
        assert (first, codec.decode_suback(body)) == (0x90, (7, [1]))
        alice.send(codec.PINGREQ_BYTES)
        assert await alice.packet() == (codec.PINGRESP_BYTES[0], b"")
        # A QoS 1 publish on its own out topic is acknowledged (and, with no bridge here, routed
        # to subscribers of that topic: none).
        alice.send(publish_packet("u/alice/a1/out", b"{}", qos=1, packet_id=300))
        first, body = await alice.packet()
        assert (first, codec.decode_puback(body)) == (0x40, 300)
        # The broker's own QoS 1 delivery is released by the device's PUBACK.
        await broker.internal_message_broadcast("u/alice/in", b"hello", 1)
        first, body = await alice.packet()
        assert first >> 4 == codec.PacketType.PUBLISH
        publish = codec.decode_publish(first, body)
        assert (publish.topic, publish.qos, publish.payload) == ("u/alice/in", 1, b"hello")
        packet_id = publish.packet_id
        assert packet_id is not None
        session = broker._sessions["a1"][0]
        assert packet_id in session.inflight_out
        alice.send(codec.encode_puback(packet_id))
        for _ in range(100):
            if packet_id not in session.inflight_out:
                break
            await asyncio.sleep(0.01)
        assert packet_id not in session.inflight_out


@pytest.mark.parametrize(
    "bad",
    [
        bytes([0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F]),  # a remaining length of five bytes
        packet(0x32, b"\x00\x10u/a"),  # topic longer than the packet
        packet(0x30, b"\x00\x02\xff\xfe" + b"x"),  # topic not UTF-8
        packet(0x20, b"\x00\x00"),  # CONNACK: only a server sends it
        packet(0x10, b"\x00\x04MQTT\x04\x02\x00\x1e\x00\x01z"),  # a second CONNECT
        packet(0x30, b"\x00\x03a/#" + b"x"),  # a wildcard in a PUBLISH topic
        packet(0x36, b"\x00\x0cu/bob/b1/out" + struct.pack("!H", 4) + b"{}"),  # QoS 3
        packet(0x82, struct.pack("!H", 5)),  # a SUBSCRIBE without a topic filter
        packet(0xA2, struct.pack("!H", 6)),  # an UNSUBSCRIBE without a topic filter
        publish_packet("u/bob/b1/out", b"{}", qos=1, packet_id=8, retain=True),  # retained, from a device
    ],
)
async def test_a_malformed_or_forbidden_packet_closes_only_its_connection(broker: MqchatBroker, bad: bytes) -> None:
    async with device(broker, "bob", "b1") as bob, device(broker, "carol", "c1") as carol:
        bob.send(bad)
        assert await bob.closed_by_broker()
        carol.send(codec.PINGREQ_BYTES)
        assert await carol.packet() == (0xD0, b""), "the broker serves everyone else"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=st.binary(min_size=1, max_size=300))
async def test_fuzzed_bytes_after_connect_never_hurt_the_broker(broker: MqchatBroker, garbage: bytes) -> None:
    async with device(broker, "eve", "e1") as eve:
        eve.send(garbage)
        await asyncio.sleep(0.01)
    async with device(broker, "dan", "d1") as dan:
        dan.send(codec.PINGREQ_BYTES)
        assert await dan.packet() == (0xD0, b"")


def _mqtt5_connect(client_id: str, username: str, password: str) -> bytes:
    """An MQTT 5 CONNECT: level 5, and a properties field (here: session expiry 60 s) that a
    3.1.1 decoder would misread as the start of the payload."""
    properties = bytes([0x11]) + struct.pack("!I", 60)
    payload = b"".join(codec.encode_string(f) for f in (client_id, username, password))
    variable = codec.encode_string("MQTT") + bytes([5, 0xC2]) + struct.pack("!H", 30)
    return packet(0x10, variable + bytes([len(properties)]) + properties + payload)


def _mqtt31_connect(client_id: str) -> bytes:
    variable = codec.encode_string("MQIsdp") + bytes([3, 0x02]) + struct.pack("!H", 30)
    return packet(0x10, variable + codec.encode_string(client_id))


@pytest.mark.parametrize("level", ["5", "3.1"])
async def test_a_connect_of_another_protocol_level_gets_connack_1_at_once(broker: MqchatBroker, level: str) -> None:
    """docs/protocol.md: CONNACK 0x01 (unacceptable protocol version), at once, not after the
    CONNECT timeout (the payload used to be decoded with the 3.1.1 layout first)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", broker.bound_port)
    conn = Conn(reader, writer)
    try:
        token = issue_token(secret=SECRET, user="alice", device="a5", ttl_s=60)
        conn.send(_mqtt5_connect("a5", "alice", token) if level == "5" else _mqtt31_connect("a31"))
        first, body = await conn.packet(timeout=2.0)
        assert (first, body) == (0x20, bytes([0, 1]))
        assert await conn.closed_by_broker(timeout=2.0)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    async with device(broker, "alice", "a4"):
        pass  # and 3.1.1 still connects


async def test_subscribe_grants_only_what_is_delivered(broker: MqchatBroker) -> None:
    """QoS 3 is refused (0x80); QoS 2 is granted as 1 (deliveries are QoS 0 or 1)."""
    async with device(broker, "alice", "a1") as alice:
        alice.send(subscribe_packet(1, "u/alice/in", 3))
        assert await alice.packet() == (0x90, codec.encode_suback(1, [codec.SUBACK_FAILURE])[2:])
        alice.send(subscribe_packet(2, "u/alice/in", 2))
        assert await alice.packet() == (0x90, codec.encode_suback(2, [1])[2:])


@pytest.mark.parametrize(("published", "granted", "delivered"), [(1, 0, 0), (0, 1, 0), (1, 1, 1), (1, 2, 1)])
async def test_a_message_is_delivered_at_the_lower_of_published_and_granted_qos(
    broker: MqchatBroker, published: int, granted: int, delivered: int
) -> None:
    """[MQTT-3.8.4-6]: a QoS 0 subscriber never owes the server a PUBACK (battery on a phone)."""
    async with device(broker, "alice", "a1") as alice:
        alice.send(subscribe_packet(1, "u/alice/in", granted))
        await alice.packet()  # SUBACK
        await broker.internal_message_broadcast("u/alice/in", b"hello", published)
        first, body = await alice.packet()
        assert first & 0xF0 == 0x30
        assert (first >> 1) & 3 == delivered
        assert body.endswith(b"hello")


async def test_a_clean_session_is_never_resumed_even_by_an_immediate_reconnect(broker: MqchatBroker) -> None:
    """[MQTT-3.2.2-2]: CONNECT with clean session 0 after a clean session gets "session present" 0,
    also when the clean connection has not ended yet (here it is still open: a takeover)."""
    token = issue_token(secret=SECRET, user="alice", device="a9", ttl_s=60)
    reader, first_writer = await asyncio.open_connection("127.0.0.1", broker.bound_port)
    conn = Conn(reader, first_writer)
    conn.send(connect_packet("a9", "alice", token, clean=True))
    assert await conn.packet() == (0x20, b"\x00\x00")
    reader, writer = await asyncio.open_connection("127.0.0.1", broker.bound_port)
    again = Conn(reader, writer)
    try:
        again.send(connect_packet("a9", "alice", token, clean=False))
        assert await again.packet() == (0x20, b"\x00\x00"), "no session present"
        again.send(packet(0xE0, b""))
    finally:
        writer.close()
        first_writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", broker.bound_port)
    resumed = Conn(reader, writer)
    try:
        resumed.send(connect_packet("a9", "alice", token, clean=False))
        assert await resumed.packet() == (0x20, b"\x01\x00"), "the persistent session is resumed"
    finally:
        writer.close()
