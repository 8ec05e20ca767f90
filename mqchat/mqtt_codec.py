"""A sans-IO MQTT 3.1.1 codec: packets to bytes and bytes to packets, no sockets, no asyncio.

::

    bytes in ─▶ decode_remaining_length / split_packets ─▶ (first byte, body)
                  ─▶ decode_publish · decode_puback · decode_connack · decode_suback · connect_protocol
    values  ─▶ encode_connect · encode_publish · encode_puback · encode_subscribe · … ─▶ bytes out

A packet is a first byte (type << 4 | flags), a remaining length (a variable-length integer of
1-4 bytes) and a body of that length. The broker's reader, the load generator and the tests all
frame and encode with this module; the broker hands the packets it does not handle inline to
amqtt's own parser. Input that does not parse raises :class:`MalformedPacket`, never anything
else. A leaf module: everyone may import it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TypeVar

from mqchat.errors import MqchatError

MQTT_3_1_1 = 4
"""The protocol level of MQTT 3.1.1 in CONNECT."""

MAX_REMAINING_LENGTH = 268_435_455
"""The largest remaining length four bytes can carry (256 MB - 1)."""


class PacketType(IntEnum):
    CONNECT = 1
    CONNACK = 2
    PUBLISH = 3
    PUBACK = 4
    PUBREC = 5
    PUBREL = 6
    PUBCOMP = 7
    SUBSCRIBE = 8
    SUBACK = 9
    UNSUBSCRIBE = 10
    UNSUBACK = 11
    PINGREQ = 12
    PINGRESP = 13
    DISCONNECT = 14


PINGREQ_BYTES = b"\xc0\x00"
PINGRESP_BYTES = b"\xd0\x00"
DISCONNECT_BYTES = b"\xe0\x00"
SUBACK_FAILURE = 0x80


class MalformedPacket(MqchatError, ValueError):
    """Bytes that are not a well-formed MQTT 3.1.1 packet (the message says what is wrong)."""


# --- framing ------------------------------------------------------------------------------------


def encode_remaining_length(n: int) -> bytes:
    """The variable-length integer of the fixed header (1-4 bytes)."""
    if not 0 <= n <= MAX_REMAINING_LENGTH:
        raise ValueError(f"remaining length {n} out of range")
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


def decode_remaining_length(data: bytes | bytearray, start: int = 1) -> tuple[int, int] | None:
    """(remaining length, offset of the body) read from ``data[start:]``; None when more bytes
    are needed. Raises MalformedPacket when the length runs past four bytes."""
    length, shift = 0, 0
    end = len(data)
    for i in range(start, start + 4):
        if i >= end:
            return None
        byte = data[i]
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return length, i + 1
        shift += 7
    raise MalformedPacket("remaining length longer than 4 bytes")


def encode_packet(first: int, body: bytes) -> bytes:
    """One packet: first byte, remaining length, body."""
    return bytes((first,)) + encode_remaining_length(len(body)) + body


def split_packets(buffer: bytearray) -> list[tuple[int, bytes]]:
    """Take every complete packet off the front of ``buffer`` as (first byte, body); the bytes of
    an incomplete packet stay in it for the next call."""
    packets: list[tuple[int, bytes]] = []
    pos, end = 0, len(buffer)
    while end - pos >= 2:
        header = decode_remaining_length(buffer, pos + 1)
        if header is None:
            break
        length, start = header
        if end - start < length:
            break
        packets.append((buffer[pos], bytes(buffer[start : start + length])))
        pos = start + length
    if pos:
        del buffer[:pos]
    return packets


def encode_string(value: str | bytes) -> bytes:
    """A length-prefixed field (UTF-8 for a str)."""
    raw = value.encode() if isinstance(value, str) else value
    if len(raw) > 0xFFFF:
        raise ValueError(f"a field of {len(raw)} bytes is longer than 65535")
    return len(raw).to_bytes(2, "big") + raw


def _packet_id(value: int) -> bytes:
    if not 0 <= value <= 0xFFFF:
        raise ValueError(f"packet id {value} out of range")
    return value.to_bytes(2, "big")


# --- encoding -----------------------------------------------------------------------------------


def encode_connect(
    client_id: str,
    username: str | None = None,
    password: str | None = None,
    *,
    keepalive: int = 60,
    clean_session: bool = True,
    will: tuple[str, bytes] | None = None,
    will_qos: int = 0,
    will_retain: bool = False,
) -> bytes:
    """CONNECT at level 4. The password flag follows ``password`` alone (a server must refuse a
    password without a username: tests send one)."""
    flags = (0x02 if clean_session else 0) | (0x80 if username is not None else 0)
    flags |= 0x40 if password is not None else 0
    payload = encode_string(client_id)
    if will is not None:
        flags |= 0x04 | (will_qos << 3) | (0x20 if will_retain else 0)
        payload += encode_string(will[0]) + encode_string(will[1])
    if username is not None:
        payload += encode_string(username)
    if password is not None:
        payload += encode_string(password)
    variable = encode_string("MQTT") + bytes((MQTT_3_1_1, flags)) + keepalive.to_bytes(2, "big")
    return encode_packet(0x10, variable + payload)


def encode_connack(code: int, *, session_present: bool = False) -> bytes:
    return bytes((0x20, 2, 1 if session_present else 0, code))


def encode_publish(
    topic: str | bytes, payload: bytes, qos: int = 0, packet_id: int = 0, *, retain: bool = False, dup: bool = False
) -> bytes:
    """One PUBLISH. The broker passes the topic already encoded, once for all its recipients."""
    raw = topic.encode() if isinstance(topic, str) else topic
    header = bytearray((0x30 | (qos << 1) | (0x08 if dup else 0) | (0x01 if retain else 0),))
    n = 2 + len(raw) + (2 if qos else 0) + len(payload)
    while True:
        byte, n = n & 0x7F, n >> 7
        header.append(byte | 0x80 if n else byte)
        if not n:
            break
    header += len(raw).to_bytes(2, "big") + raw
    if qos:
        header += packet_id.to_bytes(2, "big")
    return bytes(header) + payload


def encode_puback(packet_id: int) -> bytes:
    return b"\x40\x02" + packet_id.to_bytes(2, "big")


def encode_subscribe(packet_id: int, filters: Iterable[tuple[str, int]]) -> bytes:
    body = _packet_id(packet_id) + b"".join(encode_string(f) + bytes((qos,)) for f, qos in filters)
    return encode_packet(0x82, body)


def encode_suback(packet_id: int, codes: Iterable[int]) -> bytes:
    return encode_packet(0x90, _packet_id(packet_id) + bytes(codes))


def encode_unsubscribe(packet_id: int, filters: Iterable[str]) -> bytes:
    return encode_packet(0xA2, _packet_id(packet_id) + b"".join(encode_string(f) for f in filters))


# --- decoding -----------------------------------------------------------------------------------


@dataclass(slots=True)
class Publish:
    """A decoded PUBLISH."""

    packet_id: int | None  # None at QoS 0
    topic: str
    qos: int
    payload: bytes
    retain: bool
    dup: bool = field(default=False)


T = TypeVar("T")


def decode_publish_into(first: int, body: bytes, build: Callable[[int | None, str, int, bytes, bool], T]) -> T:
    """Decode a PUBLISH and hand (packet id, topic, qos, payload, retain) to ``build``: the
    broker builds amqtt's message object directly, with no intermediate one. QoS 3 is refused
    here ([MQTT-3.3.1-4]); the broker's reader relies on it."""
    qos = (first >> 1) & 3
    if qos == 3:
        raise MalformedPacket("[MQTT-3.3.1-4] PUBLISH with QoS 3")
    if len(body) < 2:
        raise MalformedPacket("PUBLISH without a topic")
    end = 2 + int.from_bytes(body[:2], "big")
    if qos:
        end += 2
    if len(body) < end:
        raise MalformedPacket("PUBLISH shorter than its topic")
    try:
        topic = body[2 : end - 2 if qos else end].decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedPacket("PUBLISH topic is not UTF-8") from None
    packet_id = int.from_bytes(body[end - 2 : end], "big") if qos else None
    return build(packet_id, topic, qos, body[end:], bool(first & 0x01))


def decode_publish(first: int, body: bytes) -> Publish:
    publish = decode_publish_into(first, body, Publish)
    publish.dup = bool(first & 0x08)
    return publish


def decode_puback(body: bytes) -> int:
    """The packet id of a PUBACK (also PUBREC, PUBREL, PUBCOMP, UNSUBACK)."""
    if len(body) != 2:
        raise MalformedPacket(f"an acknowledgement of {len(body)} bytes (2 expected)")
    return int.from_bytes(body, "big")


def decode_connack(body: bytes) -> tuple[bool, int]:
    """(session present, return code) of a CONNACK."""
    if len(body) != 2:
        raise MalformedPacket(f"a CONNACK of {len(body)} bytes (2 expected)")
    return bool(body[0] & 0x01), body[1]


def decode_suback(body: bytes) -> tuple[int, list[int]]:
    """(packet id, return codes) of a SUBACK."""
    if len(body) < 3:
        raise MalformedPacket("a SUBACK without a return code")
    return int.from_bytes(body[:2], "big"), list(body[2:])


def connect_protocol(body: bytes) -> tuple[bytes, int | None]:
    """(protocol name, protocol level) at the start of a CONNECT body, read before anything else
    is decoded (MQTT 5 adds properties, 3.1 names itself ``MQIsdp``): b"" when the name is cut
    short, level None when it is missing."""
    if len(body) < 2:
        return b"", None
    end = 2 + int.from_bytes(body[:2], "big")
    if len(body) < end:
        return b"", None
    return body[2:end], body[end] if len(body) > end else None
