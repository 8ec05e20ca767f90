"""The MessageStore contract, run against every backend (SQLite today)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mqchat.errors import StorageClosed
from storage.base import MessageStore, NewMessage, NoSuchConversation, NotMember, SeqBeyondEnd
from storage.sqlite import SqliteMessageStore

BACKENDS = ["sqlite"]


async def open_store(backend: str, where: Path) -> MessageStore:
    assert backend == "sqlite"
    return await SqliteMessageStore.open(where / "store.sqlite3")


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[MessageStore]:
    s = await open_store(request.param, tmp_path)
    yield s
    await s.aclose()


def new(conv: str, client_id: str, sender: str = "alice", body: str = "hi", ts: int = 1) -> NewMessage:
    members = tuple(conv.split(":")[1:]) if conv.startswith("dm:") else (sender,)
    return NewMessage(
        conv=conv,
        members=members,
        sender=sender,
        device="d1",
        client_id=client_id,
        kind="text",
        body=body,
        media=(),
        ts=ts,
    )


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


async def test_closed_store_refuses_work(tmp_path: Path) -> None:
    s = await open_store("sqlite", tmp_path)
    await s.aclose()
    with pytest.raises(StorageClosed):
        await s.append(new("dm:alice:bob", "late"))


async def test_reopen_keeps_messages_and_continues_seq(tmp_path: Path) -> None:
    s = await open_store("sqlite", tmp_path)
    for i in range(3):
        await s.append(new("dm:alice:bob", f"r{i}"))
    await s.aclose()
    s = await open_store("sqlite", tmp_path)
    try:
        again = await s.append(new("dm:alice:bob", "r0"))
        assert again.duplicate
        assert again.message.seq == 1
        nxt = await s.append(new("dm:alice:bob", "r3"))
        assert nxt.message.seq == 4
    finally:
        await s.aclose()


async def test_watermarks_are_monotonic_and_bounded(store: MessageStore) -> None:
    for i in range(5):
        await store.append(new("dm:alice:bob", f"w{i}"))
    r = await store.set_watermark(conv="dm:alice:bob", user="bob", delivered=3, read=None)
    assert r.changed
    assert (r.state.delivered, r.state.read, r.state.unread) == (3, 0, 5)
    r = await store.set_watermark(conv="dm:alice:bob", user="bob", delivered=2, read=None)
    assert not r.changed  # lower: ignored
    assert r.state.delivered == 3
    r = await store.set_watermark(conv="dm:alice:bob", user="bob", delivered=None, read=4)
    assert (r.state.delivered, r.state.read, r.state.unread) == (4, 4, 1)  # reading implies delivery
    with pytest.raises(SeqBeyondEnd):
        await store.set_watermark(conv="dm:alice:bob", user="bob", delivered=None, read=6)
    state = await store.conversation_state(conv="dm:alice:bob", user="bob")
    assert state is not None
    assert (state.read, state.last_seq) == (4, 5)
    alice = await store.conversation_state(conv="dm:alice:bob", user="alice")
    assert alice is not None
    assert alice.read == 5  # the sender has read what they sent
    assert await store.conversation_state(conv="dm:alice:bob", user="carol") is None


async def test_changes_since_returns_only_what_changed_in_order(store: MessageStore) -> None:
    for i in range(50):
        await store.append(new(f"dm:alice:u{i:02d}", f"c{i}", sender="u30" if i == 30 else "alice"))
    everything = await store.changes_since(user="alice", version=0, limit=100)
    assert len(everything.states) == 50
    assert not everything.more
    cursor = everything.version
    assert cursor <= await store.current_version()
    assert (await store.changes_since(user="alice", version=cursor, limit=10)).states == ()
    await store.append(new("dm:alice:u07", "later", sender="u07"))
    await store.set_watermark(conv="dm:alice:u30", user="alice", delivered=None, read=1)
    await store.append(new("dm:u40:u41", "not alice's", sender="u40"))
    changed = await store.changes_since(user="alice", version=cursor, limit=10)
    assert [s.conv for s in changed.states] == ["dm:alice:u07", "dm:alice:u30"]
    assert [(s.last_seq, s.unread) for s in changed.states] == [(2, 1), (1, 0)]
    paged = await store.changes_since(user="alice", version=0, limit=20)
    assert len(paged.states) == 20
    assert paged.more
    rest = await store.changes_since(user="alice", version=paged.version, limit=100)
    assert len(paged.states) + len(rest.states) == 50
    assert {s.conv for s in paged.states}.isdisjoint({s.conv for s in rest.states})


async def test_groups_membership_and_join_points(store: MessageStore) -> None:
    conv = "g:01ARZ3NDEKTSV4RRFFQ69G5FAV"
    group = await store.create_group(conv=conv, name="g", kind="group", creator="alice", members=("bob",), ts=1)
    assert {(m.user, m.role, m.joined_seq) for m in group.members} == {("alice", "admin", 1), ("bob", "member", 1)}

    def gnew(sender: str, cid: str) -> NewMessage:
        return NewMessage(
            conv=conv, members=(), sender=sender, device="d", client_id=cid, kind="text", body="x", media=(), ts=2
        )

    first = await store.append(gnew("bob", "g1"))
    assert first.members == ("alice", "bob")
    with pytest.raises(NotMember):
        await store.append(gnew("carol", "g2"))
    group = await store.add_members(conv=conv, users=("carol", "bob"), ts=3)
    assert group.member("carol") is not None
    assert group.member("carol").joined_seq == 2  # type: ignore[union-attr]
    assert group.member("bob").joined_seq == 1  # type: ignore[union-attr]
    carol_state = await store.conversation_state(conv=conv, user="carol")
    assert carol_state is not None
    assert carol_state.unread == 0  # nothing before the join point is unread
    assert (await store.append(gnew("carol", "g3"))).members == ("alice", "bob", "carol")
    group = await store.remove_member(conv=conv, user="bob")
    assert group.users == ("alice", "carol")
    with pytest.raises(NotMember):
        await store.append(gnew("bob", "g4"))
    with pytest.raises(NotMember):
        await store.set_watermark(conv=conv, user="bob", delivered=1, read=None)
    assert await store.conversation_state(conv=conv, user="bob") is None
    group = await store.set_role(conv=conv, user="carol", role="admin")
    assert group.member("carol").role == "admin"  # type: ignore[union-attr]
    with pytest.raises(NoSuchConversation):
        await store.append(
            NewMessage(conv="g:01BX5ZZKBKACTAV9WEVGEMMVRZ", members=(), sender="a", device="d", client_id="z",
                       kind="text", body="x", media=(), ts=1)
        )  # fmt: skip
    assert await store.group("g:01BX5ZZKBKACTAV9WEVGEMMVRZ") is None
