"""A node's identity and its MQTT listener's bounds, set by configuration and seen from outside a
real ``mqchat serve``: the node id in /healthz and on every /metrics sample, the listener's accept
queue as the kernel reports it, and the connection limit refusing one device too many."""

from __future__ import annotations

import asyncio
import secrets
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mqchat.config import load_config
from mqchat.errors import ConfigError
from tests.conftest import Served, start_served, stop_served
from tests.helpers import connect_device

NODE = "eu-1.node-7"


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    env = {"MQCHAT_NODE_ID": NODE, "MQCHAT_MQTT_BACKLOG": "1234", "MQCHAT_MQTT_MAX_CONNECTIONS": "2"}
    node = start_served(
        tmp_path / "data", secrets.token_urlsafe(32), tmp_path / "serve.log", adapter="inbroker", env=env
    )
    try:
        yield node
    finally:
        stop_served(node)


async def test_the_node_id_is_in_healthz_and_labels_every_metric(served: Served) -> None:
    await served.wait_healthy()
    async with served.http() as http:
        health = (await http.get("/healthz")).json()
        text = (await http.get("/metrics")).text
    assert health["node"] == NODE
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    assert len(samples) > 50  # the broker's, the bridge's and the store's, from every process
    assert {s.labels.get("node") for s in samples} == {NODE}


@pytest.mark.skipif(shutil.which("ss") is None, reason="ss (iproute2) reports a listener's accept queue")
async def test_the_mqtt_listener_has_the_configured_accept_queue(served: Served) -> None:
    await served.wait_healthy()
    command = ["ss", "-ltnH", f"sport = :{served.mqtt_port}"]
    answer = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, check=True)
    listing = answer.stdout.split()
    # State, Recv-Q, Send-Q (for a listener: its accept queue's length), local address, peer
    assert listing[0] == "LISTEN"
    assert int(listing[2]) == min(1234, _somaxconn())


async def test_the_connection_limit_refuses_one_device_too_many(served: Served) -> None:
    await served.wait_healthy()
    async with (
        connect_device(served.mqtt_port, "alice", "a1", served.token("alice", "a1")),
        connect_device(served.mqtt_port, "bob", "b1", served.token("bob", "b1")),
    ):
        with pytest.raises(aiomqtt.MqttCodeError) as refused:
            async with connect_device(served.mqtt_port, "carol", "c1", served.token("carol", "c1")):
                pass
        assert str(refused.value.rc) == "Server unavailable"  # CONNACK 3
    # Room again once the others have gone (the server counts their ends as it notices them).
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        try:
            async with connect_device(served.mqtt_port, "carol", "c1", served.token("carol", "c1")):
                return
        except aiomqtt.MqttCodeError:
            assert asyncio.get_running_loop().time() < deadline, "the closed connections never left room"
            await asyncio.sleep(0.05)


def test_node_ids_and_listener_bounds_are_checked_at_load() -> None:
    config, _ = load_config({"node_id": "eu-1", "mqtt_port": "1999"}, {}, secret="skip")
    assert config.network.node == "eu-1"
    derived, _ = load_config({"mqtt_port": "1999"}, {}, secret="skip")
    assert derived.network.node == f"{socket.gethostname()}:1999"
    assert derived.network.mqtt_backlog == 4096
    assert (derived.network.mqtt_max_connections, derived.network.mqtt_connect_rate) == (0, 0.0)
    for bad in ({"node_id": "-lead"}, {"node_id": "a b"}, {"node_id": "x" * 65}, {"mqtt_backlog": "0"}):
        with pytest.raises(ConfigError):
            load_config(bad, {}, secret="skip")
    with pytest.raises(ConfigError):
        load_config({"mqtt_connect_rate": "-1"}, {}, secret="skip")


def _somaxconn() -> int:
    return int(Path("/proc/sys/net/core/somaxconn").read_text())
