"""Groups and channels on Cassandra: ``groups`` (one row), ``group_members`` (the members of a
conversation: role, join point) and, from the other side, each member's ``user_convs`` row (the
conversations of a user; channels also in ``user_channels``). Creating a group is a lightweight
transaction (``IF NOT EXISTS``); joining and leaving write both sides."""

from __future__ import annotations

import asyncio
from typing import Any

from mqchat.errors import StorageError
from storage.base import Groups, NoSuchConversation, NotMember
from storage.cassandra.core import CassandraPart, bounded
from storage.records import Group, GroupMember, Membership

__all__ = ["STATEMENTS", "CassandraGroups"]

STATEMENTS = {
    "group_create": (
        "INSERT INTO {ks}.groups (conv, name, kind, creator, created_at) VALUES (?, ?, ?, ?, ?) IF NOT EXISTS"
    ),
    "group_get": "SELECT conv, name, kind, creator, created_at FROM {ks}.groups WHERE conv = ?",
    "member_put": "INSERT INTO {ks}.group_members (conv, user, role, joined_seq) VALUES (?, ?, ?, ?)",
    "member_delete": "DELETE FROM {ks}.group_members WHERE conv = ? AND user = ?",
    "member_role": "UPDATE {ks}.group_members SET role = ? WHERE conv = ? AND user = ? IF EXISTS",
    "state_delete": "DELETE FROM {ks}.user_convs WHERE user = ? AND conv = ?",
    "marks_delete": "DELETE FROM {ks}.watermarks WHERE user = ? AND conv = ?",
    "channel_join": "INSERT INTO {ks}.user_channels (user, conv) VALUES (?, ?)",
    "channel_leave": "DELETE FROM {ks}.user_channels WHERE user = ? AND conv = ?",
    "shared_in": "SELECT conv, kind FROM {ks}.user_convs WHERE user = ? AND conv IN ?",
}

_CHUNK = 100
_USERS_PER_BATCH = 5
"""Joining users' rows per batch: a request per user cost the node twice the CPU, and more than 10
partitions in one unlogged batch make Cassandra log a warning
(``unlogged_batch_across_partitions_warn_threshold``). A user's rows are in two partitions: the
user's own (state, change index, channel list) and the user's watermarks in the conversation."""


class CassandraGroups(CassandraPart, Groups):
    async def _load(self, conv: str) -> Group:
        row, members = await asyncio.gather(self._cql.one("group_get", (conv,)), self._members(conv))
        if row is None:
            raise NoSuchConversation(conv)
        conv_id, name, kind, creator, created_at = row
        return Group(
            conv=str(conv_id),
            name=str(name),
            kind=str(kind),
            creator=str(creator),
            created_at=int(created_at),
            members=tuple(GroupMember(u, r, j) for u, r, j in members),
        )

    async def _join(self, conv: str, kind: str, users: list[str], ts: int, *, start: int) -> None:
        """Give users a state row in conv (watermarks at the join point), in the change index:
        each user's rows in one partition per table, _USERS_PER_BATCH users per batch, a bounded
        number of batches at a time."""
        writes, version = self._state_writes(conv=conv, kind=kind, users=users, ts=ts)
        per_user: dict[str, list[tuple[str, tuple[Any, ...]]]] = {user: [] for user in users}
        for name, params in writes:
            per_user[params[3] if name == "state_touch" else params[0]].append((name, params))
        for user in users:
            per_user[user].extend(self._mark_writes(conv=conv, user=user, delivered=start, read=start))
            if kind == "channel":
                per_user[user].append(("channel_join", (user, conv)))
        try:
            batches = list(per_user.values())
            await bounded(
                [
                    self._cql.batch([write for batch in batches[i : i + _USERS_PER_BATCH] for write in batch])
                    for i in range(0, len(batches), _USERS_PER_BATCH)
                ]
            )
        finally:
            self._clock.written(version)

    async def _put_members(self, conv: str, rows: list[tuple[str, str, int]]) -> None:
        """Member rows of conv (one partition): single-partition batches of _CHUNK rows."""
        puts: list[tuple[str, tuple[Any, ...]]] = [("member_put", (conv, u, role, joined)) for u, role, joined in rows]
        await bounded([self._cql.batch(puts[i : i + _CHUNK]) for i in range(0, len(puts), _CHUNK)])

    async def create_group(
        self, *, conv: str, name: str, kind: str, creator: str, members: tuple[str, ...], ts: int
    ) -> Group:
        answer = await self._cql.conditional("group_create", (conv, name, kind, creator, ts))
        if not answer.get("[applied]"):
            raise StorageError(f"group {conv} exists already")  # ids are fresh ULIDs: not reached in practice
        self._kinds.remember(conv, kind)
        everyone = list(dict.fromkeys((creator, *members)))
        await self._put_members(conv, [(u, "admin" if u == creator else "member", 1) for u in everyone])
        await self._join(conv, kind, everyone, ts, start=0)
        return await self._load(conv)

    async def group(self, conv: str) -> Group | None:
        try:
            return await self._load(conv)
        except NoSuchConversation:
            return None

    async def add_members(self, *, conv: str, users: tuple[str, ...], ts: int) -> Group:
        group = await self._load(conv)
        joined = await self._head(conv) + 1
        # Existing members are kept as they are. Two admins adding the same user at the same
        # moment both write the same row (the later join point wins): no transaction per member,
        # since a thousand conditional writes on one partition would queue behind each other.
        added = [user for user in dict.fromkeys(users) if group.member(user) is None]
        # A new member's watermarks start at the join point (nothing before it is unread). Their
        # state rows first: a call that fails between the two is retried whole, as nobody joined.
        await self._join(conv, group.kind, added, ts, start=joined - 1)
        await self._put_members(conv, [(user, "member", joined) for user in added])
        return await self._load(conv)

    async def remove_member(self, *, conv: str, user: str) -> Group:
        await self._kind(conv)  # NoSuchConversation for an unknown group
        if not await self._is_member(conv, user):
            raise NotMember(f"{user} is not a member of {conv}")
        await self._cql.batch(
            [
                ("member_delete", (conv, user)),
                ("state_delete", (user, conv)),
                ("marks_delete", (user, conv)),
                ("channel_leave", (user, conv)),
            ],
            logged=True,
        )
        return await self._load(conv)

    async def set_role(self, *, conv: str, user: str, role: str) -> Group:
        await self._kind(conv)  # NoSuchConversation for an unknown group (without reading every member)
        answer = await self._cql.conditional("member_role", (role, conv, user))
        if not answer.get("[applied]"):
            raise NotMember(f"{user} is not a member of {conv}")
        return await self._load(conv)

    async def membership(self, *, conv: str, user: str) -> Membership | None:
        try:
            kind = await self._kind(conv)
        except NoSuchConversation:
            return None
        row = await self._cql.one("group_member", (conv, user))
        return Membership(kind, GroupMember(user, str(row[0]), int(row[1])) if row is not None else None)

    async def shares_conversation(self, a: str, b: str) -> bool:
        mine = [str(c) for c, k in await self._cql.all_pages("state_list", (a,)) if k != "channel"]
        for start in range(0, len(mine), _CHUNK):
            rows = await self._cql.rows("shared_in", (b, mine[start : start + _CHUNK]))
            if any(k != "channel" for _, k in rows):
                return True
        return False
