"""MessageLog: append (dedup, gapless seq, call order, group commit), paged reads, durability."""

from __future__ import annotations

import asyncio

import pytest

from mqchat.config import StorageConfig
from mqchat.errors import StorageClosed
from storage import open_storage
from storage.base import MessageStore
from storage.records import NewMessage
from tests.storage_contract.helpers import new


async def test_seq_is_gapless_per_conversation(store: MessageStore) -> None:
    a = [await store.append(new("dm:alice:bob", f"a{i}")) for i in range(3)]
    b = [await store.append(new("dm:alice:carol", f"b{i}")) for i in range(2)]
    assert [r.message.seq for r in a] == [1, 2, 3]
    assert [r.message.seq for r in b] == [1, 2]
    assert await store.last_seq("dm:alice:bob") == 3
    assert await store.last_seq("dm:nobody:else") == 0


async def test_dedup_on_sender_and_client_id(store: MessageStore) -> None:
    first = await store.append(new("dm:alice:bob", "same", body="one"))
    again = await store.append(new("dm:alice:bob", "same", body="two"))
    other_sender = await store.append(new("dm:alice:bob", "same", sender="bob"))
    assert not first.duplicate
    assert again.duplicate
    assert not other_sender.duplicate
    assert again.message == first.message
    assert other_sender.message.seq == 2
    page = await store.fetch_after("dm:alice:bob", 0, 10)
    assert [m.body for m in page.messages] == ["one", "hi"]


async def test_concurrent_appends_keep_call_order_and_share_commits(store: MessageStore) -> None:
    results = await asyncio.gather(*(store.append(new("dm:alice:bob", f"c{i}")) for i in range(500)))
    assert [r.message.seq for r in results] == list(range(1, 501))
    assert [r.message.client_id for r in results] == [f"c{i}" for i in range(500)]
    stats = store.statistics()
    assert stats.appended == 500
    assert stats.queued == 0
    assert stats.commits < 100
    mids = [r.message.mid for r in results]
    assert len(set(mids)) == 500


async def test_duplicates_inside_one_batch(store: MessageStore) -> None:
    results = await asyncio.gather(*(store.append(new("dm:alice:bob", "dup")) for _ in range(20)))
    assert sum(not r.duplicate for r in results) == 1
    assert {r.message.seq for r in results} == {1}


async def test_paging(store: MessageStore) -> None:
    for i in range(1, 11):
        await store.append(new("dm:alice:bob", f"p{i}", body=str(i)))
    after = await store.fetch_after("dm:alice:bob", 3, 4)
    assert [m.seq for m in after.messages] == [4, 5, 6, 7]
    assert after.more
    tail = await store.fetch_after("dm:alice:bob", 7, 4)
    assert [m.seq for m in tail.messages] == [8, 9, 10]
    assert not tail.more
    before = await store.fetch_before("dm:alice:bob", 11, 3)
    assert [m.seq for m in before.messages] == [8, 9, 10]
    assert before.more
    head = await store.fetch_before("dm:alice:bob", 3, 5)
    assert [m.seq for m in head.messages] == [1, 2]
    assert not head.more
    assert (await store.fetch_after("dm:x:y", 0, 5)).messages == ()


async def test_media_round_trips(store: MessageStore) -> None:
    msg = NewMessage(
        conv="dm:alice:bob",
        members=("alice", "bob"),
        sender="alice",
        device="d",
        client_id="m",
        kind="media",
        body="",
        media=("a", "b"),
        ts=5,
    )
    stored = (await store.append(msg)).message
    assert (await store.fetch_after("dm:alice:bob", 0, 1)).messages[0] == stored
    assert stored.media == ("a", "b")


async def test_closed_store_refuses_work(storage_config: StorageConfig) -> None:
    async with open_storage(storage_config) as storage:
        s = storage.messages
    with pytest.raises(StorageClosed):
        await s.append(new("dm:alice:bob", "late"))


async def test_reopen_keeps_messages_and_continues_seq(storage_config: StorageConfig) -> None:
    async with open_storage(storage_config) as storage:
        for i in range(3):
            await storage.messages.append(new("dm:alice:bob", f"r{i}"))
    async with open_storage(storage_config) as storage:
        s = storage.messages
        again = await s.append(new("dm:alice:bob", "r0"))
        assert again.duplicate
        assert again.message.seq == 1
        nxt = await s.append(new("dm:alice:bob", "r3"))
        assert nxt.message.seq == 4
