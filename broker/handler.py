"""The per-connection protocol handler and reader, with mqchat's fixes to amqtt 0.12.

- Keepalive is enforced: no packet within the allowance (1.5 × the client's keepalive, see
  ``Admission.fit``) closes the connection as a network failure, so the will is published and
  the disconnect hook fires. amqtt only logs the read timeout and keeps waiting forever.
- Outgoing QoS 1 messages stay in flight until PUBACKed: while connected there is no timeout
  (MQTT 3.1.1 resends only on reconnect), and a message not acked when the connection drops is
  kept in the persistent session and resent with DUP on reconnect. amqtt gives up after 5 s
  and forgets the message.
- A packet larger than the configured maximum closes the connection before it is read.
- The inbound side reads each packet with two awaits (fixed header, body) straight from the
  socket's stream, framed and decoded by ``mqchat.mqtt_codec``, and handles PUBLISH (QoS 0/1),
  PUBACK and PINGREQ inline, writing PUBACK and PINGRESP bytes directly. amqtt reads a packet in
  many small awaits, fires a plugin event and starts a task per packet; every other packet type
  still goes to amqtt's handlers that way.

The CONNECT is read in ``broker.connect``; a session's lean state is in ``broker.session``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from amqtt.adapters import BufferReader, StreamReaderAdapter
from amqtt.errors import MQTTError, NoDataError
from amqtt.mqtt import packet_class
from amqtt.mqtt.constants import QOS_1
from amqtt.mqtt.packet import (
    DISCONNECT,
    PINGREQ,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    SUBSCRIBE,
    UNSUBSCRIBE,
    MQTTFixedHeader,
)
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.puback import PubackPacket
from amqtt.mqtt.publish import PublishPacket
from amqtt.session import OUTGOING, IncomingApplicationMessage, Session

from broker.connect import read_connect
from broker.plugins import is_service
from broker.queues import LeanQueue
from broker.session import InboundQueue
from mqchat import mqtt_codec as codec
from mqchat.errors import MqchatError
from mqchat.mqtt_codec import MalformedPacket

logger = logging.getLogger(__name__)


class PacketTooLarge(MqchatError):
    """A client sent a packet over the size limit; its connection is closed."""


class LimitedReader(StreamReaderAdapter):
    """Refuses to read a packet body larger than ``max_packet_bytes``, and stops reading while
    the session's inbound queue is full, so a flooding publisher is slowed down by TCP instead
    of growing the broker's memory (its PUBACKs wait too)."""

    def __init__(self, reader: Any, *, max_packet_bytes: int) -> None:
        super().__init__(reader)
        self.max_packet_bytes = max_packet_bytes
        self.inbound: InboundQueue | None = None  # set once the session is known

    async def read(self, n: int = -1) -> bytes:
        if n > self.max_packet_bytes:
            raise PacketTooLarge(f"packet of {n} bytes over the limit of {self.max_packet_bytes}")
        if self.inbound is not None:
            await self.inbound.wait_not_full()
        data: bytes = await super().read(n)
        return data


class MqchatProtocolHandler(BrokerProtocolHandler):
    def _transport(self) -> Any:
        """The socket's transport (asyncio's or uvloop's: they share the methods, not the classes)."""
        stream = getattr(self.writer, "_writer", None)
        return stream.transport if isinstance(stream, asyncio.StreamWriter) else None

    def buffered_bytes(self) -> int:
        """Bytes written to this connection that the socket has not taken yet."""
        transport = self._transport()
        return int(transport.get_write_buffer_size()) if transport is not None else 0

    def abort(self) -> None:
        """Drop the connection at once, unsent bytes and all (the reader then ends the session)."""
        transport = self._transport()
        if transport is not None:
            transport.abort()

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
        if puback.variable_header is not None:
            self._receive_puback(puback.variable_header.packet_id)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pending_subscriptions = LeanQueue()
        self._pending_unsubscriptions = LeanQueue()
        # (topic, take): publishes on this topic go straight to take(payload), awaited in order,
        # instead of through the session's queue and the broker's message loop (the device's
        # requests to the in-broker bridge).
        self.direct_inbound: tuple[str, Callable[[bytes], Awaitable[None]]] | None = None

    @classmethod
    async def init_from_connect(
        cls, reader: Any, writer: Any, plugins_manager: Any, loop: asyncio.AbstractEventLoop | None = None
    ) -> tuple[MqchatProtocolHandler, Session]:
        """Read and check CONNECT (``broker.connect``); the handler and the incoming session."""
        session = await read_connect(reader, writer)
        return cls(plugins_manager, loop=loop), session

    async def _reader_loop(self) -> None:
        reader, session = self.reader, self.session
        stream = getattr(reader, "_reader", None)
        if not isinstance(reader, LimitedReader) or not isinstance(stream, asyncio.StreamReader) or session is None:
            await super()._reader_loop()
            return
        assert self._reader_ready is not None
        keepalive = session.keep_alive if session.keep_alive > 0 else None
        running: collections.deque[asyncio.Task[None]] = collections.deque()
        while True:
            try:
                self._reader_ready.set()
                while running and running[0].done():
                    running.popleft()
                inbound = reader.inbound
                if inbound is not None and inbound.full():
                    await inbound.wait_not_full()  # TCP pushes back on a flooding publisher
                try:
                    async with asyncio.timeout(keepalive):  # a whole packet within the keepalive allowance
                        header = await stream.readexactly(2)
                        while (decoded := codec.decode_remaining_length(header)) is None:
                            header += await stream.readexactly(1)
                        first, length = header[0], decoded[0]
                        if length > reader.max_packet_bytes:
                            raise PacketTooLarge(
                                f"packet of {length} bytes over the limit of {reader.max_packet_bytes}"
                            )
                        body = await stream.readexactly(length) if length else b""
                except TimeoutError:
                    self.handle_read_timeout()
                    continue
                kind = first >> 4
                if kind in (SUBSCRIBE, UNSUBSCRIBE) and length <= 2:
                    raise MalformedPacket("[MQTT-3.8.3-3/3.10.3-2] SUBSCRIBE or UNSUBSCRIBE without a topic filter")
                if kind == PUBLISH and first & 0x06 != 0x04:  # QoS 0 or 1 (QoS 3: the codec refuses it)
                    await self._receive_publish(first, body)
                elif kind == PUBACK and length == 2:
                    self._receive_puback(int.from_bytes(body, "big"))
                elif kind == PINGREQ:
                    self.write_publish(codec.PINGRESP_BYTES)
                else:
                    task = await self._dispatch(first, body)
                    if task is not None:
                        running.append(task)
            except asyncio.CancelledError:
                break
            except (asyncio.IncompleteReadError, ConnectionError, OSError, NoDataError):
                break  # the peer went away
            except (MalformedPacket, PacketTooLarge, MQTTError) as exc:
                logger.info("closing the connection of %s: %s", session.client_id, exc)
                break
            except Exception as exc:
                logger.warning("unexpected failure reading from %s: %r", session.client_id, exc)
                break
        while running:
            running.popleft().cancel()
        await self.handle_connection_closed()
        self._reader_stopped.set()
        await self.stop()

    async def _receive_publish(self, first: int, body: bytes) -> None:
        """A PUBLISH at QoS 0 or 1, decoded straight into amqtt's message object (no packet object)."""
        message = codec.decode_publish_into(first, body, IncomingApplicationMessage)
        if (first & 0x08 and not message.qos) or self.session is None:
            return  # [MQTT-3.3.1-2] DUP on a QoS 0 message: ignored, as amqtt does
        if message.retain:
            if not is_service(self.session):
                # Devices never leave state on the broker: refused visibly, not dropped in silence.
                raise MalformedPacket("a retained PUBLISH from a device (only the server retains messages)")
            # The broker looks at the packet only for the retain flag.
            message.publish_packet = PublishPacket.build(
                message.topic, message.data, message.packet_id, bool(first & 0x08), message.qos, True
            )
        direct = self.direct_inbound
        queue = self.session.delivered_message_queue
        if direct is not None and message.topic == direct[0]:
            await direct[1](bytes(message.data))  # accepted (queued by the bridge)
        elif message.qos:
            await queue.put(message)
        elif not queue.full():
            queue.put_nowait(message)
        if message.packet_id is not None:
            self.write_publish(codec.encode_puback(message.packet_id))  # PUBACK once it is taken

    def _receive_puback(self, packet_id: int) -> None:
        """A message of ours acknowledged: the slow path's waiter, or the fast path's in-flight entry."""
        waiter = self._puback_waiters.get(packet_id)
        if waiter is not None:
            if not waiter.done():
                waiter.set_result(PubackPacket.build(packet_id))
        elif self.session is not None:
            self.session.inflight_out.pop(packet_id, None)  # a message sent by the broker's fast path

    async def _dispatch(self, first: int, body: bytes) -> asyncio.Task[None] | None:
        """Any other packet: parsed and handled by amqtt, as its reader would."""
        fixed = MQTTFixedHeader(first >> 4, first & 0x0F, len(body))
        packet = await packet_class(fixed).from_stream(BufferReader(body), fixed_header=fixed)
        kind = fixed.packet_type
        handler = {
            SUBSCRIBE: self.handle_subscribe,
            UNSUBSCRIBE: self.handle_unsubscribe,
            PUBLISH: self.handle_publish,  # QoS 2
            PUBREC: self.handle_pubrec,
            PUBREL: self.handle_pubrel,
            PUBCOMP: self.handle_pubcomp,
            DISCONNECT: self.handle_disconnect,
        }.get(kind)  # a second CONNECT, or a packet only a server sends, closes the connection
        if handler is None:
            raise MalformedPacket(f"a client may not send packet type {kind}")
        # A task per packet, as amqtt's own reader does: its handlers wait on the broker (a
        # SUBSCRIBE waits for the ACL and the broker's subscription loop, a QoS 2 flow for its
        # PUBREL) while this reader goes on reading. The tasks belong to this connection: they
        # are cancelled when its reader ends.
        return asyncio.create_task(handler(packet), name=f"mqtt-{kind}")

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
