"""Attachments on Cassandra: what is known of each upload and file (its bytes are in the object
store), where each was sent, whose it is, and the collector's work.

::

    media           ((id))           owner, size, content_type, sha256, opaque, created_ms, state,
                                     received (the durable offset), staging, filename, width,
                                     height, thumbnail, completed_ms, sent
    media_convs     ((media), conv)  the conversations it was sent to (its grants)
    media_by_owner  ((owner), id)    the owner's uploads and files (their quota, their erasure)
    media_pending   ((shard), id)    state, created_ms, completed_ms of every upload in progress and
                                     every file not yet sent, over PENDING_SHARDS partitions

    create    ─▶ pending row ─▶ media row (LWT IF NOT EXISTS) ─▶ owner row
    advance   ─▶ LWT IF state = 'uploading' AND received = expected (two requests may carry on one upload)
    complete  ─▶ its size read ─▶ LWT IF state = 'uploading' AND received = size ─▶ pending row: ready
    grant     ─▶ each id: grant row + sent = true (one batch: both are partition id) ─▶ pending rows deleted
    delete    ─▶ grants ─▶ media row (LWT IF EXISTS) ─▶ owner row, pending row
    read      ─▶ media rows by id, MEDIA_READ ids per request (IN on the partition key)
    stale     ─▶ every pending shard ─▶ the rows past their threshold, oldest first ─▶ their media
                 rows read and checked; pending rows no longer true are mended as they are met

An upload's state (state, received, staging, and what completion writes) is written by lightweight
transactions only, its creation included: Paxos orders its rounds on the row, while a plain write
carries the timestamp of a clock that may lag the round's. ``sent`` is the one cell written
without one: only a grant writes it (never the creation), and always true, so it needs no order
with them. A grant of an id that no longer exists leaves a row holding ``sent`` alone, which the
reads skip.

The collector's work is a table of its own rather than a scan of ``media``: it holds only the
unfinished and the unsent, which leave it when they are sent or deleted. Uploads in progress are
bounded by the per-user limit on them, and most files are sent within seconds of completing
(those never sent are collected after their expiry), so its live rows are few. Each row leaves a
tombstone for gc_grace_seconds (3 hours, like the push queue's tables), which a read of its
partition steps over: PENDING_SHARDS partitions keep a shard's read below Cassandra's tombstone
limits (a warning at 1,000, a failure at 100,000) up to some 150 sends with attachments a second,
and spread the writes of every upload over the cluster. The collector reads them all at once.

Each step writes in an order that leaves, after a failure halfway, only rows the reads can tell
apart: a pending row with no record (a creation or a deletion cut short; the collector, which
looks only at rows past their threshold, removes it when it meets it), one that says uploading
for a file (a completion cut short; mended likewise), or an owner row with no record (a deletion
cut short after the record; ``owner_media`` skips it). A record never lacks its pending row
while it is unsent, so the collector always finds what it must delete.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Sequence
from typing import Any

from mqchat.errors import StorageError
from storage.base import MediaIndex
from storage.cassandra.core import CassandraPart, bounded
from storage.records import READY, UPLOADING, MediaRecord

__all__ = ["MEDIA_READ", "PENDING_SHARDS", "STATEMENTS", "CassandraMediaIndex"]

_COLUMNS = (
    "id, owner, size, content_type, sha256, opaque, created_ms, state, received, staging, filename, "
    "width, height, thumbnail, completed_ms, sent"
)

STATEMENTS = {
    # Without sent: only a grant writes it (see above).
    "media_create": (
        "INSERT INTO {ks}.media (id, owner, size, content_type, sha256, opaque, created_ms, state, received, "
        "staging, filename, width, height, thumbnail, completed_ms) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) IF NOT EXISTS"
    ),
    "media_in": f"SELECT {_COLUMNS} FROM {{ks}}.media WHERE id IN ?",
    "media_size": "SELECT size FROM {ks}.media WHERE id = ?",
    "media_owner": "SELECT owner FROM {ks}.media WHERE id = ?",
    "media_advance": "UPDATE {ks}.media SET received = ?, staging = ? WHERE id = ? IF state = ? AND received = ?",
    "media_complete": (
        "UPDATE {ks}.media SET state = ?, content_type = ?, width = ?, height = ?, thumbnail = ?, completed_ms = ?, "
        "staging = '' WHERE id = ? IF state = ? AND received = ?"
    ),
    "media_sent": "UPDATE {ks}.media SET sent = true WHERE id = ?",
    "media_delete": "DELETE FROM {ks}.media WHERE id = ? IF EXISTS",
    "grant_put": "INSERT INTO {ks}.media_convs (media, conv) VALUES (?, ?)",
    "grants_of": "SELECT conv FROM {ks}.media_convs WHERE media = ?",
    "grants_delete": "DELETE FROM {ks}.media_convs WHERE media = ?",
    "owned_put": "INSERT INTO {ks}.media_by_owner (owner, id) VALUES (?, ?)",
    "owned_of": "SELECT id FROM {ks}.media_by_owner WHERE owner = ?",
    "owned_delete": "DELETE FROM {ks}.media_by_owner WHERE owner = ? AND id = ?",
    "pending_put": (
        "INSERT INTO {ks}.media_pending (shard, id, state, created_ms, completed_ms) VALUES (?, ?, ?, ?, ?)"
    ),
    "pending_ready": "UPDATE {ks}.media_pending SET state = ?, completed_ms = ? WHERE shard = ? AND id = ?",
    "pending_delete": "DELETE FROM {ks}.media_pending WHERE shard = ? AND id = ?",
    "pending_of": "SELECT id, state, created_ms, completed_ms FROM {ks}.media_pending WHERE shard = ?",
}

PENDING_SHARDS = 16
"""Partitions of media_pending (part of the schema: rows are found by the shard of their id)."""

MEDIA_READ = 50
"""Ids per read of media rows (one IN query on the partition key)."""


def _shard(id: str) -> int:
    return zlib.crc32(id.encode("utf-8", "surrogatepass")) % PENDING_SHARDS


def _record(row: Sequence[Any]) -> MediaRecord | None:
    """The record of a media row; None for a row that holds only ``sent`` (a grant after a delete)."""
    (id, owner, size, content_type, sha256, opaque, created_ms, state, received, staging, filename,
     width, height, thumbnail, completed_ms, sent) = row  # fmt: skip
    if state is None or owner is None:
        return None
    return MediaRecord(
        id=str(id),
        owner=str(owner),
        size=int(size or 0),
        content_type=str(content_type or ""),
        sha256=str(sha256 or ""),
        opaque=bool(opaque),
        created_ms=int(created_ms or 0),
        state=str(state),
        offset=int(received or 0),
        staging=str(staging or ""),
        filename=str(filename or ""),
        width=int(width or 0),
        height=int(height or 0),
        thumbnail=bytes(thumbnail or b""),
        completed_ms=int(completed_ms or 0),
        sent=bool(sent),
    )


def _age(record: MediaRecord) -> int:
    """What the collector orders by: a file's completion, an upload's creation."""
    return record.completed_ms or record.created_ms


def _is_stale(record: MediaRecord, *, uploading_before_ms: int, unsent_before_ms: int) -> bool:
    if record.state == UPLOADING:
        return record.created_ms < uploading_before_ms
    return record.state == READY and not record.sent and record.completed_ms < unsent_before_ms


class CassandraMediaIndex(CassandraPart, MediaIndex):
    async def create_media(self, record: MediaRecord) -> None:
        r = record
        await self._cql.run("pending_put", (_shard(r.id), r.id, r.state, r.created_ms, r.completed_ms))
        answer = await self._cql.conditional(
            "media_create",
            (r.id, r.owner, r.size, r.content_type, r.sha256, r.opaque, r.created_ms, r.state, r.offset,
             r.staging, r.filename, r.width, r.height, r.thumbnail, r.completed_ms),
        )  # fmt: skip
        # Not applied: a retry of this very creation (its first attempt landed) goes on.
        if not answer.get("[applied]") and (answer.get("owner"), answer.get("created_ms")) != (r.owner, r.created_ms):
            raise StorageError(f"media {r.id} exists already")
        if r.sent:
            await self._cql.run("media_sent", (r.id,))
        await self._cql.run("owned_put", (r.owner, r.id))

    async def media_records(self, ids: Sequence[str]) -> dict[str, MediaRecord]:
        wanted = list(dict.fromkeys(ids))
        parts = [wanted[i : i + MEDIA_READ] for i in range(0, len(wanted), MEDIA_READ)]
        found: dict[str, MediaRecord] = {}
        for rows in await asyncio.gather(*(self._cql.rows("media_in", (part,)) for part in parts)):
            for row in rows:
                record = _record(row)
                if record is not None:
                    found[record.id] = record
        return found

    async def advance_upload(self, id: str, *, expected: int, offset: int, staging: str) -> bool:
        answer = await self._cql.conditional("media_advance", (offset, staging, id, UPLOADING, expected))
        return bool(answer.get("[applied]"))

    async def complete_media(
        self, id: str, *, content_type: str, width: int, height: int, thumbnail: bytes, completed_ms: int
    ) -> bool:
        # The size never changes once written: the transaction's condition compares the offset to it.
        row = await self._cql.one("media_size", (id,))
        if row is None or row[0] is None:
            return False
        answer = await self._cql.conditional(
            "media_complete", (READY, content_type, width, height, thumbnail, completed_ms, id, UPLOADING, int(row[0]))
        )
        if not answer.get("[applied]"):
            return False
        await self._cql.run("pending_ready", (READY, completed_ms, _shard(id), id))
        return True

    async def delete_media(self, id: str) -> None:
        # The record before the rows that find it: a deletion cut short leaves only rows the reads
        # skip or mend, never a record nothing finds.
        row = await self._cql.one("media_owner", (id,))
        await self._cql.run("grants_delete", (id,))
        await self._cql.conditional("media_delete", (id,))
        cleanup = [self._cql.run("pending_delete", (_shard(id), id))]
        if row is not None and row[0] is not None:
            cleanup.append(self._cql.run("owned_delete", (str(row[0]), id)))
        await bounded(cleanup)

    async def grant_media(self, ids: Sequence[str], conv: str) -> None:
        wanted = list(dict.fromkeys(ids))
        # sent before the pending row goes: a grant cut short leaves a pending row the collector
        # finds sent (and removes), never an unsent file without one.
        await bounded([self._cql.batch([("grant_put", (id, conv)), ("media_sent", (id,))]) for id in wanted])
        by_shard: dict[int, list[tuple[str, tuple[Any, ...]]]] = {}
        for id in wanted:
            by_shard.setdefault(_shard(id), []).append(("pending_delete", (_shard(id), id)))
        await bounded([self._cql.batch(deletes) for deletes in by_shard.values()])

    async def media_conversations(self, id: str) -> list[str]:
        return [str(conv) for (conv,) in await self._cql.all_pages("grants_of", (id,))]

    async def owner_media(self, owner: str) -> list[MediaRecord]:
        ids = [str(id) for (id,) in await self._cql.all_pages("owned_of", (owner,))]
        records = await self.media_records(ids)
        return sorted(records.values(), key=lambda r: (r.created_ms, r.id))

    async def stale_media(self, *, uploading_before_ms: int, unsent_before_ms: int, limit: int) -> list[MediaRecord]:
        if limit <= 0:
            return []
        shards = await asyncio.gather(*(self._cql.all_pages("pending_of", (s,)) for s in range(PENDING_SHARDS)))
        due: list[tuple[int, str, str]] = []  # (age, id, state) of the rows past their threshold
        for rows in shards:
            for id, state, created_ms, completed_ms in rows:
                if state == UPLOADING and int(created_ms or 0) < uploading_before_ms:
                    due.append((int(created_ms or 0), str(id), UPLOADING))
                elif state == READY and int(completed_ms or 0) < unsent_before_ms:
                    due.append((int(completed_ms or 0), str(id), READY))
        due.sort()
        found: list[MediaRecord] = []
        for i in range(0, len(due), MEDIA_READ):
            part = due[i : i + MEDIA_READ]
            records = await self.media_records([id for _, id, _ in part])
            await self._mend_pending(part, records)
            found.extend(
                r
                for _, id, _ in part
                if (r := records.get(id)) is not None
                and _is_stale(r, uploading_before_ms=uploading_before_ms, unsent_before_ms=unsent_before_ms)
            )
            if len(found) >= limit:
                break
        found.sort(key=lambda r: (_age(r), r.id))
        return found[:limit]

    async def _mend_pending(self, rows: Sequence[tuple[int, str, str]], records: dict[str, MediaRecord]) -> None:
        """Remove the pending rows of media that are gone or sent, and mark those of completed
        files ready (rows past their threshold only: no creation is still writing them)."""
        writes: list[tuple[str, tuple[Any, ...]]] = []
        for _, id, state in rows:
            record = records.get(id)
            if record is None or record.sent:
                writes.append(("pending_delete", (_shard(id), id)))
            elif record.state != state:
                writes.append(("pending_ready", (record.state, record.completed_ms, _shard(id), id)))
        await bounded([self._cql.run(name, params) for name, params in writes])
