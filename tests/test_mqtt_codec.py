"""mqchat.mqtt_codec: round trips, remaining-length edges, malformed input, any Unicode topic."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mqchat import mqtt_codec as codec


@pytest.mark.parametrize(
    ("n", "encoded"),
    [
        (0, b"\x00"),
        (127, b"\x7f"),
        (128, b"\x80\x01"),
        (16_383, b"\xff\x7f"),
        (16_384, b"\x80\x80\x01"),
        (2_097_151, b"\xff\xff\x7f"),
        (2_097_152, b"\x80\x80\x80\x01"),
        (codec.MAX_REMAINING_LENGTH, b"\xff\xff\xff\x7f"),
    ],
)
def test_remaining_length_at_each_byte_boundary(n: int, encoded: bytes) -> None:
    assert codec.encode_remaining_length(n) == encoded
    assert codec.decode_remaining_length(b"\x30" + encoded) == (n, 1 + len(encoded))
    assert codec.decode_remaining_length(b"\x30" + encoded[:-1]) is None  # more bytes needed


@pytest.mark.parametrize("n", [-1, codec.MAX_REMAINING_LENGTH + 1])
def test_remaining_length_out_of_range_is_refused(n: int) -> None:
    with pytest.raises(ValueError, match="out of range"):
        codec.encode_remaining_length(n)


def test_a_remaining_length_of_five_bytes_is_malformed() -> None:
    with pytest.raises(codec.MalformedPacket, match="longer than 4 bytes"):
        codec.decode_remaining_length(b"\x30\xff\xff\xff\xff\x7f")


@given(n=st.integers(0, codec.MAX_REMAINING_LENGTH))
def test_remaining_length_round_trip(n: int) -> None:
    encoded = codec.encode_remaining_length(n)
    assert codec.decode_remaining_length(encoded, 0) == (n, len(encoded))


@given(
    topic=st.text(st.characters(blacklist_categories=["Cs"]), max_size=300),
    payload=st.binary(max_size=300),
    qos=st.integers(0, 1),
    packet_id=st.integers(1, 0xFFFF),
    retain=st.booleans(),
    dup=st.booleans(),
)
def test_publish_round_trip_for_any_unicode_topic(
    topic: str, payload: bytes, qos: int, packet_id: int, retain: bool, dup: bool
) -> None:
    data = codec.encode_publish(topic, payload, qos, packet_id, retain=retain, dup=dup)
    buffer = bytearray(data + b"\xc0")  # and the first byte of the next packet
    [(first, body)] = codec.split_packets(buffer)
    assert buffer == b"\xc0"
    assert first >> 4 == codec.PacketType.PUBLISH
    assert codec.decode_publish(first, body) == codec.Publish(
        packet_id if qos else None, topic, qos, payload, retain, dup
    )


def test_the_broker_passes_the_topic_already_encoded() -> None:
    assert codec.encode_publish(b"u/a/in", b"x", 1, 7) == codec.encode_publish("u/a/in", b"x", 1, 7)
    assert codec.encode_publish("t", b"") == b"\x30\x03\x00\x01t"


@pytest.mark.parametrize(
    ("first", "body", "why"),
    [
        (0x30, b"\x00", "without a topic"),
        (0x32, b"\x00\x10u/a", "shorter than its topic"),
        (0x30, b"\x00\x02\xff\xfex", "not UTF-8"),
        (0x36, b"\x00\x01t\x00\x01", "QoS 3"),
    ],
)
def test_a_malformed_publish_raises_a_clear_error(first: int, body: bytes, why: str) -> None:
    with pytest.raises(codec.MalformedPacket, match=why):
        codec.decode_publish(first, body)


def test_split_packets_keeps_an_incomplete_packet_for_the_next_call() -> None:
    stream = codec.PINGRESP_BYTES + codec.encode_suback(9, [1, 0x80]) + codec.encode_puback(300)
    buffer = bytearray()
    got: list[tuple[int, bytes]] = []
    for i in range(len(stream)):  # one byte at a time
        buffer += stream[i : i + 1]
        got += codec.split_packets(buffer)
    assert got == [(0xD0, b""), (0x90, b"\x00\x09\x01\x80"), (0x40, b"\x01\x2c")]
    assert not buffer
    assert codec.decode_suback(got[1][1]) == (9, [1, 0x80])
    assert codec.decode_puback(got[2][1]) == 300


def test_control_packets() -> None:
    assert codec.encode_connack(5) == b"\x20\x02\x00\x05"
    assert codec.decode_connack(codec.encode_connack(0, session_present=True)[2:]) == (True, 0)
    assert codec.encode_subscribe(1, [("u/a/in", 1)]) == b"\x82\x0b\x00\x01\x00\x06u/a/in\x01"
    assert codec.encode_unsubscribe(2, ["u/a/in"]) == b"\xa2\x0a\x00\x02\x00\x06u/a/in"
    for bad in (b"", b"\x00", b"\x00\x01\x02"):
        with pytest.raises(codec.MalformedPacket):
            codec.decode_puback(bad)
    with pytest.raises(codec.MalformedPacket):
        codec.decode_suback(b"\x00\x01")


def test_connect_encodes_every_field_in_order() -> None:
    data = codec.encode_connect(
        "d1", "alice", "tok", keepalive=30, clean_session=False, will=("u/alice/d1/out", b"bye"), will_qos=1
    )
    [(first, body)] = codec.split_packets(bytearray(data))
    assert first == 0x10
    assert codec.connect_protocol(body) == (b"MQTT", codec.MQTT_3_1_1)
    assert body[7] == 0x80 | 0x40 | 0x08 | 0x04  # username, password, will QoS 1, will; not clean
    assert body[8:10] == b"\x00\x1e"
    assert body[10:] == b"".join(codec.encode_string(f) for f in ("d1", "u/alice/d1/out", b"bye", "alice", "tok"))


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"", (b"", None)),
        (b"\x00\x04MQ", (b"", None)),
        (b"\x00\x04MQTT", (b"MQTT", None)),
        (b"\x00\x04MQTT\x05", (b"MQTT", 5)),
        (b"\x00\x06MQIsdp\x03", (b"MQIsdp", 3)),
    ],
)
def test_connect_protocol_reads_name_and_level_only(body: bytes, expected: tuple[bytes, int | None]) -> None:
    assert codec.connect_protocol(body) == expected


def test_a_field_longer_than_65535_bytes_is_refused() -> None:
    with pytest.raises(ValueError, match="longer than 65535"):
        codec.encode_string(b"x" * 65536)


def test_malformed_packet_is_an_mqchat_error_and_a_value_error() -> None:
    from mqchat.errors import MqchatError

    assert issubclass(codec.MalformedPacket, MqchatError)
    assert issubclass(codec.MalformedPacket, ValueError)
