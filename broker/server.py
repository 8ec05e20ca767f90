"""The broker process's core: an amqtt ``Broker`` subclass and its configuration."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from amqtt.adapters import StreamReaderAdapter, StreamWriterAdapter
from amqtt.broker import Broker
from amqtt.session import Session

from broker.plugins import is_service

logger = logging.getLogger(__name__)


class ClosingStreamWriter(StreamWriterAdapter):
    """amqtt's stream writer drains before it closes; when the peer already hung up the drain
    raises and the socket is never closed (a file descriptor leaked per such disconnect). This
    one closes the socket whatever the drain does."""

    async def close(self) -> None:
        if self.is_closed:
            return
        try:
            await super().close()
        except (ConnectionError, OSError):
            self._writer.close()


class MqchatBroker(Broker):
    """amqtt's broker with mqchat's policies.

    - Only the service (the bridge) may leave retained messages: a device's retained publish
      is routed but not retained, so it can never be replayed to other connections.
    - Client sockets are always closed (see ClosingStreamWriter).
    """

    async def stream_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
    ) -> None:
        await self._client_connected(listener_name, StreamReaderAdapter(reader), ClosingStreamWriter(writer))

    async def retain_message(
        self,
        source_session: Session | None,
        topic_name: str | None,
        data: bytes | bytearray | None,
        qos: int | None = None,
    ) -> None:
        if source_session is not None and not is_service(source_session):
            logger.info("ignored a retained publish from device %s", source_session.client_id)
            return
        await super().retain_message(source_session, topic_name, data, qos)

    @property
    def bound_port(self) -> int:
        """The TCP port of the default listener (useful with port 0)."""
        server = self._servers["default"]
        port: int = server.instance.sockets[0].getsockname()[1]
        return port


def broker_config(*, host: str, port: int, secret: str, max_connections: int = 0) -> dict[str, Any]:
    """amqtt configuration for mqchat's broker."""
    return {
        "listeners": {
            "default": {"type": "tcp", "bind": f"{host}:{port}", "max_connections": max_connections},
        },
        "plugins": {
            "broker.plugins.JwtAuthPlugin": {"secret": secret},
            "broker.plugins.TopicAclPlugin": {},
            "broker.plugins.MetricsPlugin": {},
        },
    }


@asynccontextmanager
async def serve_broker(*, host: str, port: int, secret: str) -> AsyncIterator[MqchatBroker]:
    """Run the broker until the block exits."""
    broker = MqchatBroker(broker_config(host=host, port=port, secret=secret))
    await broker.start()
    logger.info("MQTT broker listening on %s:%d", host, broker.bound_port)
    try:
        yield broker
    finally:
        await broker.shutdown()
