"""A device that stops reading costs bounded memory: past one bound its QoS 0 messages are
dropped (counted), past a second its connection is closed (it catches up over HTTP when it is
back). Everyone else's deliveries go on as before."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator

import pytest
from prometheus_client import REGISTRY

from broker.limits import BrokerLimits
from broker.serve import Listeners, serve_broker
from broker.server import MqchatBroker
from mqchat.tokens import issue_token
from tests.mqtt_raw import connect_packet, subscribe_packet
from tests.test_broker_reader import SECRET, Conn, device

LIMITS = BrokerLimits(max_buffered_qos0=64 * 1024, max_buffered_bytes=512 * 1024)
PAYLOAD = b"x" * 1024


@pytest.fixture
async def broker() -> AsyncIterator[MqchatBroker]:
    async with serve_broker(listeners=Listeners(host="127.0.0.1", mqtt=0), secret=SECRET, limits=LIMITS) as b:
        yield b


def dropped(reason: str) -> float:
    return REGISTRY.get_sample_value("mqchat_broker_messages_dropped_total", {"reason": reason}) or 0.0


async def stalled_device(broker: MqchatBroker, user: str, dev: str) -> tuple[Conn, asyncio.StreamWriter]:
    """A device that subscribes, then never reads again (tiny buffers on both ends, so the
    broker's own write buffer is what fills)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", broker.bound_port))
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock)
    conn = Conn(reader, writer)
    conn.send(connect_packet(dev, user, issue_token(secret=SECRET, user=user, device=dev, ttl_s=60)))
    assert (await conn.packet())[0] == 0x20
    conn.send(subscribe_packet(1, f"u/{user}/in", 1))
    assert (await conn.packet())[0] == 0x90
    server_side = broker._get_handler(broker._sessions[dev][0])._transport().get_extra_info("socket")
    server_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    return conn, writer


async def test_a_stalled_subscriber_has_bounded_buffers_and_others_are_served(broker: MqchatBroker) -> None:
    conn, writer = await stalled_device(broker, "slow", "slow1")
    handler = broker._get_handler(broker._sessions["slow1"][0])
    qos0_before, closed_before = dropped("slow_consumer_qos0"), dropped("slow_consumer_closed")
    async with device(broker, "fast", "fast1") as fast:
        fast.send(subscribe_packet(1, "u/fast/in", 1))
        await fast.packet()
        # QoS 0: dropped once the unsent bytes pass the first bound; the buffer stays bounded.
        largest = 0
        for _ in range(2000):
            await broker.internal_message_broadcast("u/slow/in", PAYLOAD, 0)
            largest = max(largest, handler.buffered_bytes())
        assert largest <= LIMITS.max_buffered_qos0 + 2 * len(PAYLOAD)
        assert dropped("slow_consumer_qos0") - qos0_before > 1000
        # Someone else is not held up by it.
        started = time.perf_counter()
        await broker.internal_message_broadcast("u/fast/in", b"for you", 1)
        _, body = await fast.packet()
        assert body.endswith(b"for you")
        fast_ms = (time.perf_counter() - started) * 1000
        # QoS 1: the connection is closed once the unsent bytes pass the second bound.
        for _ in range(2000):
            if (
                conn.reader.at_eof()
                or "slow1" not in broker._sessions
                or dropped("slow_consumer_closed") > closed_before
            ):
                break
            await broker.internal_message_broadcast("u/slow/in", PAYLOAD, 1)
            largest = max(largest, handler.buffered_bytes())
            await asyncio.sleep(0)
        assert dropped("slow_consumer_closed") - closed_before == 1
        assert largest <= LIMITS.max_buffered_bytes + 2 * len(PAYLOAD)
        print(f"slow reader: largest unsent buffer {largest} bytes; another device's delivery {fast_ms:.1f} ms")
    writer.close()
