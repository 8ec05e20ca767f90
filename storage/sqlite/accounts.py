"""Logout and account deletion on SQLite: ``revocations`` (a row per user and device, the latest
before_ms kept), ``account_deletions`` (a row per user, kept once finished; the pending ones
found through a partial index), and the redaction of a sender's messages in place.

::

    redact_messages(conv, sender)
      reader: the sender's seqs in conv, from the dedup index (it holds each message's key)
      writer: UPDATE … WHERE conv, seq, sender, not yet redacted   _REDACT_PER_WRITE per job
"""

from __future__ import annotations

import functools
import sqlite3

from storage.base import Accounts
from storage.records import REDACTED_KIND
from storage.sqlite.database import SqliteDatabase

__all__ = ["SqliteAccounts"]

_REDACT_PER_WRITE = 500
"""Messages redacted per write job: the writer's transactions stay short beside the appends."""

# A WITHOUT ROWID table's index holds the row's primary key: the dedup index (sender, client_id)
# gives each message's (conv, seq) without reading the conversation, so erasing what a sender
# wrote costs what they wrote, not what the conversation holds, and adds no index to appends.
_SENDER_SEQS = (
    "SELECT seq FROM messages INDEXED BY messages_by_sender_client_id "
    "WHERE sender = ? AND conv = ? AND kind <> ? ORDER BY seq"
)
_REDACT = (
    "UPDATE messages SET kind = ?, body = '', media = NULL WHERE conv = ? AND seq = ? AND sender = ? AND kind <> ?"
)


def _begin_deletion(conn: sqlite3.Connection, user: str, at_ms: int) -> int:
    row = conn.execute("SELECT at_ms, finished FROM account_deletions WHERE user = ?", (user,)).fetchone()
    if row is not None and not row[1]:
        return int(row[0])
    conn.execute(
        "INSERT INTO account_deletions (user, at_ms, finished) VALUES (?, ?, 0) "
        "ON CONFLICT (user) DO UPDATE SET at_ms = excluded.at_ms, finished = 0",
        (user, at_ms),
    )
    return at_ms


def _redact(conn: sqlite3.Connection, conv: str, sender: str, seqs: list[int]) -> int:
    cursor = conn.executemany(_REDACT, [(REDACTED_KIND, conv, seq, sender, REDACTED_KIND) for seq in seqs])
    return cursor.rowcount


class SqliteAccounts(SqliteDatabase, Accounts):
    async def revoke(self, user: str, *, device: str | None, before_ms: int) -> None:
        def job(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO revocations (user, device, before_ms) VALUES (?, ?, ?) "
                "ON CONFLICT (user, device) DO UPDATE SET before_ms = MAX(before_ms, excluded.before_ms)",
                (user, device or "", before_ms),
            )

        await self._write(job)

    async def revocations(self, user: str) -> dict[str, int]:
        rows = await self._read("SELECT device, before_ms FROM revocations WHERE user = ?", (user,))
        return {str(device): int(before) for device, before in rows}

    async def begin_deletion(self, user: str, *, at_ms: int) -> int:
        return await self._write(lambda conn: _begin_deletion(conn, user, at_ms))

    async def pending_deletions(self) -> list[tuple[str, int]]:
        rows = await self._read("SELECT user, at_ms FROM account_deletions WHERE finished = 0 ORDER BY at_ms, user", ())
        return [(str(user), int(at_ms)) for user, at_ms in rows]

    async def finish_deletion(self, user: str) -> None:
        def job(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE account_deletions SET finished = 1 WHERE user = ?", (user,))

        await self._write(job)

    async def deletion_state(self, user: str) -> tuple[int, bool] | None:
        rows = await self._read("SELECT at_ms, finished FROM account_deletions WHERE user = ?", (user,))
        return (int(rows[0][0]), bool(rows[0][1])) if rows else None

    async def redact_messages(self, *, conv: str, sender: str) -> int:
        rows = await self._read(_SENDER_SEQS, (sender, conv, REDACTED_KIND))
        seqs = [int(seq) for (seq,) in rows]
        redacted = 0
        for start in range(0, len(seqs), _REDACT_PER_WRITE):
            part = seqs[start : start + _REDACT_PER_WRITE]
            redacted += await self._write(functools.partial(_redact, conv=conv, sender=sender, seqs=part))
        return redacted

    async def delete_user_settings(self, user: str) -> None:
        def job(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM user_settings WHERE user = ?", (user,))

        await self._write(job)
