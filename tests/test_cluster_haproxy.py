"""Three `mqchat serve` nodes on one Cassandra and one Redis, behind HAProxy in TCP mode (MQTT and
HTTP), as a deployment runs them: every device and HTTP client talks to the balancer only, and
each scenario checks that its two ends landed on different nodes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from clients.testing.loadgen import Creds, MqttClient, connect
from mqchat.config import StorageConfig
from mqchat.ids import dm_conv
from tests.cassandra_store import cassandra_storage_config  # noqa: F401
from tests.cluster import Cluster, running_cluster
from tests.fakes.apns import FakeApns
from tests.fakes.fcm import FakeFcm
from tests.helpers import ChannelFeed, connect_device, send_env, subscribe_until, unique, wait_until
from tests.redis_server import redis_url  # noqa: F401
from tests.test_push_e2e import fakes, push_config, settle  # noqa: F401


@pytest.fixture
async def cluster(
    cassandra_storage_config: StorageConfig,  # noqa: F811
    redis_url: str,  # noqa: F811
    tmp_path: Path,
) -> AsyncIterator[Cluster]:
    async with running_cluster(tmp_path, store_url=cassandra_storage_config.url, redis_url=redis_url) as c:
        yield c


async def presence_of(cluster: Cluster, asker: str, user: str) -> str:
    async with cluster.http(asker) as http:
        answer = await http.get("/v1/presence", params={"users": user})
    assert answer.status_code == 200, answer.text
    state: str = answer.json()["users"][0]["state"]
    return state


async def test_messages_receipts_typing_presence_and_groups_across_nodes(cluster: Cluster) -> None:
    alice, bob, carol = unique("alice"), unique("bob"), unique("carol")
    conv = dm_conv(alice, bob)
    port = cluster.mqtt_port
    async with connect_device(port, alice, "a1", cluster.token(alice, "a1")) as a1:
        on_alice = await cluster.node_of(alice, "a1")
        async with connect_device(port, bob, "b1", cluster.token(bob, "b1")) as b1:
            on_bob = await cluster.node_of(bob, "b1")
            assert on_alice != on_bob, "the balancer gives the next device to a node with fewer"
            for i in range(5):
                await a1.send(send_env(conv, f"hello {i}"))
            acks = await a1.wait_for(lambda e: e["type"] == "ack", count=5)
            got = await b1.wait_for(lambda e: e["type"] == "msg" and e["conv"] == conv, count=5)
            assert [m["body"] for m in got] == [f"hello {i}" for i in range(5)]
            assert [m["seq"] for m in got] == [a["seq"] for a in acks] == [1, 2, 3, 4, 5]
            # Sharing a conversation now, alice may see bob's presence, reported by his node.
            assert await presence_of(cluster, alice, bob) == "online"
            # bob types, reads and answers: each reaches alice on her node.
            await b1.send({"type": "typing", "conv": conv, "state": True})
            await a1.wait_for(lambda e: e["type"] == "typing" and e.get("user") == bob and e["state"] is True)
            await b1.send({"type": "read", "id": "r1", "conv": conv, "seq": 5})
            await a1.wait_for(lambda e: e["type"] == "receipt" and e.get("user") == bob and e.get("read", 0) >= 5)
            await b1.send(send_env(conv, "hi alice"))
            (answer,) = await a1.wait_for(lambda e: e["type"] == "msg" and e["from"] == bob)
            assert answer["seq"] == 6
        # bob's node reports his disconnect to the shared registry: alice's node sees him offline.
        deadline = asyncio.get_running_loop().time() + 10
        while await presence_of(cluster, alice, bob) != "offline":
            assert asyncio.get_running_loop().time() < deadline, "bob never went offline"
            await asyncio.sleep(0.05)

        # A group with one member on each node (carol on the third): fan-out on write reaches each
        # device once, in order.
        async with cluster.http(alice) as http:
            created = await http.post("/v1/groups", json={"name": "team", "members": [bob, carol]})
        assert created.status_code == 201, created.text
        group = created.json()["conv"]
        async with (
            connect_device(port, bob, "b1", cluster.token(bob, "b1")) as b1,
            connect_device(port, carol, "c1", cluster.token(carol, "c1")) as c1,
        ):
            placed = {on_alice, await cluster.node_of(bob, "b1"), await cluster.node_of(carol, "c1")}
            assert placed == set(cluster.nodes), "one member on each node"
            await a1.send(send_env(group, "to the team"))
            await a1.send(send_env(group, "and again"))
            await a1.wait_for(lambda e: e["type"] == "ack", count=7)
            for device in (b1, c1):
                await device.wait_for(lambda e: e["type"] == "msg" and e["body"] == "and again")
                assert [m["body"] for m in device.envelopes("msg") if m["conv"] == group] == [
                    "to the team",
                    "and again",
                ]


async def test_a_channel_across_nodes_and_a_removal_ends_the_feed_on_the_other_node(cluster: Cluster) -> None:
    owner, bob, carol = unique("owner"), unique("bob"), unique("carol")
    async with cluster.http(owner) as http:
        created = await http.post("/v1/groups", json={"name": "news", "kind": "channel", "members": [bob, carol]})
    assert created.status_code == 201, created.text
    conv = created.json()["conv"]
    feed = ChannelFeed(conv, (bob, carol))
    topic, received = feed.topic, feed.received
    subscribers: dict[str, MqttClient] = {}
    try:
        async with connect_device(cluster.mqtt_port, owner, "o1", cluster.token(owner, "o1")) as o1:
            for user in (bob, carol):
                creds = Creds(f"{user}-d", user, cluster.token(user, f"{user}-d"))
                subscribers[user] = await connect("127.0.0.1", cluster.mqtt_port, creds, on_message=feed.listener(user))
                assert await subscribers[user].subscribe([(topic, 1)]) == [1]
            placed = {
                await cluster.node_of(owner, "o1"),
                await cluster.node_of(bob, f"{bob}-d"),
                await cluster.node_of(carol, f"{carol}-d"),
            }
            assert placed == set(cluster.nodes), "the owner and each subscriber on a node of their own"
            await o1.send(send_env(conv, "first"))
            await wait_until(lambda: received[bob] == ["first"] and received[carol] == ["first"])
            async with cluster.http(owner) as http:
                assert (await http.delete(f"/v1/groups/{conv}/members/{bob}")).status_code == 200
            # bob's node hears of the removal and refuses his channel topic from then on.
            await subscribe_until(subscribers[bob], topic, 0x80, what="bob's removal on his node")
            await o1.send(send_env(conv, "second"))
            await wait_until(lambda: received[carol] == ["first", "second"])
            await asyncio.sleep(0.3)
            assert received[bob] == ["first"], "the removal ended bob's feed on his node"
    finally:
        for client in subscribers.values():
            client.disconnect()
        await asyncio.gather(*(c.wait_closed() for c in subscribers.values()), return_exceptions=True)


@pytest.fixture
async def push_cluster(
    cassandra_storage_config: StorageConfig,  # noqa: F811
    redis_url: str,  # noqa: F811
    tmp_path: Path,
    fakes: tuple[FakeApns, FakeFcm],  # noqa: F811
) -> AsyncIterator[Cluster]:
    apns, fcm = fakes
    push = push_config(tmp_path, apns, fcm)
    env = {
        "MQCHAT_PUSH_WINDOW": f"{PUSH_WINDOW_S}s",
        "MQCHAT_APNS_KEY_FILE": push.apns_key_file,
        "MQCHAT_APNS_KEY_ID": push.apns_key_id,
        "MQCHAT_APNS_TEAM_ID": push.apns_team_id,
        "MQCHAT_APNS_TOPIC": push.apns_topic,
        "MQCHAT_APNS_HOST": push.apns_host,
        "MQCHAT_APNS_PORT": str(push.apns_port),
        "MQCHAT_APNS_CA_FILE": push.apns_ca_file,
        "MQCHAT_FCM_CREDENTIALS": push.fcm_credentials,
        "MQCHAT_FCM_ENDPOINT": push.fcm_endpoint,
    }
    async with running_cluster(tmp_path, store_url=cassandra_storage_config.url, redis_url=redis_url, env=env) as c:
        yield c


PUSH_WINDOW_S = 5.0
"""Long enough to kill the node that took a burst before the burst's push is due (the burst, its
acks and its deliveries take well under a second)."""


async def register_push(cluster: Cluster, user: str, device: str, platform: str, token: str) -> None:
    async with cluster.http(user, device) as http:
        r = await http.put(f"/v1/devices/{device}/push", json={"platform": platform, "token": token})
    assert r.status_code == 200, r.text


async def test_push_once_per_burst_even_when_the_node_that_took_the_burst_dies_mid_window(
    push_cluster: Cluster,
    fakes: tuple[FakeApns, FakeFcm],  # noqa: F811
) -> None:
    """bob's phone is offline (APNs), his tablet is connected to another node than alice's (FCM).
    alice's burst goes through her node, which is killed -9 while the burst's push window is
    still open: one of the other nodes sends the one push when it is due, and the tablet, online
    on a surviving node, gets none."""
    apns, fcm = fakes
    cluster = push_cluster
    alice, bob = unique("alice"), unique("bob")
    conv = dm_conv(alice, bob)
    await register_push(cluster, bob, "bob-phone", "apns", "tok-bob-phone")
    await register_push(cluster, bob, "bob-tablet", "fcm", "tok-bob-tablet")
    async with connect_device(cluster.mqtt_port, bob, "bob-tablet", cluster.token(bob, "bob-tablet")) as tablet:
        on_bob = await cluster.node_of(bob, "bob-tablet")
        async with connect_device(cluster.mqtt_port, alice, "a1", cluster.token(alice, "a1")) as a1:
            on_alice = await cluster.node_of(alice, "a1")
            assert on_alice != on_bob
            started = time.monotonic()
            for i in range(10):
                await a1.send(send_env(conv, f"hi {i}"))
            await a1.wait_for(lambda e: e["type"] == "ack", count=10)
            await tablet.wait_for(lambda e: e["type"] == "msg", count=10)
        cluster.kill9(on_alice)
        assert time.monotonic() - started < PUSH_WINDOW_S, "the burst outlasted the push window"
        assert apns.requests_for("tok-bob-phone") == [], "nothing of the burst pushed yet"
        await cluster.lb.wait_until({on_alice: "DOWN"})
        await wait_until(lambda: len(apns.requests_for("tok-bob-phone")) >= 1, timeout=PUSH_WINDOW_S + 20)
        await settle(apns, fcm, quiet_s=PUSH_WINDOW_S * 1.5)
    (phone,) = apns.requests_for("tok-bob-phone")
    assert phone.aps["alert"] == {"title": alice, "body": "10 new messages"}
    assert fcm.requests_for("tok-bob-tablet") == [], "connected to a node: no push"
