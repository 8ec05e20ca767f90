"""Two mqchat nodes sharing one Cassandra keyspace and one Redis: a device may connect to either,
and what one node's pipeline publishes reaches the devices on the other in real time (relayed
through Redis by the presence registry, which knows which node holds which device). The store
stays the truth: a device that was away catches up from it, whatever the relay missed."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY

from clients.testing.loadgen import Creds, connect
from mqchat.config import PresenceConfig, PushConfig, StorageConfig
from mqchat.ids import dm_conv
from tests.cassandra_store import cassandra_storage_config  # noqa: F401
from tests.conftest import Stack, make_config, open_stack
from tests.fakes.apns import FakeApns
from tests.fakes.fcm import FakeFcm
from tests.helpers import ChannelFeed, connect_device, send_env, subscribe_until, unique, wait_until
from tests.redis_server import RedisServer, redis_server, redis_url  # noqa: F401
from tests.test_push_e2e import fakes, push_config, register, send_burst, settle  # noqa: F401


@asynccontextmanager
async def two_nodes(
    storage: StorageConfig, redis: str, tmp_path: Path, *, push: PushConfig | None = None
) -> AsyncIterator[tuple[Stack, Stack]]:
    secret = secrets.token_urlsafe(32)
    presence = PresenceConfig(redis_url=redis)
    a = make_config(tmp_path / "a", secret=secret, presence=presence, storage=storage)
    b = make_config(
        tmp_path / "b", secret=secret, presence=presence, storage=dataclasses.replace(storage, data_dir=tmp_path / "b")
    )
    if push is not None:
        a, b = dataclasses.replace(a, push=push), dataclasses.replace(b, push=push)
    async with open_stack(a, "inbroker") as node_a, open_stack(b, "inbroker") as node_b:
        yield node_a, node_b


@pytest.fixture
async def nodes(
    cassandra_storage_config: StorageConfig,  # noqa: F811
    redis_url: str,  # noqa: F811
    tmp_path: Path,
) -> AsyncIterator[tuple[Stack, Stack]]:
    async with two_nodes(cassandra_storage_config, redis_url, tmp_path) as pair:
        yield pair


async def test_a_message_sent_through_one_node_reaches_the_recipient_on_the_other_live(
    nodes: tuple[Stack, Stack],
) -> None:
    a, b = nodes
    alice, bob = unique("alice"), unique("bob")
    async with (
        connect_device(a.mqtt_port, alice, "a1", a.token(alice, "a1")) as a1,
        connect_device(b.mqtt_port, bob, "b1", b.token(bob, "b1")) as b1,
    ):
        await registered(b, bob)
        await registered(a, alice)
        conv = dm_conv(alice, bob)
        for i in range(5):
            await a1.send(send_env(conv, f"hello {i}"))
        acks = await a1.wait_for(lambda e: e["type"] == "ack", count=5)
        got = await b1.wait_for(lambda e: e["type"] == "msg" and e["conv"] == conv, count=5)
        assert [m["body"] for m in got] == [f"hello {i}" for i in range(5)]
        assert [m["seq"] for m in got] == [ack["seq"] for ack in acks] == [1, 2, 3, 4, 5]
        # And back: bob's answer through node B reaches alice on node A, with bob's read receipt.
        await b1.send({"type": "read", "id": "r1", "conv": conv, "seq": 5})
        await b1.send(send_env(conv, "hi alice"))
        answer = await a1.wait_for(lambda e: e["type"] == "msg" and e["from"] == bob)
        assert answer[0]["seq"] == 6
        await a1.wait_for(lambda e: e["type"] == "receipt" and e.get("user") == bob and e.get("read", 0) >= 5)


async def test_a_group_fans_out_to_members_on_both_nodes_once_and_an_absent_member_reads_it_from_either(
    nodes: tuple[Stack, Stack],
) -> None:
    alice, bob, carol = unique("alice"), unique("bob"), unique("carol")
    a, b = nodes
    async with a.http(alice) as http:
        created = await http.post("/v1/groups", json={"name": "team", "members": [bob, carol]})
    assert created.status_code == 201, created.text
    conv = created.json()["conv"]
    async with (
        connect_device(a.mqtt_port, alice, "a1", a.token(alice, "a1")) as a1,
        connect_device(b.mqtt_port, bob, "b1", b.token(bob, "b1")) as b1,
        connect_device(a.mqtt_port, bob, "b2", a.token(bob, "b2")) as b2,
    ):
        await registered(b, bob)
        await a1.send(send_env(conv, "to the team"))
        await a1.send(send_env(conv, "and again"))
        await a1.wait_for(lambda e: e["type"] == "ack", count=2)
        for device in (b1, b2):  # bob's two devices, one on each node: each gets each once, in order
            await device.wait_for(lambda e: e["type"] == "msg" and e["body"] == "and again")
            assert [m["body"] for m in device.envelopes("msg")] == ["to the team", "and again"]
    # carol was connected nowhere: she finds them in the store, through either node.
    for node in (a, b):
        async with node.http(carol) as http:
            page = await _history(http, conv)
        assert [m["body"] for m in page["messages"]] == ["to the team", "and again"]


async def registered(node: Stack, user: str) -> None:
    """Until the shared registry holds user's devices (a connect is reported to it just after
    CONNACK, off the connect path): asked through node's HTTP, as the user."""
    deadline = asyncio.get_running_loop().time() + 10
    async with node.http(user) as http:
        while True:
            answer = (await http.get("/v1/presence", params={"users": user})).json()
            if answer["users"][0]["state"] == "online":
                return
            assert asyncio.get_running_loop().time() < deadline, f"{user} never registered"
            await asyncio.sleep(0.02)


def _relay_dropped(reason: str) -> float:
    return REGISTRY.get_sample_value("mqchat_relay_dropped_total", {"reason": reason}) or 0.0


async def _history(http: httpx.AsyncClient, conv: str) -> dict[str, Any]:
    answer = await http.get(f"/v1/conversations/{conv}/messages", params={"after": 0})
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


async def test_while_redis_is_away_sends_are_stored_and_the_other_node_catches_up_then_relays_again(
    cassandra_storage_config: StorageConfig,  # noqa: F811
    redis_server: RedisServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Redis stopped: node A still stores and acks alice's sends; bob on node B hears nothing
    live (the relay is down), and finds them in the store. Redis back (empty): relaying resumes
    once both nodes have registered again."""
    alice, bob = unique("alice"), unique("bob")
    conv = dm_conv(alice, bob)
    async with (
        two_nodes(cassandra_storage_config, redis_server.url, tmp_path) as (a, b),
        connect_device(a.mqtt_port, alice, "a1", a.token(alice, "a1")) as a1,
        connect_device(b.mqtt_port, bob, "b1", b.token(bob, "b1")) as b1,
    ):
        await registered(b, bob)
        await a1.send(send_env(conv, "before"))
        await b1.wait_for(lambda e: e["type"] == "msg" and e["body"] == "before")
        redis_server.stop()
        dropped = _relay_dropped("redis")
        await a1.send(send_env(conv, "while away"))
        await a1.wait_for(lambda e: e["type"] == "ack" and e["seq"] == 2)
        async with b.http(bob) as http:
            page = await _history(http, conv)
        assert [(m["seq"], m["body"]) for m in page["messages"]] == [(1, "before"), (2, "while away")]
        await wait_until(lambda: _relay_dropped("redis") > dropped, what="node A gave the relay up")
        redis_server.start()
        # bob's device is registered again by node B's heartbeat (its liveness key is gone with
        # the data): resend until a message sent now reaches him live.
        deadline = asyncio.get_running_loop().time() + 30
        sent = 2
        while not [e for e in b1.envelopes("msg") if e["seq"] > 2]:
            assert asyncio.get_running_loop().time() < deadline, "relaying never resumed"
            await a1.send(send_env(conv, f"after {sent}"))
            sent += 1
            await asyncio.sleep(0.5)
        live = [e["seq"] for e in b1.envelopes("msg")]
        assert 2 not in live  # lost to the relay, found in the store above
        assert live == sorted(live)


async def test_channel_posts_and_membership_changes_reach_the_other_node(nodes: tuple[Stack, Stack]) -> None:
    """The channel is run through node A; its subscribers are on node B. B's ACL hears A's
    membership changes: a refusal it cached is lifted by a join, and a removal ends the feed."""
    owner, bob, carol = unique("owner"), unique("bob"), unique("carol")
    a, b = nodes
    async with a.http(owner) as http:
        created = await http.post("/v1/groups", json={"name": "news", "kind": "channel", "members": [bob]})
    assert created.status_code == 201, created.text
    conv = created.json()["conv"]
    feed = ChannelFeed(conv, (bob, carol))
    topic, received = feed.topic, feed.received
    on_b = {}
    for user in (bob, carol):
        creds = Creds(f"{user}-d", user, b.token(user, f"{user}-d"))
        on_b[user] = await connect("127.0.0.1", b.mqtt_port, creds, on_message=feed.listener(user))
    try:
        assert await on_b[bob].subscribe([(topic, 1)]) == [1]
        assert await on_b[carol].subscribe([(topic, 1)]) == [0x80], "not (yet) a member: refused, and cached on B"
        async with a.http(owner) as http:
            assert (await http.post(f"/v1/groups/{conv}/members", json={"members": [carol]})).status_code == 200
        await subscribe_until(on_b[carol], topic, 1, what="carol's join on node B")  # B's cache hears of it
        async with connect_device(a.mqtt_port, owner, "o1", a.token(owner, "o1")) as o1:
            await o1.send(send_env(conv, "first"))
            await wait_until(lambda: received[bob] == ["first"] and received[carol] == ["first"])
            async with a.http(owner) as http:
                assert (await http.delete(f"/v1/groups/{conv}/members/{bob}")).status_code == 200
            await subscribe_until(on_b[bob], topic, 0x80, what="bob's removal on node B")
            await o1.send(send_env(conv, "second"))
            await wait_until(lambda: received[carol] == ["first", "second"])
            await asyncio.sleep(0.3)
            assert received[bob] == ["first"], "the removal ended bob's feed on node B"
    finally:
        for client in on_b.values():
            client.disconnect()
        await asyncio.gather(*(c.wait_closed() for c in on_b.values()), return_exceptions=True)


async def test_a_device_that_reappears_on_the_other_node_takes_over_and_the_stale_session_ends(
    nodes: tuple[Stack, Stack],
) -> None:
    """The stale session is persistent (clean_session false, as the protocol recommends): node A
    drops it, so nothing is queued there for a device that lives on node B now, and nothing is
    replayed when the device comes back to A."""
    alice, bob = unique("alice"), unique("bob")
    conv = dm_conv(alice, bob)
    a, b = nodes
    stale = await connect("127.0.0.1", a.mqtt_port, Creds("phone", alice, a.token(alice, "phone")), clean_session=False)
    try:
        assert await stale.subscribe([(f"u/{alice}/in", 1)]) == [1]
        await registered(a, alice)
        async with connect_device(b.mqtt_port, alice, "phone", b.token(alice, "phone")) as moved:
            # Node A hears that the device connected through node B, and ends its session.
            async with asyncio.timeout(10):
                await stale.wait_closed()
            async with connect_device(a.mqtt_port, bob, "b1", a.token(bob, "b1")) as b1:
                await b1.send(send_env(conv, "where are you?"))
                await b1.wait_for(lambda e: e["type"] == "ack")
                await moved.wait_for(lambda e: e["type"] == "msg" and e["body"] == "where are you?")
            async with a.http(bob) as http:
                online = (await http.get("/v1/presence", params={"users": alice})).json()
            assert [p["state"] for p in online["users"]] == ["online"], online
    finally:
        stale.disconnect()
    async with (
        connect_device(a.mqtt_port, alice, "phone", a.token(alice, "phone"), clean_session=False) as back,
        connect_device(a.mqtt_port, bob, "b1", a.token(bob, "b1")) as b1,
    ):
        await b1.send(send_env(conv, "welcome back"))
        await back.wait_for(lambda e: e["type"] == "msg" and e["body"] == "welcome back")
        assert [m["body"] for m in back.envelopes("msg")] == ["welcome back"], "nothing replayed from node A"


async def test_one_push_per_burst_cluster_wide_and_none_to_a_device_connected_to_the_other_node(
    cassandra_storage_config: StorageConfig,  # noqa: F811
    redis_url: str,  # noqa: F811
    tmp_path: Path,
    fakes: tuple[FakeApns, FakeFcm],  # noqa: F811
) -> None:
    """Both nodes run a push dispatcher over the one queue in Cassandra, and each asks the one
    registry in Redis who is connected: bob's phone, offline, gets one push for a burst sent
    through node A; his tablet, connected to node B, gets none."""
    apns, fcm = fakes
    alice, bob = unique("alice"), unique("bob")
    conv = dm_conv(alice, bob)
    push = push_config(tmp_path, apns, fcm)
    async with two_nodes(cassandra_storage_config, redis_url, tmp_path, push=push) as (a, b):
        await register(a, bob, "bob-phone", "apns", "tok-bob-phone")
        await register(b, bob, "bob-tablet", "fcm", "tok-bob-tablet")
        async with connect_device(b.mqtt_port, bob, "bob-tablet", b.token(bob, "bob-tablet")) as tablet:
            await registered(a, bob)
            await send_burst(a, alice, conv, 10)
            await tablet.wait_for(lambda e: e["type"] == "msg", count=10)
            await settle(apns, fcm)
        (phone,) = apns.requests_for("tok-bob-phone")
        assert phone.aps["alert"] == {"title": alice, "body": "10 new messages"}
        assert fcm.requests_for("tok-bob-tablet") == [], "connected to a node: no push"
