"""A tiny raw-socket MQTT 3.1.1 client for broker tests: exact control over every packet."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass


def _field(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return struct.pack("!H", len(raw)) + raw


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _remaining_length(len(body)) + body


def connect_packet(
    client_id: str,
    username: str | None = None,
    password: str | None = None,
    *,
    keepalive: int = 30,
    clean: bool = True,
    will: tuple[str, bytes] | None = None,
) -> bytes:
    flags = (0x02 if clean else 0) | (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
    payload = _field(client_id)
    if will is not None:
        flags |= 0x04 | (1 << 3)  # will, QoS 1
        payload += _field(will[0]) + _field(will[1])
    if username is not None:
        payload += _field(username)
    if password is not None:
        payload += _field(password)
    return packet(0x10, _field("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive) + payload)


def subscribe_packet(packet_id: int, topic: str, qos: int = 1) -> bytes:
    return packet(0x82, struct.pack("!H", packet_id) + _field(topic) + bytes([qos]))


def publish_packet(topic: str, payload: bytes, *, qos: int = 0, packet_id: int = 0, retain: bool = False) -> bytes:
    first = 0x30 | (qos << 1) | (1 if retain else 0)
    body = _field(topic) + (struct.pack("!H", packet_id) if qos else b"") + payload
    return packet(first, body)


def puback_packet(packet_id: int) -> bytes:
    return packet(0x40, struct.pack("!H", packet_id))


@dataclass
class Packet:
    type: int
    flags: int
    body: bytes

    @property
    def topic(self) -> str:
        (n,) = struct.unpack("!H", self.body[:2])
        return self.body[2 : 2 + n].decode()

    @property
    def qos(self) -> int:
        return (self.flags >> 1) & 3

    @property
    def dup(self) -> bool:
        return bool(self.flags & 0x08)

    @property
    def packet_id(self) -> int:
        (n,) = struct.unpack("!H", self.body[:2])
        offset = 2 + n if self.type == 3 else 0
        (pid,) = struct.unpack("!H", self.body[offset : offset + 2])
        return int(pid)

    @property
    def payload(self) -> bytes:
        (n,) = struct.unpack("!H", self.body[:2])
        return self.body[2 + n + (2 if self.qos else 0) :]


class RawClient:
    """Blocking client over one TCP socket; every read has a timeout."""

    def __init__(self, port: int, *, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self._buf = b""
        self.early: list[Packet] = []  # PUBLISH packets that arrived while waiting for an ack

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _read_exact(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed by the broker")
            self._buf += chunk
        data, self._buf = self._buf[:n], self._buf[n:]
        return data

    def read(self) -> Packet:
        first = self._read_exact(1)[0]
        length, shift = 0, 0
        while True:
            byte = self._read_exact(1)[0]
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        return Packet(first >> 4, first & 0x0F, self._read_exact(length))

    def connect(self, client_id: str, username: str | None, password: str | None, **kw: object) -> int:
        """Send CONNECT; return the CONNACK return code."""
        self.send(connect_packet(client_id, username, password, **kw))  # type: ignore[arg-type]
        ack = self.read()
        assert ack.type == 2, ack
        return ack.body[1]

    def subscribe(self, topic: str, qos: int = 1, packet_id: int = 1) -> int:
        self.send(subscribe_packet(packet_id, topic, qos))
        while True:
            p = self.read()
            if p.type == 9:
                return p.body[-1]
            if p.type == 3:
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
