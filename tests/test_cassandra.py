"""The Cassandra store against a real node: recovery of an interrupted send, the node killed
with kill -9 under traffic and brought back, and two mqchat processes writing into one
conversation. (The contract suite and the end-to-end suites run on Cassandra too.)"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time
from pathlib import Path
from typing import Any

import pytest

from mqchat.config import StorageConfig
from mqchat.ids import dm_conv
from storage import open_storage
from storage.records import NewMessage
from tests.cassandra_node import CassandraEndpoint
from tests.cassandra_store import KEYSPACE
from tests.conftest import Served, make_config, open_stack, start_served, stop_served
from tests.helpers import connect_device, send_env, send_until_acked, unique


def _message(conv: str, sender: str, client_id: str, body: str = "hi") -> NewMessage:
    members = tuple(conv.split(":")[1:])
    return NewMessage(conv, members, sender, "d1", client_id, "text", body, (), 1)


async def test_a_send_recorded_but_never_sequenced_is_written_once_on_retry(
    cassandra_storage_config: StorageConfig, cassandra_session: Any
) -> None:
    """A process killed after the dedup row and before the round: the retry writes the message
    (with the mid it was given); killed after the round but before completing the dedup row: the
    retry finds the message and answers with it, stored once."""
    conv = "dm:alice:bob"
    async with open_storage(cassandra_storage_config) as storage:
        store = storage.messages
        first = await store.append(_message(conv, "alice", "c1"))
        # killed after the round: the dedup row lost its seq
        cassandra_session.execute(
            f"UPDATE {KEYSPACE}.client_ids SET seq = null WHERE sender = 'alice' AND client_id = 'c1'"
        )
        # killed before the round: a dedup row whose message never landed
        cassandra_session.execute(
            f"INSERT INTO {KEYSPACE}.client_ids (sender, client_id, conv, mid, after_seq) "
            "VALUES ('alice', 'c2', %s, 'MID-OF-C2', 1)",
            (conv,),
        )
    async with open_storage(cassandra_storage_config) as storage:
        store = storage.messages
        again = await store.append(_message(conv, "alice", "c1", body="retry"))
        assert again.duplicate
        assert again.message == first.message
        second = await store.append(_message(conv, "alice", "c2"))
        assert not second.duplicate
        assert (second.message.seq, second.message.mid) == (2, "MID-OF-C2")
        third = await store.append(_message(conv, "alice", "c2"))
        assert third.duplicate
        assert third.message == second.message
        page = await store.fetch_after(conv, 0, 10)
        assert [(m.seq, m.client_id) for m in page.messages] == [(1, "c1"), (2, "c2")]


async def test_buckets_hold_the_log_across_partition_edges(
    cassandra_storage_config: StorageConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With tiny buckets, a conversation spans many partitions: seq stays gapless, reads cross
    the edges both ways, and a fresh process finds the head by walking from the hint."""
    from storage.cassandra import core, messages

    monkeypatch.setattr(core, "BUCKET_SIZE", 7)
    monkeypatch.setattr(messages, "BUCKET_SIZE", 7)
    conv = "dm:alice:carol"
    async with open_storage(cassandra_storage_config) as storage:
        results = await asyncio.gather(*(storage.messages.append(_message(conv, "alice", f"b{i}")) for i in range(40)))
        assert [r.message.seq for r in results] == list(range(1, 41))
    async with open_storage(cassandra_storage_config) as storage:
        store = storage.messages
        assert await store.last_seq(conv) == 40
        after = await store.fetch_after(conv, 3, 20)
        assert [m.seq for m in after.messages] == list(range(4, 24))
        assert after.more
        before = await store.fetch_before(conv, 1000, 15)
        assert [m.seq for m in before.messages] == list(range(26, 41))
        assert before.more
        nxt = await store.append(_message(conv, "alice", "b40"))
        assert nxt.message.seq == 41


async def _send_collecting(
    port: int, user: str, token: str, envelopes: list[dict[str, Any]], *, deadline_s: float
) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Send each envelope, re-sending unacked ones every second with the same id, until all are
    acked; returns the acks and every error envelope seen."""
    acks: dict[str, dict[str, Any]] = {}
    errors: list[dict[str, Any]] = []
    deadline = time.monotonic() + deadline_s
    async with connect_device(port, user, "d1", token) as dev:
        while len(acks) < len(envelopes):
            assert time.monotonic() < deadline, f"only {len(acks)}/{len(envelopes)} acked; errors: {errors[-3:]}"
            for env in envelopes:
                if env["id"] not in acks:
                    await dev.send(env)
                    await asyncio.sleep(0.01)
            await asyncio.sleep(1.0)
            for e in dev.envelopes("ack"):
                acks.setdefault(e["id"], e)
            errors = dev.envelopes("error")
    return acks, errors


async def test_kill9_of_cassandra_mid_traffic_then_restart(
    cassandra_node: CassandraEndpoint, cassandra_storage_config: StorageConfig, tmp_path: Path
) -> None:
    """The JVM is killed with kill -9 while a device sends: the device is told `unavailable`
    meanwhile (and HTTP answers 503); after the node is back, every message is acked once, nothing acked is lost, no seq
    is reused, and the mqchat node recovered by itself."""
    node = cassandra_node.node
    if node is None:
        pytest.skip("an external cluster (MQCHAT_TEST_CASSANDRA) is not ours to kill")
    storage = dataclasses.replace(cassandra_storage_config, data_dir=tmp_path, cassandra_timeout_s=2.0)
    config = make_config(tmp_path, storage=storage)
    alice, bob = unique("alice"), unique("bob")
    conv = dm_conv(alice, bob)
    before = [send_env(conv, f"before-{i}") for i in range(20)]
    during = [send_env(conv, f"during-{i}") for i in range(20)]
    async with open_stack(config, "inbroker") as stack:
        token = stack.token(alice, "d1")
        acked_before = await send_until_acked(stack.mqtt_port, alice, "d1", token, before)
        node.kill()
        restarted = asyncio.create_task(asyncio.to_thread(_restart_after, node, 3.0))
        async with stack.http(bob) as http:  # the node is down for several seconds from here
            down = await http.get(f"/v1/conversations/{conv}/messages")
        assert down.status_code == 503, down.text
        assert down.json()["error"] == "unavailable"
        acks, errors = await _send_collecting(stack.mqtt_port, alice, token, during, deadline_s=240)
        await restarted
        assert any(e.get("code") == "unavailable" for e in errors), f"no unavailable error seen: {errors[:3]}"
        async with stack.http(bob) as http:
            page = (await http.get(f"/v1/conversations/{conv}/messages", params={"limit": 500})).json()
    history = page["messages"]
    assert [m["seq"] for m in history] == list(range(1, 41)), "gapless, no seq reused"
    assert sorted(m["id"] for m in history) == sorted(e["id"] for e in before + during), "each stored once"
    for m in history:
        ack = acked_before.get(m["id"]) or acks[m["id"]]
        assert (ack["seq"], ack["mid"]) == (m["seq"], m["mid"])


def _restart_after(node: Any, delay_s: float) -> None:
    time.sleep(delay_s)
    node.restart()


async def test_two_mqchat_processes_write_into_one_conversation(
    cassandra_storage_config: StorageConfig, tmp_path: Path
) -> None:
    """Alice sends through one `mqchat serve`, Bob through another, at the same time, into one
    conversation: seqs are unique and increasing, each sender's order is kept, and both nodes
    answer the same history."""
    secret = secrets.token_urlsafe(32)
    env = {"MQCHAT_STORE": cassandra_storage_config.url}
    nodes: list[Served] = []
    try:
        for name in ("a", "b"):
            nodes.append(start_served(tmp_path / name, secret, tmp_path / f"{name}.log", adapter="inbroker", env=env))
        for served in nodes:
            await served.wait_healthy()
        alice, bob = unique("alice"), unique("bob")
        conv = dm_conv(alice, bob)
        from_alice = [send_env(conv, f"a{i}") for i in range(150)]
        from_bob = [send_env(conv, f"b{i}") for i in range(150)]
        acks_a, acks_b = await asyncio.gather(
            send_until_acked(nodes[0].mqtt_port, alice, "a1", nodes[0].token(alice, "a1"), from_alice),
            send_until_acked(nodes[1].mqtt_port, bob, "b1", nodes[1].token(bob, "b1"), from_bob),
        )
        histories = []
        for served, user in ((nodes[0], alice), (nodes[1], bob)):
            async with served.http(user) as http:
                page = (await http.get(f"/v1/conversations/{conv}/messages", params={"limit": 500})).json()
            histories.append([(m["seq"], m["id"]) for m in page["messages"]])
        assert histories[0] == histories[1], "both nodes show one order"
        seqs = [seq for seq, _ in histories[0]]
        assert seqs == list(range(1, 301))
        by_id = dict((mid, seq) for seq, mid in histories[0])
        for sent, acks in ((from_alice, acks_a), (from_bob, acks_b)):
            order = [by_id[e["id"]] for e in sent]
            assert order == sorted(order), "each device's send order is kept"
            assert all(acks[e["id"]]["seq"] == by_id[e["id"]] for e in sent)
    finally:
        for served in nodes:
            stop_served(served)


async def test_one_send_retried_through_two_processes_at_once_is_stored_once(
    cassandra_storage_config: StorageConfig,
) -> None:
    """A phone's connection is cut while its send is being stored; it reconnects through the
    balancer to another node and sends again, so two processes append the same (sender,
    client_id) at the same moment, with other traffic in the conversation. Whichever way their
    rounds interleave, the message is stored once and both answer with the same seq and mid."""
    conv = dm_conv(unique("alice"), unique("bob"))
    sender = conv.split(":")[1]
    async with open_storage(cassandra_storage_config) as one, open_storage(cassandra_storage_config) as two:
        for k in range(60):
            same = _message(conv, sender, f"retried-{k}")
            # the other node has also just stored an unrelated message, with a stale head or not
            results = await asyncio.gather(
                one.messages.append(same),
                two.messages.append(same),
                (one if k % 2 else two).messages.append(_message(conv, sender, f"other-{k}")),
            )
            first, second = results[0].message, results[1].message
            assert (first.seq, first.mid) == (second.seq, second.mid), k
            assert results[0].duplicate != results[1].duplicate, k
        stored: list[str] = []
        after = 0
        while True:
            page = await one.messages.fetch_after(conv, after, 200)
            stored += [m.client_id for m in page.messages]
            if not page.more:
                break
            after = page.messages[-1].seq
    assert sorted(stored) == sorted([f"retried-{k}" for k in range(60)] + [f"other-{k}" for k in range(60)])
