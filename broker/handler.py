"""The per-connection protocol handler and reader, with mqchat's fixes to amqtt 0.12.

- Keepalive is enforced: no packet within the allowance (1.5 × the client's keepalive, see
  ``MqchatBroker``) closes the connection as a network failure, so the will is published and
  the disconnect hook fires. amqtt only logs the read timeout and keeps waiting forever.
- Outgoing QoS 1 messages stay in flight until PUBACKed: while connected there is no timeout
  (MQTT 3.1.1 resends only on reconnect), and a message not acked when the connection drops is
  kept in the persistent session and resent with DUP on reconnect. amqtt gives up after 5 s
  and forgets the message.
- A packet larger than the configured maximum closes the connection before it is read.
- A session's state is three words, not a ``transitions.Machine``: building that machine was
  half the cost of a connect and a large part of an idle connection's memory.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from amqtt.adapters import StreamReaderAdapter
from amqtt.errors import MQTTError
from amqtt.mqtt.connack import (
    BAD_USERNAME_PASSWORD,
    IDENTIFIER_REJECTED,
    UNACCEPTABLE_PROTOCOL_VERSION,
    ConnackPacket,
)
from amqtt.mqtt.connect import ConnectPacket
from amqtt.mqtt.constants import QOS_1
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import OUTGOING, Session
from transitions import MachineError

from broker.queues import LeanQueue

MQTT_3_1_1 = 4

logger = logging.getLogger(__name__)


class PacketTooLarge(Exception):
    """A client sent a packet over the size limit; its connection is closed."""


class InboundQueue(LeanQueue):
    """A session's bounded queue of received publishes (its reader waits while it is full)."""


class LimitedReader(StreamReaderAdapter):
    """Refuses to read a packet body larger than ``max_packet_bytes``, and stops reading while
    the session's inbound queue is full, so a flooding publisher is slowed down by TCP instead
    of growing the broker's memory (its PUBACKs wait too)."""

    def __init__(self, reader: Any, *, max_packet_bytes: int) -> None:
        super().__init__(reader)
        self._max = max_packet_bytes
        self.inbound: InboundQueue | None = None  # set once the session is known

    async def read(self, n: int = -1) -> bytes:
        if n > self._max:
            raise PacketTooLarge(f"packet of {n} bytes over the limit of {self._max}")
        if self.inbound is not None:
            await self.inbound.wait_not_full()
        data: bytes = await super().read(n)
        return data


class SessionStates:
    """What amqtt uses of a session's state machine: new → connected ⇄ disconnected."""

    __slots__ = ("_session", "state")

    def __init__(self, session: Session) -> None:
        self._session = session
        self.state = "new"

    def connect(self) -> None:
        if self.state == "connected":
            raise MachineError("session is already connected")
        self.state = "connected"
        self._session._on_enter_connected()

    def disconnect(self) -> None:
        self.state = "disconnected"
        self._session._on_enter_disconnected()

    def is_connected(self) -> bool:
        return self.state == "connected"


class MqchatSession(Session):
    def __init__(self) -> None:
        super().__init__()
        self.retained_messages = LeanQueue()
        self.delivered_message_queue = LeanQueue()

    def _init_states(self) -> None:
        self.transitions = SessionStates(self)


def publish_bytes(topic: bytes, payload: bytes, qos: int, packet_id: int) -> bytes:
    """One PUBLISH packet, encoded directly (no packet objects)."""
    body_len = 2 + len(topic) + (2 if qos else 0) + len(payload)
    header = bytearray([0x30 | (qos << 1)])
    n = body_len
    while True:
        byte, n = n % 128, n // 128
        header.append(byte | (0x80 if n else 0))
        if not n:
            break
    header += len(topic).to_bytes(2, "big") + topic
    if qos:
        header += packet_id.to_bytes(2, "big")
    return bytes(header) + payload


class MqchatProtocolHandler(BrokerProtocolHandler):
    def write_publish(self, data: bytes) -> bool:
        """Queue an encoded PUBLISH on the socket now; False when the connection is gone."""
        writer = self.writer
        if writer is None or getattr(writer, "is_closed", False):
            return False
        try:
            writer.write(data)
        except (ConnectionError, OSError, RuntimeError):
            return False
        return True

    async def handle_puback(self, puback: Any) -> None:
        packet_id = puback.variable_header.packet_id if puback.variable_header is not None else None
        if packet_id is not None and packet_id not in self._puback_waiters and self.session is not None:
            self.session.inflight_out.pop(packet_id, None)  # a message sent by the broker's fast path
            return
        await super().handle_puback(puback)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pending_subscriptions = LeanQueue()
        self._pending_unsubscriptions = LeanQueue()

    @classmethod
    async def init_from_connect(
        cls, reader: Any, writer: Any, plugins_manager: Any, loop: asyncio.AbstractEventLoop | None = None
    ) -> tuple[MqchatProtocolHandler, Session]:
        """Read and check CONNECT; answer protocol-level refusals; build the incoming session."""
        connect = await ConnectPacket.from_stream(reader)
        header, payload = connect.variable_header, connect.payload
        if header is None or payload is None or payload.client_id is None:
            raise MQTTError("malformed CONNECT")
        if header.reserved_flag or connect.proto_name != "MQTT":
            raise MQTTError("[MQTT-3.1.2-1/3] not an MQTT CONNECT")
        if connect.will_flag and (connect.will_topic is None or connect.will_message is None):
            raise MQTTError("will flag without will topic and message")
        refusal = None
        if connect.proto_level != MQTT_3_1_1:
            refusal = UNACCEPTABLE_PROTOCOL_VERSION
        elif (
            (connect.password_flag and not connect.username_flag)
            or (connect.username_flag and connect.username is None)
            or (connect.password_flag and connect.password is None)
        ):
            refusal = BAD_USERNAME_PASSWORD
        elif not connect.clean_session_flag and payload.client_id_is_random:
            refusal = IDENTIFIER_REJECTED  # [MQTT-3.1.3-8] a persistent session needs a client id
        if refusal is not None:
            await ConnackPacket.build(0, refusal).to_stream(writer)
            await writer.close()
            raise MQTTError(f"CONNECT refused with return code {refusal}")
        session = MqchatSession()
        session.client_id = connect.client_id
        session.clean_session = connect.clean_session_flag
        session.will_flag = connect.will_flag
        session.will_retain = connect.will_retain_flag
        session.will_qos = connect.will_qos
        session.will_topic = connect.will_topic
        session.will_message = connect.will_message
        session.username = connect.username
        session.password = connect.password
        session.keep_alive = max(connect.keep_alive, 0)
        peer = writer.get_peer_info()
        if peer is not None:
            session.remote_address, session.remote_port = peer
        return cls(plugins_manager, loop=loop), session

    def handle_read_timeout(self) -> None:
        session = self.session
        logger.info("keepalive expired for client %s; closing the connection", session.client_id if session else None)
        waiter = self._disconnect_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)  # as if the network failed: the will is published

    async def _handle_qos1_message_flow(self, app_message: Any) -> None:
        if app_message.direction != OUTGOING or self.session is None or app_message.qos != QOS_1:
            await super()._handle_qos1_message_flow(app_message)
            return
        packet_id = app_message.packet_id
        self.session.inflight_out[packet_id] = app_message
        retry = app_message.publish_packet is not None
        publish_packet = app_message.build_publish_packet(dup=retry)
        await self._send_packet(publish_packet)
        app_message.publish_packet = publish_packet
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._puback_waiters[packet_id] = waiter
        try:
            app_message.puback_packet = await waiter
        finally:
            self._puback_waiters.pop(packet_id, None)
        # Only an acknowledged message leaves the session; a cancelled wait (the connection
        # closed) keeps it for redelivery when the persistent session reconnects.
        self.session.inflight_out.pop(packet_id, None)
