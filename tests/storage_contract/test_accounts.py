"""Accounts: revocations (the latest kept, per device or for every device), account deletions
(begun once, resumed until finished, remembered after), redaction of a sender's messages in place,
forgetting a user's settings; PushStore.forget_user; an older store migrated to these tables."""

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
    storage_config: StorageConfig, request: pytest.FixtureRequest
) -> None:
    """A store written before these tables existed opens, gains them, and keeps its messages."""
    conv = "dm:alice:bob"
    async with open_storage(storage_config) as storage:
        old = (await storage.messages.append(new(conv, "old", body="from before"))).message
    if storage_config.backend == "sqlite":
        version = _to_sqlite_schema_3(storage_config.sqlite_path)
    else:
        version = _to_cassandra_schema_1(request.getfixturevalue("cassandra_session"))
    async with open_storage(storage_config) as storage:
        s = storage.messages
        assert (await s.fetch_after(conv, 0, 10)).messages == (old,)
        await s.revoke("alice", device=None, before_ms=T)
        assert await s.revocations("alice") == {"": T}
        assert await s.begin_deletion("alice", at_ms=T) == T
        assert await s.pending_deletions() == [("alice", T)]
        assert await s.redact_messages(conv=conv, sender="alice") == 1
        assert (await s.fetch_after(conv, 0, 10)).messages == (redacted(old),)
    assert version() == (4 if storage_config.backend == "sqlite" else 2)


def _to_sqlite_schema_3(path: Path) -> Callable[[], int]:
    """Take the database back to schema 3 (the tables of schema 4 dropped); returns what reads
    its version."""
    conn = sqlite3.connect(path)
    conn.executescript(
        """
        DROP TABLE revocations;
        DROP TABLE account_deletions;
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
    """Take the test keyspace back to schema 1 (the tables of schema 2 dropped); returns what
    reads its version."""
    from tests.cassandra_store import KEYSPACE

    for table in ("revocations", "account_deletions", "pending_deletions"):
        session.execute(f"DROP TABLE {KEYSPACE}.{table}", timeout=60)
    session.execute(f"UPDATE {KEYSPACE}.schema_version SET version = 1 WHERE id = 0")

    def version() -> int:
        return int(session.execute(f"SELECT version FROM {KEYSPACE}.schema_version WHERE id = 0").one()[0])

    return version
