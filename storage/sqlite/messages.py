"""The message log on SQLite: append (dedup, seq, state rows of the members) and paged reads."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from mqchat.ids import new_mid
from storage.base import MessageLog, NotMember
from storage.records import AppendResult, NewMessage, Page, StoredMessage
from storage.sqlite.database import SqliteDatabase
from storage.sqlite.queries import conversation_kind, is_member, members_now, next_version

_COLUMNS = "conv, seq, mid, sender, device, client_id, ts, kind, body, media"


def _row_to_message(row: tuple[Any, ...]) -> StoredMessage:
    conv, seq, mid, sender, device, client_id, ts, kind, body, media = row
    return StoredMessage(
        conv=conv,
        seq=seq,
        mid=mid,
        sender=sender,
        device=device,
        client_id=client_id,
        ts=ts,
        kind=kind,
        body=body,
        media=tuple(json.loads(media)) if media else (),
    )


def _append_one(conn: sqlite3.Connection, m: NewMessage) -> AppendResult:
    row = conn.execute(
        f"SELECT {_COLUMNS} FROM messages WHERE sender = ? AND client_id = ?", (m.sender, m.client_id)
    ).fetchone()
    kind = conversation_kind(conn, m.conv)
    channel = kind == "channel"
    # A channel's members are not listed per message (fan-out on read): only the sender is checked.
    members = () if channel else members_now(conn, m.conv, m.members)
    if row is not None:
        return AppendResult(_row_to_message(row), duplicate=True, members=members, kind=kind)
    if not (is_member(conn, m.conv, m.sender) if channel else m.sender in members):
        raise NotMember(f"{m.sender} is not a member of {m.conv}")
    (seq,) = conn.execute(
        "INSERT INTO conversations (conv, last_seq, updated_at, version) VALUES (?, 1, ?, ?) "
        "ON CONFLICT (conv) DO UPDATE SET last_seq = last_seq + 1, updated_at = excluded.updated_at, "
        "version = excluded.version RETURNING last_seq",
        (m.conv, m.ts, next_version(conn) if channel else 0),
    ).fetchone()
    stored = StoredMessage.of(m, seq=seq, mid=new_mid())
    conn.execute(
        f"INSERT INTO messages ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            stored.conv,
            stored.seq,
            stored.mid,
            stored.sender,
            stored.device,
            stored.client_id,
            stored.ts,
            stored.kind,
            stored.body,
            json.dumps(list(stored.media)) if stored.media else None,
        ),
    )
    for member in (m.sender,) if channel else dict.fromkeys(members):
        # The sender has read (and so received) what they sent.
        own = seq if member == m.sender else 0
        conn.execute(
            "INSERT INTO user_convs (user, conv, kind, delivered, read, version, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (user, conv) DO UPDATE SET "
            "delivered = MAX(delivered, excluded.delivered), read = MAX(read, excluded.read), "
            "version = excluded.version, updated_at = excluded.updated_at",
            (member, m.conv, kind, own, own, next_version(conn), m.ts),
        )
    return AppendResult(stored, duplicate=False, members=members, kind=kind)


class SqliteMessageLog(SqliteDatabase, MessageLog):
    async def append(self, message: NewMessage) -> AppendResult:
        return await self._write(lambda conn: _append_one(conn, message))

    async def fetch_after(self, conv: str, after: int, limit: int) -> Page:
        rows = await self._read(
            f"SELECT {_COLUMNS} FROM messages WHERE conv = ? AND seq > ? ORDER BY seq ASC LIMIT ?",
            (conv, after, limit + 1),
        )
        return Page(tuple(_row_to_message(r) for r in rows[:limit]), more=len(rows) > limit)

    async def fetch_before(self, conv: str, before: int, limit: int) -> Page:
        rows = await self._read(
            f"SELECT {_COLUMNS} FROM messages WHERE conv = ? AND seq < ? ORDER BY seq DESC LIMIT ?",
            (conv, before, limit + 1),
        )
        page = [_row_to_message(r) for r in rows[:limit]]
        page.reverse()
        return Page(tuple(page), more=len(rows) > limit)

    async def last_seq(self, conv: str) -> int:
        rows = await self._read("SELECT last_seq FROM conversations WHERE conv = ?", (conv,))
        return int(rows[0][0]) if rows else 0
