"""Reads that more than one domain makes inside the writer's transaction (on its connection)."""

from __future__ import annotations

import sqlite3

from storage.base import NoSuchConversation


def next_version(conn: sqlite3.Connection) -> int:
    """Take the next value of the store-wide change counter."""
    (version,) = conn.execute(
        "UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'change_version' RETURNING value"
    ).fetchone()
    return int(version)


def conversation_kind(conn: sqlite3.Connection, conv: str) -> str:
    """dm, group or channel (NoSuchConversation for an unknown group)."""
    if conv.startswith("dm:"):
        return "dm"
    row = conn.execute("SELECT kind FROM groups WHERE conv = ?", (conv,)).fetchone()
    if row is None:
        raise NoSuchConversation(conv)
    return str(row[0])


def is_member(conn: sqlite3.Connection, conv: str, user: str) -> bool:
    """Whether user is a member of group conv."""
    return conn.execute("SELECT 1 FROM group_members WHERE conv = ? AND user = ?", (conv, user)).fetchone() is not None


def members_now(conn: sqlite3.Connection, conv: str, dm_members: tuple[str, ...]) -> tuple[str, ...]:
    """The conversation's members now: from the id for 1:1, from the table for groups."""
    if not conv.startswith("g:"):
        return dm_members
    rows = conn.execute("SELECT user FROM group_members WHERE conv = ? ORDER BY user", (conv,)).fetchall()
    if not rows:
        raise NoSuchConversation(conv)
    return tuple(r[0] for r in rows)


def last_seq(conn: sqlite3.Connection, conv: str) -> int:
    """The highest seq of conv (0 when empty)."""
    row = conn.execute("SELECT last_seq FROM conversations WHERE conv = ?", (conv,)).fetchone()
    return int(row[0]) if row else 0
