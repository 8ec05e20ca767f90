"""``mqchat.mqtt_client.MqttClient`` turns Nagle's algorithm off on its socket, which paho-mqtt
(and so stock aiomqtt) leaves on: with it on, a publish written while the previous one awaited
TCP's acknowledgement waited up to 40 ms for it (the MQTT-client adapter's ~44 ms send → ack
floor at low rates; the latency itself is measured by `mqchat bench chat`)."""

from __future__ import annotations

import socket

import aiomqtt

from mqchat.mqtt_client import MqttClient
from tests.conftest import Stack
from tests.helpers import unique


def nodelay(client: aiomqtt.Client) -> int:
    sock = client._client.socket()  # paho's socket, once connected
    assert sock is not None
    return int(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))


async def test_our_client_sends_without_nagles_delay_and_stock_aiomqtt_does_not(stack: Stack) -> None:
    user = unique("u")
    found = {}
    for name, cls in (("stock", aiomqtt.Client), ("ours", MqttClient)):
        device = unique(name)
        client = cls("127.0.0.1", stack.mqtt_port, username=user, password=stack.token(user, device), identifier=device)
        async with client:
            found[name] = nodelay(client)
            await client.publish(f"u/{user}/{device}/out", b"{}", qos=1)  # and it still works
    assert found == {"stock": 0, "ours": 1}
