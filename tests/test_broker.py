"""Broker-level fixes in mqchat's amqtt subclass."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest
from amqtt.adapters import StreamWriterAdapter

from broker.amqtt_compat import ClosingStreamWriter


class _PeerGoneWriter:
    """An asyncio StreamWriter whose peer has already hung up: drain() raises."""

    def __init__(self) -> None:
        self.closed = False

    async def drain(self) -> None:
        raise ConnectionResetError("Connection lost")

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    async def wait_closed(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


async def test_stock_amqtt_writer_leaves_the_socket_open_when_the_peer_is_gone() -> None:
    """The defect: amqtt 0.12 drains before closing, so the close never happens."""
    writer = _PeerGoneWriter()
    with pytest.raises(ConnectionResetError):
        await StreamWriterAdapter(writer).close()  # type: ignore[arg-type]
    assert not writer.closed


async def test_our_writer_closes_the_socket_when_the_peer_is_gone() -> None:
    writer = _PeerGoneWriter()
    adapter = ClosingStreamWriter(writer)  # type: ignore[arg-type]
    await adapter.close()
    assert writer.closed
    await adapter.close()  # idempotent


async def test_the_broker_serves_connections_with_our_writer() -> None:
    from broker.server import MqchatBroker

    seen: list[object] = []

    class Probe(MqchatBroker):
        async def _client_connected(self, listener_name: str, reader: Any, writer: Any) -> None:
            seen.append(writer)
            await writer.close()

    broker = Probe({"listeners": {"default": {"type": "tcp", "bind": "127.0.0.1:0"}}, "plugins": {}})
    await broker.start()
    try:
        _, w = await asyncio.open_connection("127.0.0.1", broker.bound_port)
        for _ in range(100):
            if seen:
                break
            await asyncio.sleep(0.02)
        w.close()
        await w.wait_closed()
    finally:
        await broker.shutdown()
    assert len(seen) == 1
    assert isinstance(seen[0], ClosingStreamWriter)


class _Authority:
    async def may_subscribe(self, session: Any, topic_filter: str) -> bool:
        return False

    def end_subscription(self, topic_filter: str, session: Any) -> None:
        pass


def test_a_membership_change_while_the_sync_is_stopped_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    from broker.membership_sync import MembershipSync
    from broker.routing import SubscriptionIndex

    sync = MembershipSync(authority=_Authority(), subscriptions=SubscriptionIndex(), membership=None)
    change = json.dumps({"conv": "g1", "kind": "group", "removed": ["bob"]}).encode()
    with caplog.at_level(logging.DEBUG, logger="broker.membership_sync"):
        sync.changed(change)
    assert "not rechecked" in caplog.text


async def test_a_presence_state_not_retained_yet_is_taken_from_the_registry() -> None:
    from broker.delivery import Delivery
    from broker.limits import BrokerLimits
    from broker.presence_reports import PresenceReports
    from broker.routing import SubscriptionIndex
    from storage.presence import MemoryPresence

    registry = MemoryPresence()
    await registry.connected("alice", "a1", "1")  # before this broker listens to the registry
    retained: dict[str, Any] = {}
    delivery = Delivery(limits=BrokerLimits(), subscriptions=SubscriptionIndex(), sessions={}, retained=retained)
    reports = PresenceReports(presence=registry, delivery=delivery)
    assert await reports.retain_current("alice")
    assert json.loads(retained["p/alice"].data)["state"] == "online"
    assert not await reports.retain_current("alice"), "a retained state is current: left as it is"
