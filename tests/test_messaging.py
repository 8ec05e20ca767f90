"""End-to-end 1:1 messaging through the real broker and bridge."""

from __future__ import annotations

import asyncio

from mqchat.ids import dm_conv
from tests.conftest import Stack, both_adapters, both_stores
from tests.helpers import connect_device, send_env, unique


@both_adapters
@both_stores
async def test_alice_and_bob_chat_with_gapless_seq_and_multi_device(stack: Stack) -> None:
    alice, bob = unique("alice"), unique("bob")
    conv = dm_conv(alice, bob)
    async with (
        connect_device(stack.mqtt_port, alice, "a1", stack.token(alice, "a1")) as a1,
        connect_device(stack.mqtt_port, alice, "a2", stack.token(alice, "a2")) as a2,
        connect_device(stack.mqtt_port, bob, "b1", stack.token(bob, "b1")) as b1,
    ):
        sends = [send_env(conv, f"a{i}") for i in range(3)]
        for env in sends:
            await a1.send(env)
        await a1.wait_for(lambda e: e["type"] == "ack", count=3)
        reply = send_env(conv, "hi alice")
        await b1.send(reply)
        acks = await b1.wait_for(lambda e: e["type"] == "ack")

        bob_msgs = await b1.wait_for(lambda e: e["type"] == "msg", count=4)
        alice_other = await a2.wait_for(lambda e: e["type"] == "msg", count=4)

    a1_acks = a1.envelopes("ack")
    assert [a["seq"] for a in a1_acks] == [1, 2, 3]
    assert [a["id"] for a in a1_acks] == [s["id"] for s in sends]
    assert acks[0]["seq"] == 4
    assert acks[0]["id"] == reply["id"]
    assert [m["seq"] for m in bob_msgs] == [1, 2, 3, 4]
    assert [m["body"] for m in bob_msgs] == ["a0", "a1", "a2", "hi alice"]
    # alice's second device sees what her first device sent, with sender device attribution
    assert [(m["from"], m["dev"]) for m in alice_other[:3]] == [(alice, "a1")] * 3
    assert alice_other[3]["from"] == bob
    assert all(m["conv"] == conv and len(m["mid"]) == 26 for m in bob_msgs)
    # replies go only to the sending device
    assert a2.envelopes("ack") == []


@both_adapters
@both_stores
async def test_duplicate_send_is_stored_once_and_acked_identically(stack: Stack) -> None:
    alice, bob = unique("alice"), unique("bob")
    conv = dm_conv(alice, bob)
    env = send_env(conv, "only once")
    async with connect_device(stack.mqtt_port, alice, "a1", stack.token(alice, "a1")) as a1:
        for _ in range(3):
            await a1.send(env)
        acks = await a1.wait_for(lambda e: e["type"] == "ack", count=3)
    assert acks[0] == acks[1] == acks[2]
    assert acks[0]["seq"] == 1
    page = await stack.store.fetch_after(conv, 0, 10)
    assert [m.client_id for m in page.messages] == [env["id"]]
    assert stack.store.statistics().duplicates == 2


@both_adapters
@both_stores
async def test_one_devices_sends_keep_their_order_under_load(stack: Stack) -> None:
    alice, bob = unique("alice"), unique("bob")
    conv = dm_conv(alice, bob)
    async with connect_device(stack.mqtt_port, alice, "a1", stack.token(alice, "a1")) as a1:
        sends = [send_env(conv, str(i)) for i in range(200)]
        await asyncio.gather(*(a1.send(e) for e in sends))
        await a1.wait_for(lambda e: e["type"] == "ack", count=200, timeout=30)
    page = await stack.store.fetch_after(conv, 0, 500)
    assert [m.seq for m in page.messages] == list(range(1, 201))
    assert stack.store.statistics().appended == 200
    # How many commits they shared depends on how fast they arrive against how fast the store
    # commits (on a busy machine they may arrive one by one): the storage contract's
    # test_concurrent_appends_keep_call_order_and_share_commits checks the group commit itself.


@both_adapters
@both_stores
async def test_reusing_an_id_in_another_conversation_is_refused_and_leaks_nothing(stack: Stack) -> None:
    alice, bob, carol = unique("alice"), unique("bob"), unique("carol")
    first = send_env(dm_conv(alice, bob), "for bob only", id="reused-1")
    second = send_env(dm_conv(alice, carol), "for carol", id="reused-1")
    async with (
        connect_device(stack.mqtt_port, alice, "a1", stack.token(alice, "a1")) as a1,
        connect_device(stack.mqtt_port, carol, "c1", stack.token(carol, "c1")) as c1,
    ):
        await a1.send(first)
        await a1.wait_for(lambda e: e["type"] == "ack")
        await a1.send(second)
        errors = await a1.wait_for(lambda e: e["type"] == "error")
        await asyncio.sleep(0.3)
    assert errors[0]["code"] == "id_reused"
    assert errors[0]["id"] == "reused-1"
    assert c1.envelopes() == []
    assert await stack.store.last_seq(dm_conv(alice, carol)) == 0


@both_adapters
@both_stores
async def test_typing_reaches_the_other_member_only(stack: Stack) -> None:
    alice, bob = unique("alice"), unique("bob")
    conv = dm_conv(alice, bob)
    async with (
        connect_device(stack.mqtt_port, alice, "a1", stack.token(alice, "a1")) as a1,
        connect_device(stack.mqtt_port, alice, "a2", stack.token(alice, "a2")) as a2,
        connect_device(stack.mqtt_port, bob, "b1", stack.token(bob, "b1")) as b1,
    ):
        await a1.send({"type": "typing", "conv": conv, "state": True})
        got = await b1.wait_for(lambda e: e["type"] == "typing")
        await asyncio.sleep(0.3)
    assert got == [{"type": "typing", "conv": conv, "user": alice, "state": True}]
    assert a2.envelopes("typing") == []
    assert a1.envelopes() == []
