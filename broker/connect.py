"""The first packet of a connection: read the CONNECT, check it, answer protocol refusals.

::

    bytes ─▶ first byte 0x10? ─▶ remaining length (mqchat.mqtt_codec) ─▶ body (size-limited reader)
          ─▶ another protocol level (MQTT 5, 3.1)? ──▶ CONNACK 0x01, closed
          ─▶ amqtt decodes the CONNECT ─▶ malformed? closed │ bad flags / no client id? ──▶ CONNACK refused
          ─▶ the incoming MqchatSession (not yet authenticated: MqchatBroker decides)
"""

from __future__ import annotations

from typing import Any

from amqtt.adapters import BufferReader
from amqtt.errors import MQTTError, NoDataError
from amqtt.mqtt.connack import BAD_USERNAME_PASSWORD, IDENTIFIER_REJECTED, UNACCEPTABLE_PROTOCOL_VERSION
from amqtt.mqtt.connect import ConnectPacket

from broker.session import MqchatSession
from mqchat import mqtt_codec as codec


async def read_connect_bytes(reader: Any) -> bytes:
    """The first packet of a connection, whole (its size limited by the reader); it must be a CONNECT."""
    packet = bytearray(await reader.read(1))
    if not packet:
        raise NoDataError("connection closed before CONNECT")
    if packet[0] != 0x10:
        raise MQTTError("[MQTT-3.1.0-1] the first packet must be CONNECT")
    while (header := codec.decode_remaining_length(packet)) is None:
        chunk = await reader.read(1)
        if not chunk:
            raise NoDataError("connection closed")
        packet += chunk
    length = header[0]
    if length:
        packet += await reader.read(length)
    return bytes(packet)


def other_protocol_level(packet: bytes) -> bool:
    """Is this CONNECT one of MQTT at a level other than 4 (3.1.1): MQTT 5 ("MQTT", level 5) or
    3.1 ("MQIsdp", level 3)? Read from the raw bytes, before the payload is decoded."""
    header = codec.decode_remaining_length(packet)
    assert header is not None  # read_connect_bytes read it whole
    name, level = codec.connect_protocol(packet[header[1] :])
    return (name == b"MQTT" and level != codec.MQTT_3_1_1) or name == b"MQIsdp"


async def _refuse(writer: Any, code: int) -> None:
    writer.write(codec.encode_connack(code))
    await writer.drain()
    await writer.close()
    raise MQTTError(f"CONNECT refused with return code {code}")


async def read_connect(reader: Any, writer: Any) -> MqchatSession:
    """Read and check CONNECT; answer protocol-level refusals; build the incoming session."""
    packet = await read_connect_bytes(reader)
    if other_protocol_level(packet):
        # Refused before the payload is decoded: a CONNECT of another protocol level (MQTT 5
        # adds properties, 3.1 names itself "MQIsdp") cannot be decoded with 3.1.1's layout.
        await _refuse(writer, UNACCEPTABLE_PROTOCOL_VERSION)
    connect = await ConnectPacket.from_stream(BufferReader(packet))
    header, payload = connect.variable_header, connect.payload
    if header is None or payload is None or payload.client_id is None:
        raise MQTTError("malformed CONNECT")
    if header.reserved_flag or connect.proto_name != "MQTT":
        raise MQTTError("[MQTT-3.1.2-1/3] not an MQTT CONNECT")
    if connect.will_flag and (connect.will_topic is None or connect.will_message is None):
        raise MQTTError("will flag without will topic and message")
    if connect.proto_level != codec.MQTT_3_1_1:
        await _refuse(writer, UNACCEPTABLE_PROTOCOL_VERSION)
    if (
        (connect.password_flag and not connect.username_flag)
        or (connect.username_flag and connect.username is None)
        or (connect.password_flag and connect.password is None)
    ):
        await _refuse(writer, BAD_USERNAME_PASSWORD)
    if not connect.clean_session_flag and payload.client_id_is_random:
        await _refuse(writer, IDENTIFIER_REJECTED)  # [MQTT-3.1.3-8] a persistent session needs a client id
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
    return session
