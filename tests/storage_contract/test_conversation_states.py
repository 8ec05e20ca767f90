"""ConversationStates: monotonic, bounded watermarks; the per-user change index behind sync."""

from __future__ import annotations

import pytest

from storage.base import MessageStore, SeqBeyondEnd
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
