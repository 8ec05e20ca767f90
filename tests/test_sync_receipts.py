"""Receipts (monotonic watermarks, coalesced events, multi-device) and the sync endpoint."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from bridge.history import encode_cursor
from mqchat.ids import dm_conv
from tests.conftest import Stack, both_stores, make_config
from tests.helpers import connect_device, send_env, unique


async def _sync(stack: Stack, user: str, **params: Any) -> dict[str, Any]:
    async with stack.http(user) as http:
        r = await http.get("/v1/conversations", params=params)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


@both_stores
async def test_receipts_are_monotonic_coalesced_and_reach_every_device(stack: Stack) -> None:
    alice, bob = unique("alice"), unique("bob")
    conv = dm_conv(alice, bob)
    async with (
        connect_device(stack.mqtt_port, alice, "a1", stack.token(alice, "a1")) as a1,
        connect_device(stack.mqtt_port, bob, "b1", stack.token(bob, "b1")) as b1,
        connect_device(stack.mqtt_port, bob, "b2", stack.token(bob, "b2")) as b2,
    ):
        for i in range(5):
            await a1.send(send_env(conv, f"m{i}"))
        await a1.wait_for(lambda e: e["type"] == "ack", count=5)
        # out of order and duplicated, as a flaky network delivers them
        for kind, seq in [("recv", 2), ("recv", 5), ("recv", 3), ("read", 1), ("read", 4), ("read", 2), ("read", 4)]:
            await b1.send({"type": kind, "conv": conv, "seq": seq})
        receipts = await a1.wait_for(lambda e: e["type"] == "receipt", timeout=5)
        await asyncio.sleep(1.2)  # any further window would have closed
        own = await b2.wait_for(lambda e: e["type"] == "receipt")
    final = {"type": "receipt", "conv": conv, "user": bob, "delivered": 5, "read": 4}
    assert a1.envelopes("receipt") == [final]  # one event for the burst, with the highest values
    assert receipts == [final]
    assert own[-1] == final  # bob's other device learns he read up to 4, to clear notifications
    state = await stack.store.conversation_state(conv=conv, user=bob)
    assert state is not None
    assert (state.delivered, state.read, state.unread) == (5, 4, 1)


@both_stores
async def test_watermark_errors(stack: Stack) -> None:
    alice, bob, carol = unique("alice"), unique("bob"), unique("carol")
    conv = dm_conv(alice, bob)
    async with connect_device(stack.mqtt_port, alice, "a1", stack.token(alice, "a1")) as a1:
        await a1.send(send_env(conv, "one"))
        await a1.wait_for(lambda e: e["type"] == "ack")
        await a1.send({"type": "read", "conv": conv, "seq": 2})
        await a1.send({"type": "read", "conv": dm_conv(bob, carol), "seq": 1})
        await a1.send({"type": "recv", "conv": conv, "seq": "1"})
        errors = await a1.wait_for(lambda e: e["type"] == "error", count=3)
    assert [(e["code"], e.get("conv")) for e in errors] == [
        ("bad_seq", conv),
        ("not_member", dm_conv(bob, carol)),
        ("bad_request", conv),
    ]


@both_stores
async def test_unread_counts_follow_a_scripted_conversation(stack: Stack) -> None:
    alice, bob = unique("alice"), unique("bob")
    conv = dm_conv(alice, bob)

    async def unread(user: str) -> int:
        body = await _sync(stack, user)
        [item] = [c for c in body["conversations"] if c["conv"] == conv]
        assert item["unread"] == item["last_seq"] - item["read"]
        return int(item["unread"])

    async with (
        connect_device(stack.mqtt_port, alice, "a1", stack.token(alice, "a1")) as a1,
        connect_device(stack.mqtt_port, bob, "b1", stack.token(bob, "b1")) as b1,
    ):
        script: list[tuple[str, Any, int, int]] = [
            ("alice sends", a1, 0, 1),
            ("alice sends", a1, 0, 2),
            ("bob reads 1", b1, 0, 1),
            ("bob sends", b1, 1, 0),  # replying marks what came before as read
            ("alice reads 3", a1, 0, 0),
            ("alice sends", a1, 0, 1),
            ("alice sends", a1, 0, 2),
            ("bob reads 4", b1, 0, 1),
            ("bob reads 2 (late)", b1, 0, 1),  # lower: ignored
            ("bob reads 5", b1, 0, 0),
        ]
        for index, (step, dev, want_alice, want_bob) in enumerate(script):
            if "sends" in step:
                body = f"{index}: {step}"
                await dev.send(send_env(conv, body))
                await dev.wait_for(lambda e, b=body: e["type"] == "msg" and e["body"] == b)
            else:
                seq = int(step.split("reads ")[1].split()[0])
                await dev.send({"type": "read", "conv": conv, "seq": seq})
                await asyncio.sleep(0.2)
            assert (await unread(alice), await unread(bob)) == (want_alice, want_bob), step


@both_stores
async def test_a_device_away_for_the_whole_exchange_catches_up_with_one_sync(stack: Stack) -> None:
    away, peers = unique("away"), [unique("p") for _ in range(6)]
    sent: dict[str, list[str]] = {}
    first = await _sync(stack, away)
    assert first["conversations"] == []
    cursor = first["cursor"]
    for i, peer in enumerate(peers):
        conv = dm_conv(away, peer)
        async with connect_device(stack.mqtt_port, peer, f"{peer}-d", stack.token(peer, f"{peer}-d")) as dev:
            bodies = [f"{peer}-{k}" for k in range(i % 3 + 1)]
            for body in bodies:
                await dev.send(send_env(conv, body))
            await dev.wait_for(lambda e: e["type"] == "ack", count=len(bodies))
        sent[conv] = bodies
    requests = 0
    got: dict[str, list[str]] = {}
    while True:
        body = await _sync(stack, away, since=cursor, include_messages=50, limit=4)
        requests += 1
        for item in body["conversations"]:
            got[item["conv"]] = [m["body"] for m in item["messages"]]
            assert item["unread"] == len(sent[item["conv"]])
            assert item["messages_more"] is False
        cursor = body["cursor"]
        if not body["more"]:
            break
    assert got == sent
    assert requests == 2  # 6 changed conversations, 4 per page: exactly what changed, nothing else
    again = await _sync(stack, away, since=cursor)
    assert again["conversations"] == []
    assert again["more"] is False


@pytest.mark.parametrize("cursor", ["garbage", "djE6LTE", encode_cursor(10**18), "", "v1:5"])
@both_stores
async def test_bad_cursors_are_a_clean_400(stack: Stack, cursor: str) -> None:
    async with stack.http("alice") as http:
        r = await http.get("/v1/conversations", params={"since": cursor})
    assert r.status_code == 400
    assert r.json()["error"] == "bad_cursor"


@pytest.mark.parametrize(
    "query", [{"limit": 0}, {"limit": 10_000}, {"include_messages": -1}, {"include_messages": 101}]
)
@both_stores
async def test_bad_sync_parameters_are_a_clean_400(stack: Stack, query: dict[str, int]) -> None:
    async with stack.http("alice") as http:
        r = await http.get("/v1/conversations", params=query)
    assert r.status_code == 400
    assert r.json()["error"] == "bad_request"


@both_stores
async def test_sync_needs_a_token(stack: Stack) -> None:
    async with stack.http() as http:
        r = await http.get("/v1/conversations")
    assert r.status_code == 401


async def test_an_old_database_is_migrated(tmp_path: Path) -> None:
    import sqlite3

    from storage.sqlite import SqliteMessageStore

    config = make_config(tmp_path)
    path = config.storage.sqlite_path
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    conn.executescript(
        """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
        INSERT INTO meta VALUES ('schema_version', '1');
        CREATE TABLE conversations (conv TEXT PRIMARY KEY, last_seq INTEGER NOT NULL, updated_at INTEGER NOT NULL)
            WITHOUT ROWID;
        INSERT INTO conversations VALUES ('dm:alice:bob', 3, 1000);
        """
    )
    conn.commit()
    conn.close()
    store = await SqliteMessageStore.open(path)
    try:
        state = await store.conversation_state(conv="dm:alice:bob", user="bob")
        assert state is not None
        assert (state.last_seq, state.unread) == (3, 3)
    finally:
        await store.aclose()


async def test_sync_cost_follows_what_changed_not_how_many_conversations(tmp_path: Path) -> None:
    """5,000 conversations, 3 new messages: the answer holds 3, found through the (user, version) index."""
    import sqlite3

    from storage.records import NewMessage
    from storage.sqlite import SqliteMessageStore

    path = tmp_path / "many.sqlite3"
    store = await SqliteMessageStore.open(path)
    try:

        def msg(conv: str, sender: str, i: int) -> NewMessage:
            return NewMessage(
                conv=conv,
                members=tuple(conv.split(":")[1:]),
                sender=sender,
                device="d",
                client_id=f"{sender}-{i}",
                kind="text",
                body="x",
                media=(),
                ts=1,
            )

        await asyncio.gather(*(store.append(msg(dm_conv("busy", f"p{i:04d}"), "busy", i)) for i in range(5000)))
        cursor = (await store.changes_since(user="busy", version=0, limit=5000)).version
        for i in (7, 700, 4000):
            await store.append(msg(dm_conv("busy", f"p{i:04d}"), f"p{i:04d}", i))
        page = await store.changes_since(user="busy", version=cursor, limit=100)
        assert [s.conv for s in page.states] == [dm_conv("busy", f"p{i:04d}") for i in (7, 700, 4000)]
        assert [s.unread for s in page.states] == [1, 1, 1]
    finally:
        await store.aclose()
    conn = sqlite3.connect(path)
    plan = " ".join(
        str(row[-1])
        for row in conn.execute(
            "EXPLAIN QUERY PLAN SELECT u.conv FROM user_convs u LEFT JOIN conversations c ON c.conv = u.conv "
            "WHERE u.user = ? AND u.version > ? ORDER BY u.version LIMIT 100",
            ("busy", cursor),
        )
    )
    conn.close()
    assert "user_convs_by_version" in plan, plan
    assert "TEMP B-TREE" not in plan, plan  # no sort of the user's whole list


async def test_typing_is_relayed_to_the_others_rate_limited_and_never_stored(tmp_path: Path) -> None:
    from bridge.pipeline import Pipeline
    from mqchat.clock import Clock
    from mqchat.config import StorageConfig
    from storage import open_storage

    class FakeClock(Clock):
        def __init__(self) -> None:
            self.now = 1000.0

        def monotonic(self) -> float:
            return self.now

    clock = FakeClock()
    async with open_storage(StorageConfig(data_dir=tmp_path), push=False) as storage:
        store = storage.messages
        pipeline = Pipeline(
            log=store, states=store, groups=store, typing_interval_s=1.0, typing_per_minute=3, clock=clock
        )
        conv = dm_conv("alice", "bob")

        async def typing(state: bool, user: str = "alice", c: str = conv) -> list[Any]:
            out = await pipeline.handle(user, "a1", json.dumps({"type": "typing", "conv": c, "state": state}).encode())
            return [(o.topic, o.qos, json.loads(o.payload)) for o in out]

        first = await typing(True)
        assert first == [("u/bob/in", 0, {"type": "typing", "conv": conv, "user": "alice", "state": True})]
        assert await typing(True) == []  # the same state again within the interval: dropped
        assert (await typing(False))[0][2]["state"] is False  # a change goes through at once
        clock.now += 2
        assert len(await typing(True)) == 1
        limited = await typing(False)
        assert limited[0][2]["code"] == "rate_limited"  # 3 per minute
        clock.now += 60
        assert len(await typing(False)) == 1
        refused = await typing(True, user="carol")
        assert refused[0][2]["code"] == "not_member"
        assert await store.last_seq(conv) == 0  # never stored
        assert (await store.changes_since(user="alice", version=0, limit=10)).states == ()
