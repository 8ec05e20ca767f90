"""Groups: HTTP membership management, fan-out on write, history from the join point."""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from clients.testing.loadgen import Creds, MqttClient, connect
from mqchat.app import run_node
from tests.conftest import Stack, both_adapters, both_stores, make_config
from tests.helpers import connect_device, send_env, unique


async def create(stack: Stack, creator: str, members: list[str], **extra: Any) -> dict[str, Any]:
    async with stack.http(creator) as http:
        r = await http.post("/v1/groups", json={"name": "team", "members": members, **extra})
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


@both_stores
async def test_a_group_fans_out_to_every_member_and_refuses_outsiders(stack: Stack) -> None:
    alice, bob, carol, dave = (unique(n) for n in ("alice", "bob", "carol", "dave"))
    async with (
        connect_device(stack.mqtt_port, alice, "a1", stack.token(alice, "a1")) as a1,
        connect_device(stack.mqtt_port, alice, "a2", stack.token(alice, "a2")) as a2,
        connect_device(stack.mqtt_port, bob, "b1", stack.token(bob, "b1")) as b1,
        connect_device(stack.mqtt_port, carol, "c1", stack.token(carol, "c1")) as c1,
        connect_device(stack.mqtt_port, dave, "d1", stack.token(dave, "d1")) as d1,
    ):
        group = await create(stack, alice, [bob, carol])
        conv = group["conv"]
        assert conv.startswith("g:")
        assert {(m["user"], m["role"]) for m in group["members"]} == {
            (alice, "admin"),
            (bob, "member"),
            (carol, "member"),
        }
        created = await b1.wait_for(lambda e: e["type"] == "conv")
        assert created[0]["event"] == "created"
        await a1.send(send_env(conv, "hello team"))
        ack = (await a1.wait_for(lambda e: e["type"] == "ack"))[0]
        for dev in (a1, a2, b1, c1):
            msgs = await dev.wait_for(lambda e: e["type"] == "msg")
            assert [(m["conv"], m["seq"], m["body"]) for m in msgs] == [(conv, ack["seq"], "hello team")]
        await d1.send(send_env(conv, "let me in"))
        refused = await d1.wait_for(lambda e: e["type"] == "error")
        assert refused[0]["code"] == "not_member"
        await d1.send({"type": "read", "conv": conv, "seq": 1})
        await d1.send({"type": "typing", "conv": conv, "state": True})
        refused = await d1.wait_for(lambda e: e["type"] == "error", count=3)
        assert [e["code"] for e in refused] == ["not_member"] * 3
        await b1.send({"type": "read", "conv": conv, "seq": 1})
        receipt = await a1.wait_for(lambda e: e["type"] == "receipt")
        assert receipt[0]["user"] == bob
        await asyncio.sleep(0.3)
        assert d1.envelopes("msg") == []
    async with stack.http(dave) as http:
        assert (await http.get(f"/v1/conversations/{conv}/messages")).status_code == 403
        assert (await http.get(f"/v1/groups/{conv}")).status_code == 403
    assert await stack.store.last_seq(conv) == 1


@both_stores
async def test_removal_and_addition_take_effect_for_the_next_message(stack: Stack) -> None:
    alice, bob, carol, erin = (unique(n) for n in ("alice", "bob", "carol", "erin"))
    group = await create(stack, alice, [bob, carol])
    conv = group["conv"]
    async with (
        connect_device(stack.mqtt_port, alice, "a1", stack.token(alice, "a1")) as a1,
        connect_device(stack.mqtt_port, bob, "b1", stack.token(bob, "b1")) as b1,
        connect_device(stack.mqtt_port, erin, "e1", stack.token(erin, "e1")) as e1,
    ):
        for i in range(3):
            await a1.send(send_env(conv, f"before {i}"))
        await b1.wait_for(lambda e: e["type"] == "msg", count=3)
        async with stack.http(bob) as http:  # a member may not remove others
            r = await http.delete(f"/v1/groups/{conv}/members/{carol}")
            assert (r.status_code, r.json()["error"]) == (403, "forbidden")
        async with stack.http(alice) as http:
            r = await http.delete(f"/v1/groups/{conv}/members/{bob}")
            assert r.status_code == 200
            assert bob not in [m["user"] for m in r.json()["members"]]
            r = await http.post(f"/v1/groups/{conv}/members", json={"members": [erin]})
            assert r.status_code == 200
        removed = await b1.wait_for(lambda e: e["type"] == "conv" and e["event"] == "members_removed")
        assert removed[0]["users"] == [bob]
        await a1.send(send_env(conv, "after"))
        got = await e1.wait_for(lambda e: e["type"] == "msg")
        assert [(m["seq"], m["body"]) for m in got] == [(4, "after")]
        await asyncio.sleep(0.3)
        assert [m["body"] for m in b1.envelopes("msg")] == ["before 0", "before 1", "before 2"]
        await b1.send(send_env(conv, "still here?"))
        assert (await b1.wait_for(lambda e: e["type"] == "error"))[0]["code"] == "not_member"
    async with stack.http(bob) as http:
        assert (await http.get(f"/v1/conversations/{conv}/messages")).status_code == 403
    async with stack.http(erin) as http:
        page = (await http.get(f"/v1/conversations/{conv}/messages", params={"after": 0})).json()
        assert [m["seq"] for m in page["messages"]] == [4]  # history from the join point
        back = (await http.get(f"/v1/conversations/{conv}/messages", params={"before": 5})).json()
        assert [m["seq"] for m in back["messages"]] == [4]
        assert back["more"] is False
        sync = (await http.get("/v1/conversations", params={"include_messages": 10})).json()
        [item] = [c for c in sync["conversations"] if c["conv"] == conv]
        assert [m["seq"] for m in item["messages"]] == [4]
        assert item["unread"] == 1


async def test_admin_rules_and_limits(tmp_path: Path) -> None:
    config = make_config(tmp_path, max_group_members=4)
    async with run_node(config) as node:
        stack = Stack(config=config, mqtt_port=node.mqtt_port, http_port=node.http_port, store=node.store)
        alice, bob, carol = (unique(n) for n in ("alice", "bob", "carol"))
        group = await create(stack, alice, [bob])
        conv = group["conv"]
        async with stack.http(bob) as http:
            r = await http.post(f"/v1/groups/{conv}/members", json={"members": [carol]})
            assert (r.status_code, r.json()["error"]) == (403, "forbidden")
        async with stack.http(alice) as http:
            r = await http.post(f"/v1/groups/{conv}/admins/{bob}")
            assert {(m["user"], m["role"]) for m in r.json()["members"]} == {(alice, "admin"), (bob, "admin")}
            r = await http.post(f"/v1/groups/{conv}/members", json={"members": ["x1", "x2", "x3"]})
            assert (r.status_code, r.json()["error"]) == (413, "too_large")
            r = await http.post("/v1/groups", json={"name": "big", "members": ["y1", "y2", "y3", "y4"]})
            assert r.status_code == 413
            r = await http.post(
                "/v1/groups", json={"name": "c", "members": ["y1", "y2", "y3", "y4"], "kind": "channel"}
            )
            assert (r.status_code, r.json()["kind"]) == (201, "channel")  # channels have no size limit
            r = await http.post("/v1/groups", json={"name": "", "members": ["bad id!"]})
            assert (r.status_code, r.json()["error"]) == (400, "bad_request")
            r = await http.get("/v1/groups/g:01ARZ3NDEKTSV4RRFFQ69G5FAV")
            assert r.status_code == 404
        async with stack.http(bob) as http:
            r = await http.post(f"/v1/groups/{conv}/members", json={"members": [carol]})
            assert r.status_code == 200
            r = await http.delete(f"/v1/groups/{conv}/members/{bob}")  # leave
            assert r.status_code == 200
            assert bob not in [m["user"] for m in r.json()["members"]]


@both_adapters
@both_stores
async def test_one_send_reaches_500_members_exactly_once(stack: Stack) -> None:
    owner = unique("owner")
    users = [f"{unique('m')}" for _ in range(499)]
    group = await create(stack, owner, users)
    conv = group["conv"]
    got: dict[str, list[tuple[str, int]]] = defaultdict(list)
    clients: list[MqttClient] = []

    def on_message_for(user: str) -> Any:
        def on_message(topic: str, payload: bytes, qos: int) -> None:
            env = json.loads(payload)
            if env.get("type") == "msg":
                got[user].append((env["conv"], env["seq"]))

        return on_message

    try:
        for user in [owner, *users]:
            device = f"{user}-d"
            client = await connect(
                "127.0.0.1",
                stack.mqtt_port,
                Creds(device, user, stack.token(user, device)),
                on_message=on_message_for(user),
            )
            await client.subscribe([(f"u/{user}/in", 1)])
            clients.append(client)
        async with connect_device(stack.mqtt_port, owner, "sender", stack.token(owner, "sender")) as sender:
            await sender.send(send_env(conv, "to everyone"))
            await sender.wait_for(lambda e: e["type"] == "ack")
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and sum(len(v) for v in got.values()) < 500:
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)
    finally:
        for client in clients:
            client.disconnect()
        await asyncio.gather(*(c.wait_closed() for c in clients), return_exceptions=True)
    assert len(got) == 500
    assert all(v == [(conv, 1)] for v in got.values())


@pytest.mark.parametrize("stack", ["inbroker"], indirect=True)
@both_stores
async def test_groups_work_with_the_in_broker_adapter_too(stack: Stack) -> None:
    alice, bob = unique("alice"), unique("bob")
    group = await create(stack, alice, [bob])
    async with (
        connect_device(stack.mqtt_port, alice, "a1", stack.token(alice, "a1")) as a1,
        connect_device(stack.mqtt_port, bob, "b1", stack.token(bob, "b1")) as b1,
    ):
        await a1.send(send_env(group["conv"], "hi"))
        assert (await b1.wait_for(lambda e: e["type"] == "msg"))[0]["body"] == "hi"
