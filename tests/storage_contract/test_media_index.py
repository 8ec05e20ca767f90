"""MediaIndex: uploads and their durable offset, files, grants, owners, the collector's work."""

from __future__ import annotations

import dataclasses

from storage.base import MessageStore
from storage.records import READY, UPLOADING, MediaRecord
from tests.helpers import unique

T = 1_700_000_000_000  # ms since the epoch


def upload(owner: str, *, size: int = 100, created_ms: int = T, opaque: bool = False) -> MediaRecord:
    return MediaRecord(
        id=unique("m"),
        owner=owner,
        size=size,
        content_type="image/png",
        sha256="ab" * 32,
        opaque=opaque,
        created_ms=created_ms,
        filename="cat 🐈.png",
    )


async def test_an_upload_advances_only_from_its_durable_offset_then_completes(store: MessageStore) -> None:
    record = upload(unique("alice"))
    await store.create_media(record)
    assert await store.media_records([record.id]) == {record.id: record}
    assert await store.advance_upload(record.id, expected=0, offset=40, staging='{"parts":[1]}')
    assert not await store.advance_upload(record.id, expected=0, offset=60, staging="other")  # a stale writer
    assert not await store.complete_media(
        record.id, content_type="image/png", width=1, height=1, thumbnail=b"", completed_ms=T
    )  # not all there yet
    assert await store.advance_upload(record.id, expected=40, offset=100, staging='{"parts":[1,2]}')
    got = (await store.media_records([record.id]))[record.id]
    assert (got.state, got.offset, got.staging) == (UPLOADING, 100, '{"parts":[1,2]}')
    thumb = bytes(range(256)) * 4
    assert await store.complete_media(
        record.id, content_type="image/png", width=640, height=480, thumbnail=thumb, completed_ms=T + 5
    )
    assert not await store.complete_media(
        record.id, content_type="image/png", width=1, height=1, thumbnail=b"", completed_ms=T + 6
    )  # once
    done = (await store.media_records([record.id]))[record.id]
    assert done == dataclasses.replace(
        record, state=READY, offset=100, staging="", width=640, height=480, thumbnail=thumb, completed_ms=T + 5
    )
    assert not await store.advance_upload(record.id, expected=100, offset=100, staging="")  # no longer an upload


async def test_grants_say_where_a_file_was_sent_and_records_read_together(store: MessageStore) -> None:
    alice = unique("alice")
    a, b, c = upload(alice), upload(alice), upload(alice)
    for r in (a, b, c):
        await store.create_media(r)
    assert await store.media_conversations(a.id) == []
    await store.grant_media([a.id, b.id], "dm:alice:bob")
    await store.grant_media([a.id], "g:group1")
    await store.grant_media([a.id], "g:group1")  # idempotent
    assert await store.media_conversations(a.id) == ["dm:alice:bob", "g:group1"]
    assert await store.media_conversations(b.id) == ["dm:alice:bob"]
    found = await store.media_records([a.id, c.id, "nope", a.id])
    assert set(found) == {a.id, c.id}
    assert found[a.id].sent
    assert not found[c.id].sent
    many = [upload(alice) for _ in range(120)]
    for r in many:
        await store.create_media(r)
    assert set(await store.media_records([r.id for r in many])) == {r.id for r in many}


async def test_owner_media_and_delete(store: MessageStore) -> None:
    alice, bob = unique("alice"), unique("bob")
    mine = [upload(alice, created_ms=T + i) for i in range(3)]
    theirs = upload(bob)
    for r in [*mine, theirs]:
        await store.create_media(r)
    await store.grant_media([mine[0].id], "dm:x:y")
    assert [r.id for r in await store.owner_media(alice)] == [r.id for r in mine]
    await store.delete_media(mine[0].id)
    await store.delete_media(mine[0].id)  # idempotent
    assert [r.id for r in await store.owner_media(alice)] == [r.id for r in mine[1:]]
    assert await store.media_records([mine[0].id]) == {}
    assert await store.media_conversations(mine[0].id) == []
    assert [r.id for r in await store.owner_media(bob)] == [theirs.id]


async def test_stale_media_is_old_uploads_and_old_files_never_sent(store: MessageStore) -> None:
    alice = unique("alice")
    old_upload = upload(alice, created_ms=T - 10_000)
    new_upload = upload(alice, created_ms=T)
    old_unsent = upload(alice, created_ms=T - 20_000, size=1)
    old_sent = upload(alice, created_ms=T - 20_000, size=1)
    new_unsent = upload(alice, created_ms=T - 20_000, size=1)
    for r in (old_upload, new_upload, old_unsent, old_sent, new_unsent):
        await store.create_media(r)
    for r, done in ((old_unsent, T - 9_000), (old_sent, T - 9_000), (new_unsent, T)):
        assert await store.advance_upload(r.id, expected=0, offset=1, staging="")
        assert await store.complete_media(r.id, content_type="x/y", width=0, height=0, thumbnail=b"", completed_ms=done)
    await store.grant_media([old_sent.id], "dm:a:b")
    stale = await store.stale_media(uploading_before_ms=T - 1, unsent_before_ms=T - 1, limit=100)
    ours = [r.id for r in stale if r.owner == alice]
    assert sorted(ours) == sorted([old_upload.id, old_unsent.id])
    limited = await store.stale_media(uploading_before_ms=T - 1, unsent_before_ms=T - 1, limit=1)
    assert len(limited) == 1
