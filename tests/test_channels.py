"""Channels: fan-out on read (one publish to c/{conv}/in), membership-checked subscriptions."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from broker.membership import MembershipCache
from broker.serve import Listeners, serve_broker
from clients.testing.loadgen import Creds, MqttClient, connect
from mqchat.config import StorageConfig
from mqchat.ids import dm_conv, new_group_id
from mqchat.tokens import issue_token
from storage import open_storage
from tests.conftest import Stack, both_adapters, both_stores
from tests.helpers import connect_device, send_env, unique, wait_until


async def create_channel(stack: Stack, creator: str, members: list[str]) -> str:
    """A channel of members, added 1,000 per call (the most one call takes)."""
    async with stack.http(creator) as http:
        r = await http.post("/v1/groups", json={"name": "news", "members": members[:1000], "kind": "channel"})
        assert r.status_code == 201, r.text
        conv: str = r.json()["conv"]
        for start in range(1000, len(members), 1000):
            added = await http.post(f"/v1/groups/{conv}/members", json={"members": members[start : start + 1000]})
            assert added.status_code == 200, added.text
    return conv


def channel_publishes() -> float:
    return REGISTRY.get_sample_value("mqchat_channel_publishes_total") or 0.0


async def raw_device(stack: Stack, user: str, device: str, on_message: Any = None) -> MqttClient:
    return await connect(
        "127.0.0.1", stack.mqtt_port, Creds(device, user, stack.token(user, device)), on_message=on_message
    )


# Both adapters on SQLite, and the default (in-broker) on Cassandra: the adapter and the store
# are independent here, and 2,000 devices through the MQTT-client adapter on Cassandra cost the
# suite 40 s for nothing the other three do not show.
@pytest.mark.parametrize(
    ("stack", "store_backend"),
    [("mqtt", "sqlite"), ("inbroker", "sqlite"), ("inbroker", "cassandra")],
    indirect=True,
)
@both_stores
async def test_a_channel_message_reaches_2000_devices_through_one_publish(stack: Stack) -> None:
    owner = unique("owner")
    users = [unique("sub") for _ in range(1999)]
    conv = await create_channel(stack, owner, users)
    topic = f"c/{conv}/in"
    got: dict[str, list[int]] = {}
    clients: list[MqttClient] = []

    def on_message_for(user: str) -> Any:
        def on_message(t: str, payload: bytes, qos: int) -> None:
            env = json.loads(payload)
            if t == topic and env.get("type") == "msg":
                got.setdefault(user, []).append(env["seq"])

        return on_message

    try:
        for user in [owner, *users]:
            client = await raw_device(stack, user, f"{user}-d", on_message_for(user))
            clients.append(client)
            assert await client.subscribe([(topic, 1)]) == [1], f"{user} may subscribe to its channel"
        before = channel_publishes()
        async with connect_device(stack.mqtt_port, owner, "sender", stack.token(owner, "sender")) as sender:
            await sender.send(send_env(conv, "to all 2000"))
            ack = (await sender.wait_for(lambda e: e["type"] == "ack"))[0]
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and sum(len(v) for v in got.values()) < 2000:
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)
            # The sender's own device is not subscribed to the channel topic: nothing on u/{owner}/in.
            assert not sender.envelopes("msg")
        assert channel_publishes() - before == 1, "the bridge published the message once"
    finally:
        for client in clients:
            client.disconnect()
        await asyncio.gather(*(c.wait_closed() for c in clients), return_exceptions=True)
    assert len(got) == 2000
    assert all(v == [ack["seq"]] for v in got.values())


@both_adapters
@both_stores
async def test_only_members_subscribe_and_a_removed_member_stops_receiving(stack: Stack) -> None:
    owner, bob, carol, eve = (unique(n) for n in ("owner", "bob", "carol", "eve"))
    conv = await create_channel(stack, owner, [bob])
    topic = f"c/{conv}/in"
    received: dict[str, list[dict[str, Any]]] = {bob: [], carol: [], eve: []}

    def record(user: str) -> Any:
        return lambda t, payload, qos: received[user].append(json.loads(payload)) if t == topic else None

    b = await raw_device(stack, bob, "b1", record(bob))
    c = await raw_device(stack, carol, "c1", record(carol))
    e = await raw_device(stack, eve, "e1", record(eve))
    try:
        assert await b.subscribe([(topic, 1)]) == [1]
        assert await c.subscribe([(topic, 1)]) == [0x80], "not (yet) a member"
        assert await e.subscribe([(topic, 1), ("c/+/in", 1), ("c/#", 1)]) == [0x80, 0x80, 0x80]
        async with stack.http(owner) as http:
            r = await http.post(f"/v1/groups/{conv}/members", json={"members": [carol]})
            assert r.status_code == 200
        # The refusal was cached; the membership change invalidates it.
        assert await c.subscribe([(topic, 1)]) == [1]
        async with connect_device(stack.mqtt_port, owner, "o1", stack.token(owner, "o1")) as o1:
            await o1.send(send_env(conv, "first"))
            await o1.wait_for(lambda x: x["type"] == "ack")
            await wait_until(lambda: [m["body"] for m in received[bob] if m["type"] == "msg"] == ["first"])
            await wait_until(lambda: [m["body"] for m in received[carol] if m["type"] == "msg"] == ["first"])
            async with connect_device(stack.mqtt_port, bob, "b2", stack.token(bob, "b2")) as b2:
                async with stack.http(owner) as http:
                    r = await http.delete(f"/v1/groups/{conv}/members/{bob}")
                    assert r.status_code == 200
                removed = await b2.wait_for(lambda x: x["type"] == "conv")
                assert removed[0]["event"] == "members_removed"
                assert removed[0]["users"] == [bob]
            await o1.send(send_env(conv, "second"))
            await o1.wait_for(lambda x: x["type"] == "ack", count=2)
            await wait_until(lambda: [m["body"] for m in received[carol] if m["type"] == "msg"] == ["first", "second"])
            await asyncio.sleep(0.3)
            assert [m["body"] for m in received[bob] if m["type"] == "msg"] == ["first"], "removal ends the feed"
            assert await b.subscribe([(topic, 1)]) == [0x80], "and a new subscription is refused"
            assert not received[eve]
            async with connect_device(stack.mqtt_port, eve, "e2", stack.token(eve, "e2")) as e2:
                await e2.send(send_env(conv, "spam"))
                assert (await e2.wait_for(lambda x: x["type"] == "error"))[0]["code"] == "not_member"
    finally:
        for client in (b, c, e):
            client.disconnect()
        await asyncio.gather(*(x.wait_closed() for x in (b, c, e)), return_exceptions=True)
    # Bob reads nothing after his removal; Carol reads from her join point (seq 1: she joined before it).
    async with stack.http(bob) as http:
        assert (await http.get(f"/v1/conversations/{conv}/messages")).status_code == 403
    async with stack.http(carol) as http:
        page = (await http.get(f"/v1/conversations/{conv}/messages")).json()
        assert [m["body"] for m in page["messages"]] == ["first", "second"]


@both_stores
async def test_channel_sync_unread_receipts_and_typing(stack: Stack) -> None:
    owner, bob = unique("owner"), unique("bob")
    conv = await create_channel(stack, owner, [bob])
    async with stack.http(bob) as http:
        first = (await http.get("/v1/conversations")).json()
        assert [(c["conv"], c["kind"], c["unread"]) for c in first["conversations"]] == [(conv, "channel", 0)]
        cursor = first["cursor"]
    async with (
        connect_device(stack.mqtt_port, owner, "o1", stack.token(owner, "o1")) as o1,
        connect_device(stack.mqtt_port, bob, "b1", stack.token(bob, "b1")) as b1,
        connect_device(stack.mqtt_port, bob, "b2", stack.token(bob, "b2")) as b2,
    ):
        for i in range(3):
            await o1.send(send_env(conv, f"post {i}"))
        await o1.wait_for(lambda e: e["type"] == "ack", count=3)
        # A channel's messages do not touch its members' rows, yet sync reports them.
        async with stack.http(bob) as http:
            changed = (await http.get("/v1/conversations", params={"since": cursor})).json()
            assert [(c["conv"], c["last_seq"], c["unread"]) for c in changed["conversations"]] == [(conv, 3, 3)]
            again = (await http.get("/v1/conversations", params={"since": changed["cursor"]})).json()
            assert again["conversations"] == []
        await b1.send({"type": "read", "conv": conv, "seq": 2})
        receipt = (await b2.wait_for(lambda e: e["type"] == "receipt"))[0]
        assert (receipt["user"], receipt["read"]) == (bob, 2), "the reader's other devices hear it"
        await asyncio.sleep(stack.config.bridge.receipt_window_s + 0.3)
        assert not o1.envelopes("receipt"), "a channel's receipts are not fanned out to every member"
        await b1.send({"type": "typing", "conv": conv, "state": True})
        assert (await b1.wait_for(lambda e: e["type"] == "error"))[0]["code"] == "unsupported"
    async with stack.http(bob) as http:
        state = (await http.get("/v1/conversations", params={"since": changed["cursor"]})).json()
        assert [(c["conv"], c["read"], c["unread"]) for c in state["conversations"]] == [(conv, 2, 1)]


async def test_a_lost_membership_change_still_ends_the_subscription(tmp_path: Path) -> None:
    """The broker checks presence and channel subscriptions again periodically: a removal whose
    membership change never reached it (here: made in the store directly) still ends the feed."""
    secret = secrets.token_urlsafe(32)
    async with open_storage(StorageConfig(data_dir=tmp_path), push=False) as storage:
        store = storage.messages
        group = await store.create_group(
            conv=new_group_id(), name="c", kind="channel", creator="owner", members=("bob",), ts=0
        )
        topic = f"c/{group.conv}/in"
        cache = MembershipCache(groups=store, privacy=store, ttl_s=0.2)
        async with serve_broker(
            listeners=Listeners(host="127.0.0.1", mqtt=0), secret=secret, membership=cache, revalidate_s=0.3
        ) as broker:
            got: list[bytes] = []
            bob = await connect(
                "127.0.0.1",
                broker.bound_port,
                Creds("bob-1", "bob", issue_token(secret=secret, user="bob", device="bob-1", ttl_s=60)),
                on_message=lambda t, payload, qos: got.append(payload),
            )
            try:
                assert await bob.subscribe([(topic, 1)]) == [1]
                await broker.internal_message_broadcast(topic, b"before", 1)
                await wait_until(lambda: got == [b"before"])
                await store.remove_member(conv=group.conv, user="bob")  # no membership change sent
                await asyncio.sleep(1.0)
                await broker.internal_message_broadcast(topic, b"after", 1)
                await asyncio.sleep(0.3)
                assert got == [b"before"]
            finally:
                bob.disconnect()
                await bob.wait_closed()


@both_stores
async def test_members_are_added_1000_per_call_while_others_are_served(stack: Stack) -> None:
    """One call takes at most 1,000 users (more: 400, nothing changed); adding 1,000 does not hold
    up another user's sends (their send->ack latency is measured alongside)."""
    owner, talker, friend = unique("owner"), unique("talker"), unique("friend")
    async with stack.http(owner) as http:
        too_many = await http.post(
            "/v1/groups", json={"name": "big", "kind": "channel", "members": [unique("m") for _ in range(1001)]}
        )
        assert too_many.status_code == 400
        conv = (await http.post("/v1/groups", json={"name": "big", "kind": "channel", "members": []})).json()["conv"]
        async with connect_device(stack.mqtt_port, talker, "t", stack.token(talker, "t")) as dev:
            latencies: list[float] = []

            async def chat() -> None:
                for _ in range(30):
                    probe = send_env(dm_conv(talker, friend))
                    started = time.perf_counter()
                    await dev.send(probe)
                    await dev.wait_for(lambda e, p=probe: e["type"] == "ack" and e["id"] == p["id"])
                    latencies.append(time.perf_counter() - started)

            async def grow() -> None:
                for _ in range(3):
                    batch = [unique("m") for _ in range(1000)]
                    added = await http.post(f"/v1/groups/{conv}/members", json={"members": batch})
                    assert added.status_code == 200, added.text

            await asyncio.gather(chat(), grow())
        group = (await http.get(f"/v1/groups/{conv}")).json()
    assert len(group["members"]) == 3001
    assert len(latencies) == 30
    print(f"adding 3 x 1,000 members: another user's send->ack max {max(latencies) * 1000:.1f} ms")
