"""MQTT over WebSocket (and over TLS: WSS) with MQTT.js under Node, a client nobody here wrote:
the same auth, ACL, size limit, keepalive and presence as over TCP, through the whole pipeline."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
import websockets.sync.client
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mqchat.app import BridgeHandle, run_node
from mqchat.config import Config, PresenceConfig
from mqchat.tokens import issue_token
from tests.conftest import make_config
from tests.helpers import send_env, unique
from tests.mqtt_raw import connect_packet
from tests.node import MqttJsClient
from tests.tls import Certs, make_certs, with_tls


@pytest.fixture
async def ws_node(tmp_path: Path) -> AsyncIterator[tuple[Config, BridgeHandle, Certs]]:
    certs = make_certs(tmp_path / "tls")
    config = with_tls(make_config(tmp_path / "data", presence=PresenceConfig(grace_s=0)), certs, ws_port=0, wss_port=0)
    async with run_node(config) as node:
        yield config, node, certs


async def envelopes(client: MqttJsClient, kind: str, count: int, timeout: float = 15.0) -> list[dict[str, Any]]:
    """The next count envelopes of type kind the client receives (others are skipped)."""
    found: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        while len(found) < count:
            envelope = json.loads((await client.next_message(timeout=timeout)).payload)
            if envelope["type"] == kind:
                found.append(envelope)
    return found


def token(config: Config, user: str, device: str) -> str:
    return issue_token(secret=config.auth.jwt_secret, user=user, device=device, ttl_s=600)


def device(config: Config, url: str, user: str, dev: str, **extra: object) -> MqttJsClient:
    return MqttJsClient(url=url, username=user, password=token(config, user, dev), client_id=dev, **extra)  # type: ignore[arg-type]


@pytest.mark.parametrize("scheme", ["ws", "wss"])
async def test_mqttjs_sends_and_receives_through_the_pipeline(
    ws_node: tuple[Config, BridgeHandle, Certs], scheme: str
) -> None:
    config, node, certs = ws_node
    url = f"{scheme}://127.0.0.1:{node.ports[scheme]}/mqtt"
    extra = {"ca": certs.ca_file} if scheme == "wss" else {}
    async with device(config, url, "alice", "web", **extra) as alice, device(config, url, "bob", "rn", **extra) as bob:
        await alice.wait_for("connect")
        await bob.wait_for("connect")
        assert await alice.subscribe(["u/alice/in", "u/alice/web/in"]) == [1, 1]
        assert await bob.subscribe(["u/bob/in", "u/bob/rn/in"]) == [1, 1]
        for n in range(3):
            await alice.publish("u/alice/web/out", json.dumps(send_env("dm:alice:bob", f"hello {n}", id=f"js-{n}")))
        acks = await envelopes(alice, "ack", 3)
        assert [(a["type"], a["id"], a["seq"]) for a in acks] == [("ack", f"js-{n}", n + 1) for n in range(3)]
        got = await envelopes(bob, "msg", 3)
        assert [(m["type"], m["seq"], m["body"]) for m in got] == [("msg", n + 1, f"hello {n}") for n in range(3)]
        # A read receipt back the other way.
        await bob.publish("u/bob/rn/out", json.dumps({"type": "read", "conv": "dm:alice:bob", "seq": 3}))
        (receipt,) = await envelopes(alice, "receipt", 1)
        assert receipt["read"] == 3


async def test_mqttjs_is_held_to_the_same_rules(ws_node: tuple[Config, BridgeHandle, Certs]) -> None:
    config, node, _ = ws_node
    url = f"ws://127.0.0.1:{node.ports['ws']}/mqtt"
    # A token of another device, and no token: refused (CONNACK 5, "not authorised").
    async with MqttJsClient(url=url, username="alice", password=token(config, "alice", "phone"), client_id="web") as c:
        refused = await c.wait_for("error")
        assert refused.get("code") == 5
    async with MqttJsClient(url=url, username="alice", client_id="web") as c:
        assert (await c.wait_for("error")).get("code") == 5
    async with device(config, url, "alice", "web") as alice:
        await alice.wait_for("connect")
        # The ACL: another user's topics are refused (SUBACK 0x80); a publish there gets an error.
        assert await alice.subscribe(["u/bob/in", "u/alice/in", "u/alice/web/in"]) == [128, 1, 1]
        await alice.publish("u/bob/web/out", json.dumps(send_env("dm:alice:bob")))
        (error,) = await envelopes(alice, "error", 1)
        assert error["code"] == "forbidden"
        # Presence: online while connected (seen by a contact, over HTTP).
        await alice.publish("u/alice/web/out", json.dumps(send_env("dm:alice:bob", "hi", id=unique("p"))))
        await envelopes(alice, "ack", 1)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{node.http_port}",
            headers={"Authorization": f"Bearer {token(config, 'bob', 'http')}"},
        ) as http:
            online = (await http.get("/v1/presence", params={"users": "alice"})).json()
            assert online["users"][0]["state"] == "online", online
            # A packet over the size limit closes the connection.
            with pytest.raises(AssertionError, match="close"):  # never acknowledged
                await alice.publish("u/alice/web/out", "x" * (node_limit(config) + 1024))
            await alice.wait_for("close", timeout=15)
            for _ in range(50):
                state = (await http.get("/v1/presence", params={"users": "alice"})).json()["users"][0]["state"]
                if state == "offline":
                    break
                await asyncio.sleep(0.1)
            assert state == "offline"


def node_limit(config: Config) -> int:
    from broker.limits import BrokerLimits

    return BrokerLimits().max_packet_bytes


async def test_keepalive_is_enforced_over_websocket(ws_node: tuple[Config, BridgeHandle, Certs]) -> None:
    """A WebSocket that goes silent (no PINGREQ within 1.5 × keepalive) is closed by the server."""
    config, node, _ = ws_node
    async with websockets.connect(
        f"ws://127.0.0.1:{node.ports['ws']}/mqtt", subprotocols=[websockets.Subprotocol("mqtt")]
    ) as ws:
        await ws.send(connect_packet("web", "carol", token(config, "carol", "web"), keepalive=1))
        assert (await ws.recv())[:4] == b"\x20\x02\x00\x00"  # CONNACK accepted
        async with asyncio.timeout(10):
            with pytest.raises(websockets.ConnectionClosed):
                await ws.recv()  # nothing comes; the server closes after ~1.5 s


async def test_websocket_handshake_refused_on_another_path_or_subprotocol(
    ws_node: tuple[Config, BridgeHandle, Certs],
) -> None:
    _, node, _ = ws_node
    base = f"ws://127.0.0.1:{node.ports['ws']}"
    with pytest.raises(websockets.InvalidStatus) as wrong_path:
        async with websockets.connect(f"{base}/other", subprotocols=[websockets.Subprotocol("mqtt")]):
            pass
    assert wrong_path.value.response.status_code == 404
    with pytest.raises(websockets.InvalidStatus) as no_mqtt:
        async with websockets.connect(f"{base}/mqtt"):
            pass
    assert no_mqtt.value.response.status_code == 400
    # MQTT is binary: a text frame ends the connection with 1003 (unsupported data).
    async with websockets.connect(f"{base}/mqtt", subprotocols=[websockets.Subprotocol("mqtt")]) as ws:
        await ws.send("CONNECT, in text")
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await ws.recv()
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1003


async def test_ws_path_is_configurable(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    moved = dataclasses.replace(config, network=dataclasses.replace(config.network, ws_path="/chat/mqtt", ws_port=0))
    async with run_node(moved) as node:
        base = f"ws://127.0.0.1:{node.ports['ws']}"
        with pytest.raises(websockets.InvalidStatus) as default_path:
            async with websockets.connect(f"{base}/mqtt", subprotocols=[websockets.Subprotocol("mqtt")]):
                pass
        assert default_path.value.response.status_code == 404
        async with websockets.connect(f"{base}/chat/mqtt", subprotocols=[websockets.Subprotocol("mqtt")]) as ws:
            await ws.send(connect_packet("web", "frank", token(moved, "frank", "web"), keepalive=30))
            assert (await ws.recv())[:4] == b"\x20\x02\x00\x00"  # CONNACK accepted


any_text = st.text(alphabet=st.characters(exclude_categories=()), max_size=200)
frames = st.lists(
    st.one_of(
        st.binary(max_size=300).map(lambda b: ("binary", b)),
        any_text.map(lambda t: ("text", t)),
    ),
    max_size=5,
)


async def test_any_frames_over_websocket_never_harm_the_server(ws_node: tuple[Config, BridgeHandle, Certs]) -> None:
    """Hypothesis sends arbitrary frames (bytes; text from all of Unicode, lone surrogates as
    their UTF-8-ish bytes), after a valid CONNECT or instead of one: the server closes or answers,
    and a well-behaved device is served normally afterwards."""
    config, node, _ = ws_node
    url = f"ws://127.0.0.1:{node.ports['ws']}/mqtt"
    mqtt = [websockets.Subprotocol("mqtt")]
    hello = connect_packet("fuzz", "fuzzer", token(config, "fuzzer", "fuzz"), keepalive=30)

    def fuzz() -> None:
        @settings(
            max_examples=60,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture],
        )
        @given(connect_first=st.booleans(), sent=frames)
        def probe(connect_first: bool, sent: list[tuple[str, Any]]) -> None:
            with websockets.sync.client.connect(url, subprotocols=mqtt, open_timeout=10, close_timeout=2) as ws:
                try:
                    if connect_first:
                        ws.send(hello)
                        assert ws.recv(timeout=10)[:4] == b"\x20\x02\x00\x00"
                    for kind, data in sent:
                        if kind == "text":
                            try:
                                ws.send(data)
                            except UnicodeEncodeError:  # a lone surrogate: its bytes, as a binary frame
                                ws.send(data.encode("utf-8", "surrogatepass"))
                        else:
                            ws.send(data)
                    ws.recv(timeout=0.2)  # an answer, or nothing; or the server closed
                except (websockets.ConnectionClosed, TimeoutError):
                    pass

        probe()

    await asyncio.to_thread(fuzz)
    async with device(config, url, "grace", "web") as grace:
        await grace.wait_for("connect")
        assert await grace.subscribe(["u/grace/web/in"]) == [1]
        await grace.publish("u/grace/web/out", json.dumps(send_env("dm:grace:henry", "still fine", id="after-fuzz")))
        (ack,) = await envelopes(grace, "ack", 1)
        assert ack["id"] == "after-fuzz"
