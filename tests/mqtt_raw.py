"""A tiny raw-socket MQTT 3.1.1 client for broker tests: exact control over every packet.

Packets are framed and encoded by ``mqchat.mqtt_codec``, as the broker and the load generator do.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from mqchat import mqtt_codec as codec


def packet(first: int, body: bytes) -> bytes:
    return codec.encode_packet(first, body)


def connect_packet(
    client_id: str,
    username: str | None = None,
    password: str | None = None,
    *,
    keepalive: int = 30,
    clean: bool = True,
    will: tuple[str, bytes] | None = None,
) -> bytes:
    return codec.encode_connect(
        client_id, username, password, keepalive=keepalive, clean_session=clean, will=will, will_qos=1
    )


def subscribe_packet(packet_id: int, topic: str, qos: int = 1) -> bytes:
    return codec.encode_subscribe(packet_id, [(topic, qos)])


def publish_packet(topic: str, payload: bytes, *, qos: int = 0, packet_id: int = 0, retain: bool = False) -> bytes:
    return codec.encode_publish(topic, payload, qos, packet_id, retain=retain)


def puback_packet(packet_id: int) -> bytes:
    return codec.encode_puback(packet_id)


@dataclass
class Packet:
    type: int
    flags: int
    body: bytes

    def _publish(self) -> codec.Publish:
        return codec.decode_publish(0x30 | self.flags, self.body)

    @property
    def topic(self) -> str:
        return self._publish().topic

    @property
    def qos(self) -> int:
        return (self.flags >> 1) & 3

    @property
    def dup(self) -> bool:
        return bool(self.flags & 0x08)

    @property
    def packet_id(self) -> int:
        if self.type == codec.PacketType.PUBLISH:
            return self._publish().packet_id or 0
        return codec.decode_puback(self.body[:2])

    @property
    def payload(self) -> bytes:
        return self._publish().payload


class RawClient:
    """Blocking client over one TCP socket; every read has a timeout."""

    def __init__(self, port: int, *, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self._buf = bytearray()
        self._ready: list[tuple[int, bytes]] = []
        self.early: list[Packet] = []  # PUBLISH packets that arrived while waiting for an ack

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read(self) -> Packet:
        while not self._ready:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed by the broker")
            self._buf += chunk
            self._ready = codec.split_packets(self._buf)
        first, body = self._ready.pop(0)
        return Packet(first >> 4, first & 0x0F, body)

    def connect(self, client_id: str, username: str | None, password: str | None, **kw: object) -> int:
        """Send CONNECT; return the CONNACK return code."""
        self.send(connect_packet(client_id, username, password, **kw))  # type: ignore[arg-type]
        ack = self.read()
        assert ack.type == codec.PacketType.CONNACK, ack
        return codec.decode_connack(ack.body)[1]

    def subscribe(self, topic: str, qos: int = 1, packet_id: int = 1) -> int:
        self.send(subscribe_packet(packet_id, topic, qos))
        while True:
            p = self.read()
            if p.type == codec.PacketType.SUBACK:
                return codec.decode_suback(p.body)[1][-1]
            if p.type == codec.PacketType.PUBLISH:
                self.early.append(p)

    def closed_by_peer(self, timeout: float) -> bool:
        """True when the broker closes the connection within timeout."""
        self.sock.settimeout(timeout)
        try:
            while True:
                if not self.sock.recv(65536):
                    return True
        except TimeoutError:
            return False
        except OSError:
            return True

    def reset(self) -> None:
        """Abortive close (RST), like a phone losing its network mid-stream."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
