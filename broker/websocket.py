"""MQTT over WebSocket: a WebSocket connection presented to the broker as a byte stream.

::

    browser / React Native ──WS(S), subprotocol "mqtt", on the configured path──▶ websockets server
        binary frames in ──▶ asyncio.StreamReader  ──▶ the broker's reader loop (framing, keepalive,
                                                        size limit: the same code as over TCP)
        the broker's writes ──▶ WebSocketTransport ──▶ one binary frame per flush

The broker serves a WebSocket connection exactly as a TCP one (auth, ACL, limits, keepalive,
presence) because it sees the same ``asyncio.StreamReader``/``StreamWriter`` pair. MQTT packets
may span frames or share one (MQTT 3.1.1 §6; a frame is at most the packet size limit); the
stream does not care. Flow control holds both
ways: a full reader buffer stops reading frames (and websockets' bounded queue stops reading the
socket), and a write buffer over the high-water mark pauses the broker's writers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode

logger = logging.getLogger(__name__)

HIGH_WATER = 256 * 1024
"""Bytes queued for a WebSocket client beyond which the broker's writes to it wait."""
LOW_WATER = 64 * 1024
FRAME_BYTES = 64 * 1024
"""The most bytes sent in one frame (a larger write goes out in several)."""
READ_AHEAD = 64 * 1024
"""Bytes read from frames ahead of the broker's reader before reading stops."""


class WebSocketTransport(asyncio.Transport):
    """An asyncio transport over a websockets server connection (binary frames)."""

    def __init__(self, connection: ServerConnection, protocol: asyncio.StreamReaderProtocol) -> None:
        extra: dict[str, object] = {"peername": connection.remote_address}
        self._connection = connection
        self._protocol = protocol
        self._outgoing = bytearray()
        self._has_output = asyncio.Event()
        self._reading = asyncio.Event()
        self._reading.set()
        self._closing = False
        self._close_code = CloseCode.NORMAL_CLOSURE
        self._in_flight = 0  # bytes of the frame being sent
        self._writing_paused = False
        self._lost = False
        ssl_object = connection.transport.get_extra_info("ssl_object") if connection.transport else None
        if ssl_object is not None:
            extra["ssl_object"] = ssl_object
        super().__init__(extra=extra)

    # --- the broker's side ----------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._lost:
            return
        self._outgoing += data
        self._has_output.set()
        if not self._writing_paused and len(self._outgoing) > HIGH_WATER:
            self._writing_paused = True
            self._protocol.pause_writing()

    def get_write_buffer_size(self) -> int:
        """Bytes not yet taken by the socket: queued here, in the frame being sent, and in the
        connection's own transport (what the broker's slow-consumer limits look at)."""
        socket = self._connection.transport
        below = socket.get_write_buffer_size() if socket is not None else 0
        return len(self._outgoing) + self._in_flight + below

    def can_write_eof(self) -> bool:
        return False

    def is_closing(self) -> bool:
        return self._closing or self._lost

    def close(self) -> None:
        """Send what is queued, then close the WebSocket (the sender does both)."""
        self._closing = True
        self._has_output.set()
        self._reading.set()  # the receiver drains until the closing handshake is done

    def abort(self) -> None:
        self._closing = True
        self._outgoing.clear()
        if self._connection.transport is not None:
            self._connection.transport.abort()
        self._has_output.set()

    def pause_reading(self) -> None:
        self._reading.clear()

    def resume_reading(self) -> None:
        self._reading.set()

    def is_reading(self) -> bool:
        return self._reading.is_set()

    # --- the pumps (run by serve_websocket) ------------------------------------------------------

    async def receive(self) -> None:
        """WebSocket frames into the stream until the connection ends (then EOF). Once the broker
        is done with the connection, frames are still read (and dropped) until the closing
        handshake completes: a peer's close frame must not wait behind unread frames."""
        ended = False
        try:
            while True:
                if not self._closing:
                    await self._reading.wait()
                message = await self._connection.recv()
                if self._closing or ended:
                    continue
                if isinstance(message, str):  # MQTT is binary: a text frame is a broken client
                    logger.debug("text frame from a WebSocket client: closing it (1003)")
                    ended = True
                    self._protocol.eof_received()
                    self._close_code = CloseCode.UNSUPPORTED_DATA
                    self.close()
                    continue
                self._protocol.data_received(message)
        except ConnectionClosed:
            pass
        finally:
            if not ended:
                self._protocol.eof_received()

    async def send(self) -> None:
        """Queued bytes out as binary frames; after close(), the rest, then the closing handshake."""
        try:
            while True:
                await self._has_output.wait()
                self._has_output.clear()
                while self._outgoing:
                    data = bytes(self._outgoing[:FRAME_BYTES])
                    del self._outgoing[:FRAME_BYTES]
                    self._in_flight = len(data)
                    await self._connection.send(data)
                    self._in_flight = 0
                    if self._writing_paused and len(self._outgoing) <= LOW_WATER:
                        self._writing_paused = False
                        self._protocol.resume_writing()
                if self._closing:
                    break
            await self._connection.close(self._close_code)
        except ConnectionClosed:
            pass
        finally:
            self.connection_lost()

    def connection_lost(self) -> None:
        if not self._lost:
            self._lost = True
            self._outgoing.clear()
            if self._writing_paused:
                self._writing_paused = False
                self._protocol.resume_writing()
            self._protocol.connection_lost(None)


async def serve_websocket(
    connection: ServerConnection,
    serve_stream: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> None:
    """Serve one WebSocket connection as a stream: ``serve_stream`` gets a reader and a writer
    as a TCP connection's; both pumps end with the connection. (The reader's limit only decides
    when reading pauses: a larger packet is still read whole, as it arrives.)"""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=READ_AHEAD // 2, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport = WebSocketTransport(connection, protocol)
    protocol.connection_made(transport)
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    receiving = asyncio.create_task(transport.receive(), name="ws-receive")
    sending = asyncio.create_task(transport.send(), name="ws-send")
    try:
        await serve_stream(reader, writer)
    finally:
        transport.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await asyncio.wait([sending])
        for task in (receiving, sending):
            task.cancel()
        await asyncio.gather(receiving, sending, return_exceptions=True)


def path_of(request_path: str) -> str:
    """The path of a request target, without its query."""
    return request_path.split("?", 1)[0]
