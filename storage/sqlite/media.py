"""Attachments on SQLite: ``media`` (a row per upload or file) and ``media_convs`` (where each
was sent). Two partial indexes give the collector its work in age order."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from storage.base import MediaIndex
from storage.records import READY, UPLOADING, MediaRecord
from storage.sqlite.database import SqliteDatabase

_COLUMNS = (
    "id, owner, size, content_type, sha256, opaque, created_ms, state, offset, staging, filename, "
    "width, height, thumbnail, completed_ms, sent"
)


def _record(row: Sequence[Any]) -> MediaRecord:
    (id, owner, size, content_type, sha256, opaque, created_ms, state, offset, staging, filename,
     width, height, thumbnail, completed_ms, sent) = row  # fmt: skip
    return MediaRecord(
        id=str(id),
        owner=str(owner),
        size=int(size),
        content_type=str(content_type),
        sha256=str(sha256),
        opaque=bool(opaque),
        created_ms=int(created_ms),
        state=str(state),
        offset=int(offset),
        staging=str(staging),
        filename=str(filename),
        width=int(width),
        height=int(height),
        thumbnail=bytes(thumbnail),
        completed_ms=int(completed_ms),
        sent=bool(sent),
    )


class SqliteMediaIndex(SqliteDatabase, MediaIndex):
    async def create_media(self, record: MediaRecord) -> None:
        r = record

        def job(conn: sqlite3.Connection) -> None:
            conn.execute(
                f"INSERT INTO media ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (r.id, r.owner, r.size, r.content_type, r.sha256, int(r.opaque), r.created_ms, r.state, r.offset,
                 r.staging, r.filename, r.width, r.height, r.thumbnail, r.completed_ms, int(r.sent)),
            )  # fmt: skip

        await self._write(job)

    async def media_records(self, ids: Sequence[str]) -> dict[str, MediaRecord]:
        wanted = list(dict.fromkeys(ids))

        def read(conn: sqlite3.Connection) -> dict[str, MediaRecord]:
            found: dict[str, MediaRecord] = {}
            for i in range(0, len(wanted), 500):
                part = wanted[i : i + 500]
                sql = f"SELECT {_COLUMNS} FROM media WHERE id IN ({', '.join('?' * len(part))})"
                found.update((str(row[0]), _record(row)) for row in conn.execute(sql, part))
            return found

        return await self._read_with(read) if wanted else {}

    async def advance_upload(self, id: str, *, expected: int, offset: int, staging: str) -> bool:
        def job(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute(
                "UPDATE media SET offset = ?, staging = ? WHERE id = ? AND state = ? AND offset = ?",
                (offset, staging, id, UPLOADING, expected),
            )
            return cursor.rowcount == 1

        return await self._write(job)

    async def complete_media(
        self, id: str, *, content_type: str, width: int, height: int, thumbnail: bytes, completed_ms: int
    ) -> bool:
        def job(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute(
                "UPDATE media SET state = ?, content_type = ?, width = ?, height = ?, thumbnail = ?, "
                "completed_ms = ?, staging = '' WHERE id = ? AND state = ? AND offset = size",
                (READY, content_type, width, height, thumbnail, completed_ms, id, UPLOADING),
            )
            return cursor.rowcount == 1

        return await self._write(job)

    async def delete_media(self, id: str) -> None:
        def job(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM media_convs WHERE media = ?", (id,))
            conn.execute("DELETE FROM media WHERE id = ?", (id,))

        await self._write(job)

    async def grant_media(self, ids: Sequence[str], conv: str) -> None:
        def job(conn: sqlite3.Connection) -> None:
            conn.executemany("INSERT OR IGNORE INTO media_convs (media, conv) VALUES (?, ?)", [(i, conv) for i in ids])
            conn.executemany("UPDATE media SET sent = 1 WHERE id = ? AND sent = 0", [(i,) for i in ids])

        await self._write(job)

    async def media_conversations(self, id: str) -> list[str]:
        rows = await self._read("SELECT conv FROM media_convs WHERE media = ? ORDER BY conv", (id,))
        return [str(conv) for (conv,) in rows]

    async def owner_media(self, owner: str) -> list[MediaRecord]:
        rows = await self._read(f"SELECT {_COLUMNS} FROM media WHERE owner = ? ORDER BY created_ms, id", (owner,))
        return [_record(row) for row in rows]

    async def stale_media(self, *, uploading_before_ms: int, unsent_before_ms: int, limit: int) -> list[MediaRecord]:
        uploads = await self._read(
            f"SELECT {_COLUMNS} FROM media WHERE state = ? AND created_ms < ? ORDER BY created_ms LIMIT ?",
            (UPLOADING, uploading_before_ms, limit),
        )
        unsent = await self._read(
            f"SELECT {_COLUMNS} FROM media WHERE state = ? AND sent = 0 AND completed_ms < ? "
            "ORDER BY completed_ms LIMIT ?",
            (READY, unsent_before_ms, limit),
        )
        found = [_record(row) for row in [*uploads, *unsent]]
        found.sort(key=lambda r: r.completed_ms or r.created_ms)
        return found[:limit]
