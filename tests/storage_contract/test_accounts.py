"""Accounts: revocations (the latest kept, per device or for every device), account deletions
(begun once, resumed until finished, remembered after), the conversations a sender wrote in (left
groups included), redaction of a sender's messages in place, forgetting a user's 1:1 states and
settings; PushStore.forget_user; an older store migrated to these tables."""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mqchat.config import StorageConfig
from storage import open_storage
from storage.base import MessageStore, PushStore
from storage.records import REDACTED_KIND, DeviceToken, NewMessage, Pending, StoredMessage, UserSettings
from tests.storage_contract.helpers import new

T = 1_700_000_000_000  # ms since the epoch


def redacted(message: StoredMessage) -> StoredMessage:
    return dataclasses.replace(message, kind=REDACTED_KIND, body="", media=())


async def test_revocations_keep_the_latest_per_device_and_for_every_device(store: MessageStore) -> None:
    assert await store.revocations("alice") == {}
    await store.revoke("alice", device="a1", before_ms=T + 20)
    await store.revoke("alice", device="a1", before_ms=T + 10)  # earlier: the later one stays
    await store.revoke("alice", device="a2", before_ms=T + 15)
    await store.revoke("alice", device=None, before_ms=T + 5)
    await store.revoke("bob", device="b1", before_ms=T)
    assert await store.revocations("alice") == {"a1": T + 20, "a2": T + 15, "": T + 5}
    await store.revoke("alice", device=None, before_ms=T + 30)
    await store.revoke("alice", device="a1", before_ms=T + 20)  # repeated: nothing changes
    assert await store.revocations("alice") == {"a1": T + 20, "a2": T + 15, "": T + 30}
    assert await store.revocations("bob") == {"b1": T}
    assert await store.revocations("carol") == {}
    users = ["carol", "alice", "bob", "alice", *(f"u{i}" for i in range(700))]
    assert await store.revocations_of(users) == {"alice": {"a1": T + 20, "a2": T + 15, "": T + 30}, "bob": {"b1": T}}
    await store.revoke("u650", device="x", before_ms=T)  # in a later part of the read
    assert (await store.revocations_of(users))["u650"] == {"x": T}


async def test_a_deletion_is_begun_once_and_pending_until_finished(store: MessageStore) -> None:
    assert await store.deletion_state("alice") is None
    assert await store.pending_deletions() == []
    assert await store.begin_deletion("alice", at_ms=T) == T
    assert await store.begin_deletion("alice", at_ms=T + 5) == T  # begun already: its time stays
    assert await store.begin_deletion("bob", at_ms=T + 1) == T + 1
    assert await store.deletion_state("alice") == (T, False)
    assert await store.pending_deletions() == [("alice", T), ("bob", T + 1)]
    await store.finish_deletion("alice")
    await store.finish_deletion("alice")
    await store.finish_deletion("carol")  # never begun: nothing to finish
    assert await store.deletion_state("alice") == (T, True)  # remembered: "already deleted"
    assert await store.deletion_state("carol") is None
    assert await store.pending_deletions() == [("bob", T + 1)]
    assert await store.begin_deletion("alice", at_ms=T + 9) == T + 9  # finished: begun anew
    assert await store.deletion_state("alice") == (T + 9, False)
    assert await store.pending_deletions() == [("bob", T + 1), ("alice", T + 9)]


async def test_a_begun_deletion_outlives_the_process(storage_config: StorageConfig) -> None:
    async with open_storage(storage_config) as storage:
        await storage.messages.begin_deletion("alice", at_ms=T)
    async with open_storage(storage_config) as storage:
        assert await storage.messages.pending_deletions() == [("alice", T)]
        assert await storage.messages.begin_deletion("alice", at_ms=T + 1) == T


async def test_redaction_in_a_dm_changes_only_the_senders_messages(store: MessageStore) -> None:
    conv = "dm:alice:bob"
    sent = [(await store.append(new(conv, f"r{i}", sender=("alice", "bob")[i % 2], body=f"b{i}"))).message
            for i in range(6)]  # fmt: skip
    photo = NewMessage(conv=conv, members=("alice", "bob"), sender="alice", device="d2", client_id="photo",
                       kind="media", body="look", media=("m1", "m2"), ts=7)  # fmt: skip
    sent.append((await store.append(photo)).message)
    elsewhere = (await store.append(new("dm:alice:carol", "x", body="kept"))).message

    assert await store.redact_messages(conv=conv, sender="alice") == 4
    expected = [redacted(m) if m.sender == "alice" else m for m in sent]
    after = await store.fetch_after(conv, 0, 100)
    assert list(after.messages) == expected  # seq, mid, ts, device, client id and order unchanged
    assert [m.kind for m in after.messages] == [REDACTED_KIND, "text"] * 3 + [REDACTED_KIND]
    before = await store.fetch_before(conv, 100, 3)
    assert list(before.messages) == expected[-3:]
    assert await store.last_seq(conv) == 7
    assert (await store.fetch_after("dm:alice:carol", 0, 10)).messages == (elsewhere,)

    assert await store.redact_messages(conv=conv, sender="alice") == 0  # repeated: nothing left
    assert await store.redact_messages(conv=conv, sender="carol") == 0
    assert await store.redact_messages(conv="dm:nobody:else", sender="alice") == 0
    later = await store.append(new(conv, "later", sender="alice", body="new"))
    assert later.message.seq == 8
    assert await store.redact_messages(conv=conv, sender="alice") == 1
    assert list((await store.fetch_after(conv, 0, 100)).messages) == [*expected, redacted(later.message)]


async def test_redaction_in_a_group_changes_only_the_senders_messages(store: MessageStore) -> None:
    conv = "g:01ARZ3NDEKTSV4RRFFQ69G5FAV"
    await store.create_group(conv=conv, name="g", kind="group", creator="alice", members=("bob", "carol"), ts=1)

    def gnew(sender: str, cid: str) -> NewMessage:
        return NewMessage(conv=conv, members=(), sender=sender, device="d", client_id=cid, kind="text",
                          body=f"{sender} says {cid}", media=(), ts=2)  # fmt: skip

    sent = [(await store.append(gnew(("alice", "bob", "carol", "bob")[i % 4], f"g{i}"))).message for i in range(9)]
    assert await store.redact_messages(conv=conv, sender="bob") == 4
    page = await store.fetch_after(conv, 0, 100)
    assert list(page.messages) == [redacted(m) if m.sender == "bob" else m for m in sent]
    assert [m.seq for m in page.messages] == list(range(1, 10))
    assert await store.redact_messages(conv=conv, sender="bob") == 0
    assert list((await store.fetch_before(conv, 10, 100)).messages) == list(page.messages)


async def test_redaction_across_partition_buckets(
    storage_config: StorageConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cassandra with buckets of 4 seqs and scans of 3 rows a page: the conversation spans many
    partitions, each read over several pages (SQLite has neither and runs it as it is)."""
    if storage_config.backend == "cassandra":
        from storage.cassandra import core, messages, store

        monkeypatch.setattr(core, "BUCKET_SIZE", 4)
        monkeypatch.setattr(messages, "BUCKET_SIZE", 4)
        monkeypatch.setitem(store.PAGE_ROWS, "msg_scan", 3)
    conv = "dm:alice:bob"
    async with open_storage(storage_config) as storage:
        sent = [(await storage.messages.append(new(conv, f"m{i}", sender=("alice", "bob", "bob")[i % 3]))).message
                for i in range(30)]  # fmt: skip
    async with open_storage(storage_config) as storage:  # a fresh process finds the head from the hint
        s = storage.messages
        assert await s.redact_messages(conv=conv, sender="alice") == 10
        assert await s.redact_messages(conv=conv, sender="alice") == 0
        page = await s.fetch_after(conv, 0, 100)
        assert list(page.messages) == [redacted(m) if m.sender == "alice" else m for m in sent]


GROUP = "g:01ARZ3NDEKTSV4RRFFQ69G5FAV"
LEFT = "g:01ARZ3NDEKTSV4RRFFQ69G5FAW"
CHANNEL = "g:01ARZ3NDEKTSV4RRFFQ69G5FAX"
SILENT = "g:01ARZ3NDEKTSV4RRFFQ69G5FAY"


def in_group(conv: str, sender: str, client_id: str) -> NewMessage:
    return NewMessage(conv=conv, members=(), sender=sender, device="d", client_id=client_id, kind="text",
                      body=f"{sender} in {conv}", media=(), ts=2)  # fmt: skip


async def test_the_conversations_a_sender_wrote_in(store: MessageStore) -> None:
    """1:1 conversations, groups, channels and groups left since: each once, whatever the count of
    messages; not those where only others wrote."""
    for conv, kind in ((GROUP, "group"), (LEFT, "group"), (CHANNEL, "channel"), (SILENT, "group")):
        await store.create_group(conv=conv, name=conv, kind=kind, creator="bob", members=("alice", "carol"), ts=1)
    for i in range(5):
        await store.append(new("dm:alice:bob", f"ab{i}", sender=("alice", "bob")[i % 2]))
        await store.append(in_group(GROUP, "alice", f"g{i}"))
    await store.append(new("dm:alice:carol", "only carol", sender="carol"))
    await store.append(new("dm:alice:alice", "a note to self"))
    await store.append(in_group(LEFT, "alice", "before leaving"))
    await store.append(in_group(LEFT, "carol", "after alice"))
    await store.append(in_group(CHANNEL, "alice", "a post"))
    await store.append(in_group(SILENT, "bob", "alice reads only"))
    await store.remove_member(conv=LEFT, user="alice")
    left = await store.membership(conv=LEFT, user="alice")
    assert left is not None  # the group is there, alice is not in it
    assert left.member is None

    wrote = {"dm:alice:bob", "dm:alice:alice", GROUP, LEFT, CHANNEL}
    found = await store.sender_conversations("alice")
    assert sorted(found) == sorted(wrote)  # each once
    assert sorted(await store.sender_conversations("alice")) == sorted(wrote)
    assert sorted(await store.sender_conversations("bob")) == sorted(["dm:alice:bob", SILENT])
    assert sorted(await store.sender_conversations("carol")) == sorted(["dm:alice:carol", LEFT])
    assert await store.sender_conversations("dave") == []
    for conv in found:  # still found once redacted: the sender of a marker stays
        await store.redact_messages(conv=conv, sender="alice")
    assert sorted(await store.sender_conversations("alice")) == sorted(wrote)


async def test_a_senders_many_conversations(storage_config: StorageConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    """More conversations than a page (Cassandra reads 3 a page; SQLite has no pages)."""
    if storage_config.backend == "cassandra":
        from storage.cassandra import store

        monkeypatch.setitem(store.PAGE_ROWS, "sender_convs_of", 3)
    convs = [f"dm:alice:u{i:02d}" for i in range(11)]
    async with open_storage(storage_config) as storage:
        for round_ in range(3):
            for conv in convs:
                await storage.messages.append(new(conv, f"{conv}/{round_}"))
        await storage.messages.append(new("dm:bob:u01", "not alice's", sender="bob"))
        assert sorted(await storage.messages.sender_conversations("alice")) == convs


async def test_forgetting_a_users_one_to_one_states(store: MessageStore) -> None:
    """The user's own state rows of 1:1 conversations go (watermarks, the change index); the other
    member's stay, as do the messages and the user's groups."""
    dm, other = "dm:alice:bob", "dm:alice:carol"
    await store.create_group(conv=GROUP, name="g", kind="group", creator="bob", members=("alice",), ts=1)
    for i in range(4):
        await store.append(new(dm, f"d{i}", sender=("alice", "bob")[i % 2]))
    await store.append(new(other, "c0", sender="carol"))
    await store.append(new("dm:alice:alice", "a note to self"))
    await store.append(in_group(GROUP, "bob", "g0"))
    await store.set_watermark(conv=dm, user="alice", delivered=None, read=4)
    await store.set_watermark(conv=dm, user="bob", delivered=4, read=3)
    cursor = (await store.changes_since(user="alice", version=0, limit=100)).version
    await store.append(new(dm, "d4", sender="bob"))  # changed after the cursor
    await store.append(new(other, "c1", sender="carol"))
    await store.append(in_group(GROUP, "bob", "g1"))
    bobs = await store.changes_since(user="bob", version=0, limit=100)
    bob_state = await store.conversation_state(conv=dm, user="bob")
    carols = await store.conversation_state(conv=other, user="carol")
    group_state = await store.conversation_state(conv=GROUP, user="alice")
    assert group_state is not None
    history = await store.fetch_after(dm, 0, 100)
    since_cursor = await store.changes_since(user="alice", version=cursor, limit=100)
    assert {s.conv for s in since_cursor.states} == {dm, other, GROUP}

    await store.forget_conversation_states("alice")
    await store.forget_conversation_states("alice")  # repeated: nothing more to forget
    await store.forget_conversation_states("dave")  # no state at all

    for version in (0, cursor):
        page = await store.changes_since(user="alice", version=version, limit=100)
        assert [s.conv for s in page.states] == [GROUP]
        assert page.states[0] == group_state
    for conv in (dm, other, "dm:alice:alice"):
        assert await store.conversation_state(conv=conv, user="alice") is None
    assert await store.total_unread("alice") == group_state.unread
    assert await store.changes_since(user="bob", version=0, limit=100) == bobs
    assert await store.conversation_state(conv=dm, user="bob") == bob_state
    assert await store.conversation_state(conv=other, user="carol") == carols
    assert await store.fetch_after(dm, 0, 100) == history
    group = await store.membership(conv=GROUP, user="alice")
    assert group is not None
    assert group.member is not None

    # A later message gives the user a state row again, from nothing: the old watermarks are gone.
    await store.append(new(dm, "d5", sender="bob"))
    state = await store.conversation_state(conv=dm, user="alice")
    assert state is not None
    assert (state.last_seq, state.delivered, state.read, state.unread) == (6, 0, 0, 6)


async def test_forgetting_many_one_to_one_states(
    storage_config: StorageConfig, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    """More states and changes than a page (Cassandra reads 3 rows a page; SQLite deletes 4 a write)."""
    if storage_config.backend == "cassandra":
        from storage.cassandra import store

        monkeypatch.setitem(store.PAGE_ROWS, "forget_dm_states", 3)
        monkeypatch.setitem(store.PAGE_ROWS, "forget_changes_scan", 3)
    else:
        from storage.sqlite import accounts

        monkeypatch.setattr(accounts, "_PER_WRITE", 4)
    convs = [f"dm:alice:u{i:02d}" for i in range(13)]
    async with open_storage(storage_config) as storage:
        s = storage.messages
        cursor = 0
        for round_ in range(3):
            for conv in convs:
                await s.append(new(conv, f"{conv}/{round_}", sender=("alice", conv[-3:])[round_ % 2]))
            if round_ == 0:
                cursor = (await s.changes_since(user="alice", version=0, limit=100)).version
        await s.forget_conversation_states("alice")
        if storage_config.backend == "cassandra":  # the rows themselves, before a sync meets them
            from tests.cassandra_store import KEYSPACE

            session = request.getfixturevalue("cassandra_session")
            assert not list(session.execute(f"SELECT conv FROM {KEYSPACE}.user_changes WHERE user = 'alice'"))
            assert not list(session.execute(f"SELECT conv FROM {KEYSPACE}.user_convs WHERE user = 'alice'"))
            for conv in convs:
                marks = f"SELECT value FROM {KEYSPACE}.watermarks WHERE user = 'alice' AND conv = %s"
                assert not list(session.execute(marks, (conv,)))
        assert (await s.changes_since(user="alice", version=0, limit=100)).states == ()
        assert (await s.changes_since(user="alice", version=cursor, limit=100)).states == ()
        assert len((await s.changes_since(user="u07", version=0, limit=100)).states) == 1


async def test_sqlite_erasure_reads_cost_what_the_sender_wrote(tmp_path: Path) -> None:
    """SQLite's plans: the sender's conversations are seeks of the (sender, conv) index, one per
    conversation; a redaction reads the index's (sender, conv) range, not the sender's whole
    history nor the conversation."""
    from storage.sqlite import accounts

    async with open_storage(StorageConfig(data_dir=tmp_path / "data", backend="sqlite")) as storage:
        await storage.messages.append(new("dm:alice:bob", "x"))
    conn = sqlite3.connect(tmp_path / "data" / "mqchat.sqlite3")
    try:
        convs_plan = " | ".join(r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + accounts._SENDER_CONVS, ("alice",)))
        seqs_plan = " | ".join(
            r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + accounts._SENDER_SEQS, ("alice", "dm:alice:bob", "x"))
        )
    finally:
        conn.close()
    assert "USING COVERING INDEX messages_by_sender_conv (sender=? AND conv>?)" in convs_plan
    assert "SCAN messages" not in convs_plan
    assert "USING INDEX messages_by_sender_conv (sender=? AND conv=?)" in seqs_plan
    assert "TEMP B-TREE" not in seqs_plan  # in seq order as the index holds it


async def test_deleting_a_users_settings(store: MessageStore) -> None:
    await store.set_user_settings("alice", UserSettings(who_may_add="nobody", presence="nobody"))
    await store.set_user_settings("bob", UserSettings(who_may_add="contacts"))
    await store.delete_user_settings("alice")
    await store.delete_user_settings("alice")
    await store.delete_user_settings("carol")  # never saved
    assert await store.user_settings(["alice", "bob", "carol"]) == {"bob": UserSettings(who_may_add="contacts")}


def token(user: str, device: str, value: str) -> DeviceToken:
    return DeviceToken(user, device, "fcm", value, None, False, 1)


async def test_forgetting_a_users_push_state(push: PushStore) -> None:
    await push.put_token(token("alice", "a1", "t1"))
    await push.put_token(token("alice", "a2", "t2"))
    await push.put_token(token("bob", "b1", "t3"))
    for user in ("alice", "bob"):
        await push.set_muted(user, "dm:alice:bob", True)
    await push.set_e2e("dm:alice:bob", True)
    await push.enqueue(
        [
            Pending(user="alice", device="a1", conv="dm:alice:bob", seq=1, sender="bob", preview="hi"),
            Pending(user="bob", device="b1", conv="dm:alice:bob", seq=2, sender="alice", preview="hey"),
        ],
        due_at=100,
    )

    await push.forget_user("alice")
    await push.forget_user("alice")
    await push.forget_user("carol")  # nothing of hers: nothing happens
    assert await push.tokens(["alice", "bob"]) == [token("bob", "b1", "t3")]
    assert await push.token_of("alice", "a1") is None
    assert await push.delete_token("t1") is False  # gone from both sides
    assert await push.settings("alice", "dm:alice:bob") == (False, True)  # the conversation's e2e stays
    assert await push.settings("bob", "dm:alice:bob") == (True, True)
    jobs = await push.claim_due(100, limit=10)
    assert "bob" in {job.user for job in jobs}
    for job in jobs:  # alice's, where a queue keeps them, can no longer reach a device
        assert job.user == "bob" or await push.token_of(job.user, job.device) is None


async def test_a_store_of_the_previous_schema_is_migrated(
    storage_config: StorageConfig, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store written before these tables existed opens, gains them, and keeps its messages; the
    conversations each sender wrote in are found for the messages from before (Cassandra's
    backfill reads the log 2 rows a page here)."""
    conv = "dm:alice:bob"
    async with open_storage(storage_config) as storage:
        old = (await storage.messages.append(new(conv, "old", body="from before"))).message
        for i in range(5):
            await storage.messages.append(new(f"dm:carol:u{i}", f"c{i}", sender="carol"))
            await storage.messages.append(new(f"dm:carol:u{i}", f"u{i}", sender=f"u{i}"))
    if storage_config.backend == "sqlite":
        version = _to_sqlite_schema_3(storage_config.sqlite_path)
    else:
        from storage.cassandra import schema

        monkeypatch.setattr(schema, "BACKFILL_PAGE_ROWS", 2)
        version = _to_cassandra_schema_1(request.getfixturevalue("cassandra_session"))
    async with open_storage(storage_config) as storage:
        s = storage.messages
        assert (await s.fetch_after(conv, 0, 10)).messages == (old,)
        assert await s.sender_conversations("alice") == [conv]
        assert sorted(await s.sender_conversations("carol")) == [f"dm:carol:u{i}" for i in range(5)]
        assert await s.sender_conversations("u3") == ["dm:carol:u3"]
        assert await s.sender_conversations("bob") == []
        await s.revoke("alice", device=None, before_ms=T)
        assert await s.revocations("alice") == {"": T}
        assert await s.begin_deletion("alice", at_ms=T) == T
        assert await s.pending_deletions() == [("alice", T)]
        assert await s.redact_messages(conv=conv, sender="alice") == 1
        assert (await s.fetch_after(conv, 0, 10)).messages == (redacted(old),)
    assert version() == (6 if storage_config.backend == "sqlite" else 4)


def _to_sqlite_schema_3(path: Path) -> Callable[[], int]:
    """Take the database back to schema 3 (the tables of schemas 4 and 6 and the index of schema
    5 dropped); returns what reads its version."""
    conn = sqlite3.connect(path)
    conn.executescript(
        """
        DROP TABLE revocations;
        DROP TABLE account_deletions;
        DROP INDEX messages_by_sender_conv;
        DROP TABLE media;
        DROP TABLE media_convs;
        UPDATE meta SET value = '3' WHERE key = 'schema_version';
        """
    )
    conn.close()

    def version() -> int:
        reader = sqlite3.connect(path)
        try:
            return int(reader.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0])
        finally:
            reader.close()

    return version


def _to_cassandra_schema_1(session: Any) -> Callable[[], int]:
    """Take the test keyspace back to schema 1 (the tables of schemas 2 to 4 dropped); returns
    what reads its version."""
    from tests.cassandra_store import KEYSPACE

    media = ("media", "media_convs", "media_by_owner", "media_pending")
    for table in ("revocations", "account_deletions", "pending_deletions", "sender_convs", *media):
        session.execute(f"DROP TABLE {KEYSPACE}.{table}", timeout=60)
    session.execute(f"UPDATE {KEYSPACE}.schema_version SET version = 1 WHERE id = 0")

    def version() -> int:
        return int(session.execute(f"SELECT version FROM {KEYSPACE}.schema_version WHERE id = 0").one()[0])

    return version
