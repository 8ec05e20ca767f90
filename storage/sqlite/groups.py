"""Groups and channels on SQLite: ``groups`` and ``group_members`` (role, join point), and the
members' state rows that joining and leaving create and remove."""

from __future__ import annotations

import sqlite3

from storage.base import Groups, NoSuchConversation, NotMember
from storage.records import Group, GroupMember, Membership
from storage.sqlite.database import SqliteDatabase
from storage.sqlite.queries import conversation_kind, last_seq, next_version


def _load_group(conn: sqlite3.Connection, conv: str) -> Group:
    row = conn.execute("SELECT conv, name, kind, creator, created_at FROM groups WHERE conv = ?", (conv,)).fetchone()
    if row is None:
        raise NoSuchConversation(conv)
    members = tuple(
        GroupMember(*r)
        for r in conn.execute(
            "SELECT user, role, joined_seq FROM group_members WHERE conv = ? ORDER BY user", (conv,)
        ).fetchall()
    )
    conv_id, name, kind, creator, created_at = row
    return Group(conv=conv_id, name=name, kind=kind, creator=creator, created_at=created_at, members=members)


def _touch(conn: sqlite3.Connection, conv: str, users: tuple[str, ...], ts: int) -> None:
    """Give users a state row in conv (new members) or move it up the change index."""
    kind = conversation_kind(conn, conv)
    for user in users:
        conn.execute(
            "INSERT INTO user_convs (user, conv, kind, version, updated_at) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (user, conv) DO UPDATE SET version = excluded.version, updated_at = excluded.updated_at",
            (user, conv, kind, next_version(conn), ts),
        )


def _create_group(
    conn: sqlite3.Connection, conv: str, name: str, kind: str, creator: str, members: tuple[str, ...], ts: int
) -> Group:
    conn.execute(
        "INSERT INTO groups (conv, name, kind, creator, created_at) VALUES (?, ?, ?, ?, ?)",
        (conv, name, kind, creator, ts),
    )
    everyone = tuple(dict.fromkeys((creator, *members)))
    for user in everyone:
        role = "admin" if user == creator else "member"
        conn.execute("INSERT INTO group_members (conv, user, role, joined_seq) VALUES (?, ?, ?, 1)", (conv, user, role))
    _touch(conn, conv, everyone, ts)
    return _load_group(conn, conv)


def _add_members(conn: sqlite3.Connection, conv: str, users: tuple[str, ...], ts: int) -> Group:
    kind = _load_group(conn, conv).kind
    joined = last_seq(conn, conv) + 1
    added = []
    for user in dict.fromkeys(users):
        cur = conn.execute(
            "INSERT OR IGNORE INTO group_members (conv, user, role, joined_seq) VALUES (?, ?, 'member', ?)",
            (conv, user, joined),
        )
        if cur.rowcount:
            added.append(user)
    # a new member's watermarks start at the join point: nothing before it is unread
    for user in added:
        conn.execute(
            "INSERT INTO user_convs (user, conv, kind, delivered, read, version, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (user, conv) DO UPDATE SET "
            "delivered = excluded.delivered, read = excluded.read, version = excluded.version, "
            "updated_at = excluded.updated_at",
            (user, conv, kind, joined - 1, joined - 1, next_version(conn), ts),
        )
    return _load_group(conn, conv)


def _remove_member(conn: sqlite3.Connection, conv: str, user: str) -> Group:
    _load_group(conn, conv)
    cur = conn.execute("DELETE FROM group_members WHERE conv = ? AND user = ?", (conv, user))
    if not cur.rowcount:
        raise NotMember(f"{user} is not a member of {conv}")
    conn.execute("DELETE FROM user_convs WHERE conv = ? AND user = ?", (conv, user))
    return _load_group(conn, conv)


def _set_role(conn: sqlite3.Connection, conv: str, user: str, role: str) -> Group:
    _load_group(conn, conv)
    cur = conn.execute("UPDATE group_members SET role = ? WHERE conv = ? AND user = ?", (role, conv, user))
    if not cur.rowcount:
        raise NotMember(f"{user} is not a member of {conv}")
    return _load_group(conn, conv)


def _group_or_none(conn: sqlite3.Connection, conv: str) -> Group | None:
    try:
        return _load_group(conn, conv)
    except NoSuchConversation:
        return None


class SqliteGroups(SqliteDatabase, Groups):
    async def create_group(
        self, *, conv: str, name: str, kind: str, creator: str, members: tuple[str, ...], ts: int
    ) -> Group:
        return await self._write(lambda conn: _create_group(conn, conv, name, kind, creator, members, ts))

    async def group(self, conv: str) -> Group | None:
        return await self._read_with(lambda conn: _group_or_none(conn, conv))

    async def add_members(self, *, conv: str, users: tuple[str, ...], ts: int) -> Group:
        return await self._write(lambda conn: _add_members(conn, conv, users, ts))

    async def remove_member(self, *, conv: str, user: str) -> Group:
        return await self._write(lambda conn: _remove_member(conn, conv, user))

    async def set_role(self, *, conv: str, user: str, role: str) -> Group:
        return await self._write(lambda conn: _set_role(conn, conv, user, role))

    async def membership(self, *, conv: str, user: str) -> Membership | None:
        rows = await self._read(
            "SELECT g.kind, m.role, m.joined_seq FROM groups g "
            "LEFT JOIN group_members m ON m.conv = g.conv AND m.user = ? WHERE g.conv = ?",
            (user, conv),
        )
        if not rows:
            return None
        kind, role, joined_seq = rows[0]
        return Membership(kind, GroupMember(user, role, joined_seq) if role is not None else None)

    async def shares_conversation(self, a: str, b: str) -> bool:
        rows = await self._read(
            "SELECT 1 FROM user_convs x JOIN user_convs y ON y.user = ? AND y.conv = x.conv "
            "WHERE x.user = ? AND x.kind <> 'channel' LIMIT 1",
            (b, a),
        )
        return bool(rows)
