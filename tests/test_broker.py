"""Broker-level fixes in mqchat's amqtt subclass."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from amqtt.adapters import StreamWriterAdapter

from broker.server import ClosingStreamWriter


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
