"""The MQTT.js harness (tests/node.py) against a broker we did not write: Mosquitto with a
WebSocket listener (ws://) and a TLS one (wss://, a certificate from a throwaway CA). Two MQTT.js
clients exchange a message over each; a wss:// server the client does not trust is reported."""

from __future__ import annotations

import os
import pwd
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from mqchat.bench.harness import MOSQUITTO
from mqchat.ports import free_port
from tests import node
from tests.helpers import installed, running_mosquitto, unique
from tests.node import Message, MqttJsClient


@dataclass(frozen=True)
class WebSocketMosquitto:
    ws_url: str
    wss_url: str
    ca_pem: Path  # the CA that signed the wss:// listener's certificate
    log: Path


@pytest.fixture(scope="module")
def mosquitto_ws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebSocketMosquitto]:
    """Mosquitto, anonymous access allowed, with MQTT over WebSocket at /mqtt on two ports:
    plain, and TLS with a certificate for 127.0.0.1."""
    binary = installed("mosquitto", why="the MQTT.js harness is proven against it", places=(MOSQUITTO,))
    home = tmp_path_factory.mktemp("mosquitto")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(home / "ca.pem")
    server = ca.issue_cert("127.0.0.1")
    server.private_key_pem.write_to_path(home / "server.key")
    (home / "server.pem").write_bytes(b"".join(pem.bytes() for pem in server.cert_chain_pems))
    tcp_port, ws_port, wss_port = free_port(), free_port(), free_port()
    # As root, Mosquitto would switch to its own account, which cannot enter pytest's tmp_path.
    account = pwd.getpwuid(os.geteuid()).pw_name
    # Mosquitto 2.0 does not start with WebSocket listeners alone: one plain MQTT listener too.
    (home / "mosquitto.conf").write_text(
        f"user {account}\n"
        "allow_anonymous true\n"
        f"listener {tcp_port} 127.0.0.1\n"
        f"listener {ws_port} 127.0.0.1\n"
        "protocol websockets\n"
        f"listener {wss_port} 127.0.0.1\n"
        "protocol websockets\n"
        f"certfile {home / 'server.pem'}\n"
        f"keyfile {home / 'server.key'}\n"
    )
    log = home / "mosquitto.log"
    with running_mosquitto(binary, home / "mosquitto.conf", log):
        yield WebSocketMosquitto(
            ws_url=f"ws://127.0.0.1:{ws_port}/mqtt",
            wss_url=f"wss://127.0.0.1:{wss_port}/mqtt",
            ca_pem=home / "ca.pem",
            log=log,
        )


@pytest.mark.parametrize("scheme", ["ws", "wss"])
async def test_two_mqttjs_clients_exchange_a_message(mosquitto_ws: WebSocketMosquitto, scheme: str) -> None:
    url, ca = (mosquitto_ws.ws_url, None) if scheme == "ws" else (mosquitto_ws.wss_url, mosquitto_ws.ca_pem)
    topic = f"harness/{unique('t')}"
    alice_id, bob_id = unique("alice"), unique("bob")
    async with (
        MqttJsClient(url=url, client_id=alice_id, ca=ca) as alice,
        MqttJsClient(url=url, client_id=bob_id, ca=ca) as bob,
    ):
        assert (await alice.wait_for("connect"))["sessionPresent"] is False
        await bob.wait_for("connect")
        assert await alice.subscribe(topic) == [1]
        assert await bob.subscribe(f"{topic}/reply", qos=0) == [0]

        await bob.publish(topic, "hello from bob ✓")
        assert await alice.next_message() == Message(topic=topic, payload="hello from bob ✓", qos=1, retain=False)
        await alice.publish(f"{topic}/reply", "hi bob", qos=0)
        assert await bob.next_message() == Message(topic=f"{topic}/reply", payload="hi bob", qos=0, retain=False)

        assert await alice.end() == 0
        assert await bob.end() == 0
    assert alice.events[-1] == {"event": "close"}
    assert alice.messages_nowait() == []
    # MQTT 3.1.1 (Mosquitto's "p2") over WebSocket, as the harness promises.
    assert f"as {alice_id} (p2, c1, k30)" in mosquitto_ws.log.read_text(errors="replace")


async def test_an_untrusted_wss_server_is_reported_and_the_client_exits(mosquitto_ws: WebSocketMosquitto) -> None:
    async with MqttJsClient(url=mosquitto_ws.wss_url, client_id=unique("wary")) as client:  # no CA given
        error = await client.wait_for("error")
        assert "certificate" in error["message"], error
        await client.wait_for("close")
        assert await client.wait_exit() == 1
        with pytest.raises(AssertionError, match=r"wanted .*'connect'"):
            await client.wait_for("connect", timeout=1)


async def test_a_wait_that_meets_a_refusal_fails_at_once_saying_what_the_client_saw() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # bound, never listening: the connection is refused
        async with MqttJsClient(url=f"ws://127.0.0.1:{port}/mqtt") as client:
            started = time.monotonic()
            with pytest.raises(AssertionError, match="ECONNREFUSED"):
                await client.wait_for("connect", timeout=30)
            assert time.monotonic() - started < 10
            assert await client.wait_exit() == 1


@pytest.mark.parametrize(("ci", "outcome"), [("true", pytest.fail.Exception), (None, pytest.skip.Exception)])
def test_without_mqttjs_a_test_fails_under_ci_and_is_skipped_elsewhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ci: str | None, outcome: type[BaseException]
) -> None:
    monkeypatch.setattr(node, "JS_DIR", tmp_path)  # no node_modules there
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    assert not node.node_available()
    with pytest.raises(outcome, match=r"js-deps|nodejs"):
        node.require_mqttjs()
