"""Conversation states on SQLite: one row per (user, conv) in ``user_convs``, ordered by the
store-wide change version; a channel's rows take the later of their own version and the
channel's (its messages do not touch its members' rows)."""

from __future__ import annotations

import sqlite3
import time

from mqchat.ids import parse_conv
from storage.base import ConversationStates, NotMember, SeqBeyondEnd
from storage.records import ChangesPage, ConvState, WatermarkResult
from storage.sqlite.database import SqliteDatabase
from storage.sqlite.queries import conversation_kind, is_member, last_seq, next_version

_STATE_COLUMNS = (
    "u.conv, u.kind, COALESCE(c.last_seq, 0), u.delivered, u.read, MAX(u.updated_at, COALESCE(c.updated_at, 0)), "
    "MAX(u.version, COALESCE(c.version, 0)) AS v"
)
_STATE_FROM = "user_convs u LEFT JOIN conversations c ON c.conv = u.conv"
_STATE = f"SELECT {_STATE_COLUMNS} FROM {_STATE_FROM} WHERE u.user = ? AND u.conv = ?"
_CHANGES = (
    f"SELECT {_STATE_COLUMNS} FROM {_STATE_FROM} WHERE u.user = ? AND u.version > ? "
    f"UNION SELECT {_STATE_COLUMNS} FROM {_STATE_FROM} WHERE u.user = ? AND u.kind = 'channel' AND c.version > ? "
    "ORDER BY v LIMIT ?"
)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _set_watermark(
    conn: sqlite3.Connection, conv: str, user: str, delivered: int | None, read: int | None
) -> WatermarkResult:
    kind = conversation_kind(conn, conv)
    parsed = parse_conv(conv)
    if not (parsed is not None and user in parsed.members if kind == "dm" else is_member(conn, conv, user)):
        raise NotMember(f"{user} is not a member of {conv}")
    row = conn.execute(_STATE, (user, conv)).fetchone()
    state = ConvState(*row) if row else None
    end = state.last_seq if state is not None else last_seq(conn, conv)
    wanted = max(delivered or 0, read or 0)
    if wanted > end:
        raise SeqBeyondEnd(f"seq {wanted} is beyond the conversation's last seq {end}")
    if state is None:
        if wanted == 0:
            return WatermarkResult(ConvState(conv, kind, end, 0, 0, 0, 0), changed=False)
        raise SeqBeyondEnd("no state for this conversation")  # pragma: no cover - last_seq > 0 implies a row
    new_read = max(state.read, read or 0)
    new_delivered = max(state.delivered, delivered or 0, new_read)
    if (new_delivered, new_read) == (state.delivered, state.read):
        return WatermarkResult(state, changed=False)
    version = next_version(conn)
    now = _now_ms()
    conn.execute(
        "UPDATE user_convs SET delivered = ?, read = ?, version = ?, updated_at = ? WHERE user = ? AND conv = ?",
        (new_delivered, new_read, version, now, user, conv),
    )
    changed = ConvState(conv, state.kind, state.last_seq, new_delivered, new_read, now, max(version, state.version))
    return WatermarkResult(changed, changed=True)


class SqliteConversationStates(SqliteDatabase, ConversationStates):
    async def set_watermark(self, *, conv: str, user: str, delivered: int | None, read: int | None) -> WatermarkResult:
        return await self._write(lambda conn: _set_watermark(conn, conv, user, delivered, read))

    async def conversation_state(self, *, conv: str, user: str) -> ConvState | None:
        rows = await self._read(_STATE, (user, conv))
        return ConvState(*rows[0]) if rows else None

    async def changes_since(self, *, user: str, version: int, limit: int) -> ChangesPage:
        rows = await self._read(_CHANGES, (user, version, user, version, limit + 1))
        states = tuple(ConvState(*r) for r in rows[:limit])
        return ChangesPage(states, version=states[-1].version if states else version, more=len(rows) > limit)

    async def current_version(self) -> int:
        rows = await self._read("SELECT value FROM meta WHERE key = 'change_version'", ())
        return int(rows[0][0]) if rows else 0

    async def total_unread(self, user: str) -> int:
        rows = await self._read(
            "SELECT COALESCE(SUM(MAX(0, COALESCE(c.last_seq, 0) - u.read)), 0) FROM user_convs u "
            "LEFT JOIN conversations c ON c.conv = u.conv WHERE u.user = ?",
            (user,),
        )
        return int(rows[0][0])
