"""ConversationStates: monotonic, bounded watermarks; the per-user change index behind sync."""

from __future__ import annotations

import asyncio

import pytest

from bridge.watermarks import MergedWatermarks
from storage.base import MessageStore, SeqBeyondEnd
from storage.records import WatermarkResult
from tests.storage_contract.helpers import new


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


class _Counting:
    """The store's set_watermark, counted."""

    def __init__(self, store: MessageStore) -> None:
        self.store = store
        self.writes = 0

    async def set_watermark(self, *, conv: str, user: str, delivered: int | None, read: int | None) -> WatermarkResult:
        self.writes += 1
        return await self.store.set_watermark(conv=conv, user=user, delivered=delivered, read=read)


async def test_a_burst_of_receipts_is_merged_into_two_writes(store: MessageStore) -> None:
    """What a phone coming back online sends: out of order, repeated, one past the end."""
    conv = "dm:alice:bob"
    for i in range(5):
        await store.append(new(conv, f"b{i}"))
    counting = _Counting(store)
    merged = MergedWatermarks(counting)
    burst = [("recv", 2), ("recv", 5), ("recv", 3), ("read", 1), ("read", 4), ("read", 2), ("read", 4)]
    results = await asyncio.gather(
        *(
            merged.set_watermark(conv=conv, user="bob", delivered=seq if kind == "recv" else None,
                                 read=seq if kind == "read" else None)
            for kind, seq in burst
        )
    )  # fmt: skip
    assert counting.writes == 2  # the first request, then the six that arrived while it was written
    assert [r.changed for r in results] == [True, True, False, False, False, False, False]
    assert {(r.state.delivered, r.state.read) for r in results[1:]} == {(5, 4)}
    # a merged write that is refused: each of its requests is written alone and answered alone
    results = await asyncio.gather(
        merged.set_watermark(conv=conv, user="bob", delivered=None, read=4),
        merged.set_watermark(conv=conv, user="bob", delivered=None, read=6),
        merged.set_watermark(conv=conv, user="bob", delivered=None, read=5),
        return_exceptions=True,
    )
    assert isinstance(results[1], SeqBeyondEnd)
    assert [r.changed for r in results if isinstance(r, WatermarkResult)] == [False, True]
    state = await store.conversation_state(conv=conv, user="bob")
    assert state is not None
    assert (state.delivered, state.read) == (5, 5)
