"""Logout and account deletion on SQLite: ``revocations`` (a row per user and device, the latest
before_ms kept), ``account_deletions`` (a row per user, kept once finished; the pending ones
found through a partial index), and what an erasure reads and changes: the conversations a sender
wrote in, their messages redacted in place, the user's own 1:1 states forgotten.

::

    messages_by_sender_conv (sender, conv, seq)   an index of the log, one entry per message
      sender_conversations(sender)   one seek per conversation: the next conv after the last found
      redact_messages(conv, sender)
        reader: the sender's seqs in conv (the index's (sender, conv) range: what they wrote there)
        writer: UPDATE … WHERE conv, seq, sender, not yet redacted   _PER_WRITE per job
    forget_conversation_states(user)
      writer: DELETE the user's user_convs rows of 1:1 conversations   _PER_WRITE per job
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Sequence

from storage.base import Accounts
from storage.records import REDACTED_KIND
from storage.sqlite.database import SqliteDatabase

__all__ = ["SqliteAccounts"]

_PER_WRITE = 500
"""Rows redacted or deleted per write job: the writer's transactions stay short beside the appends."""

# A loose scan of the index: each step seeks the first conversation after the one found before,
# so the cost is the number of conversations (a seek each), not the number of messages.
_SENDER_CONVS = """
WITH RECURSIVE found(conv) AS (
    SELECT (SELECT MIN(conv) FROM messages INDEXED BY messages_by_sender_conv WHERE sender = ?1)
    UNION ALL
    SELECT (SELECT MIN(conv) FROM messages INDEXED BY messages_by_sender_conv WHERE sender = ?1 AND conv > found.conv)
    FROM found WHERE found.conv IS NOT NULL
)
SELECT conv FROM found WHERE conv IS NOT NULL
"""
# The index's (sender, conv) range holds the seqs of what sender wrote in conv, in order: a call
# costs what the sender wrote there, not what the conversation or the sender's whole history holds.
_SENDER_SEQS = (
    "SELECT seq FROM messages INDEXED BY messages_by_sender_conv "
    "WHERE sender = ? AND conv = ? AND kind <> ? ORDER BY seq"
)
_REDACT = (
    "UPDATE messages SET kind = ?, body = '', media = NULL WHERE conv = ? AND seq = ? AND sender = ? AND kind <> ?"
)

# 1:1 conversation ids start with "dm:" (and ';' follows ':'): a range of the primary key.
_FORGET_DM_STATES = (
    "DELETE FROM user_convs WHERE user = ?1 AND conv IN ("
    "SELECT conv FROM user_convs WHERE user = ?1 AND conv >= 'dm:' AND conv < 'dm;' AND kind = 'dm' LIMIT ?2)"
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

    async def revocations_of(self, users: Sequence[str]) -> dict[str, dict[str, int]]:
        def read(conn: sqlite3.Connection) -> dict[str, dict[str, int]]:
            found: dict[str, dict[str, int]] = {}
            wanted = list(dict.fromkeys(users))
            for i in range(0, len(wanted), 500):
                part = wanted[i : i + 500]
                sql = f"SELECT user, device, before_ms FROM revocations WHERE user IN ({', '.join('?' * len(part))})"
                for user, device, before in conn.execute(sql, part):
                    found.setdefault(str(user), {})[str(device)] = int(before)
            return found

        return await self._read_with(read)

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
        for start in range(0, len(seqs), _PER_WRITE):
            part = seqs[start : start + _PER_WRITE]
            redacted += await self._write(functools.partial(_redact, conv=conv, sender=sender, seqs=part))
        return redacted

    async def sender_conversations(self, sender: str) -> list[str]:
        rows = await self._read(_SENDER_CONVS, (sender,))
        return [str(conv) for (conv,) in rows]

    async def forget_conversation_states(self, user: str) -> None:
        def job(conn: sqlite3.Connection) -> int:
            return conn.execute(_FORGET_DM_STATES, (user, _PER_WRITE)).rowcount

        while await self._write(job) == _PER_WRITE:
            pass

    async def delete_user_settings(self, user: str) -> None:
        def job(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM user_settings WHERE user = ?", (user,))

        await self._write(job)
