"""Conversation states on Cassandra: a member's row in ``user_convs`` (kind, change version),
their watermarks (the maximum of the values written), the log's head for last_seq; and the
per-user change index ``user_changes`` that sync reads from a version on.

A conversation that changes again leaves its older change row behind; a read that meets such a
row (its version is below the state's) skips it and deletes it, so a sync costs what changed
since its cursor, not what the user is in. A channel's rows take the later of their own version
and the channel's (its messages do not touch its members' rows): the user's channels are read
beside the index, as on SQLite.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from storage.base import ConversationStates, NotMember, SeqBeyondEnd
from storage.cassandra.core import CassandraPart
from storage.records import ChangesPage, ConvState, WatermarkResult

__all__ = ["STATEMENTS", "CassandraConversationStates"]

STATEMENTS = {
    "state_get": "SELECT kind, version, updated_at FROM {ks}.user_convs WHERE user = ? AND conv = ?",
    "state_list": "SELECT conv, kind FROM {ks}.user_convs WHERE user = ?",
    "mark_max": "SELECT value FROM {ks}.watermarks WHERE user = ? AND conv = ? AND mark = ? LIMIT 1",
    "changes_after": "SELECT version, conv FROM {ks}.user_changes WHERE user = ? AND version > ?",
    "change_delete": "DELETE FROM {ks}.user_changes WHERE user = ? AND version = ? AND conv = ?",
    "channels_of": "SELECT conv FROM {ks}.user_channels WHERE user = ?",
    "channel_version": "SELECT version, updated_at FROM {ks}.channel_versions WHERE conv = ?",
}

_PAGE = 200

CHANGES_PAGE_ROWS = 200
"""Change-index rows per page: each costs a state read, so a page's reads stay bounded."""

CLOCK_SKEW_US = 60 * 1_000_000
"""How far ahead of this node's clock a cursor made on another node may be."""

CHANGE_TTL_S = 14 * 24 * 3600
"""How long the change index keeps a row (the table's default_time_to_live)."""


class CassandraConversationStates(CassandraPart, ConversationStates):
    async def _marks(self, user: str, conv: str) -> tuple[int, int]:
        rows = await asyncio.gather(
            self._cql.one("mark_max", (user, conv, "delivered")), self._cql.one("mark_max", (user, conv, "read"))
        )
        delivered, read = (int(r[0]) if r is not None else 0 for r in rows)
        return max(delivered, read), read

    async def _state(self, user: str, conv: str, *, head: int | None = None) -> ConvState | None:
        row, marks, last, channel = await asyncio.gather(
            self._cql.one("state_get", (user, conv)),
            self._marks(user, conv),
            self._head(conv) if head is None else _value(head),
            self._channel_version(conv),
        )
        if row is None or row[0] is None:
            return None
        kind, version, updated_at = str(row[0]), int(row[1] or 0), int(row[2] or 0)
        if kind == "channel" and channel is not None:
            version, updated_at = max(version, channel[0]), max(updated_at, channel[1])
        delivered, read = marks
        return ConvState(conv, kind, last, delivered, read, updated_at, version)

    async def _channel_version(self, conv: str) -> tuple[int, int] | None:
        if conv.startswith("dm:") or (self._kinds.get(conv) or "channel") != "channel":
            return None
        row = await self._cql.one("channel_version", (conv,))
        return (int(row[0] or 0), int(row[1] or 0)) if row is not None else None

    async def set_watermark(self, *, conv: str, user: str, delivered: int | None, read: int | None) -> WatermarkResult:
        # One at a time per (user, conv) in this process, so the state each call returns has seen
        # the calls before it; across processes the stored maximum is right either way.
        key = (user, conv)
        lock = self._mark_locks.setdefault(key, asyncio.Lock())
        try:
            async with lock:
                return await self._set_watermark(conv=conv, user=user, delivered=delivered, read=read)
        finally:
            if not lock.locked() and self._mark_locks.get(key) is lock:
                del self._mark_locks[key]

    async def _set_watermark(self, *, conv: str, user: str, delivered: int | None, read: int | None) -> WatermarkResult:
        kind = await self._kind(conv)
        if not await self._is_member(conv, user):
            raise NotMember(f"{user} is not a member of {conv}")
        head = await self._head(conv)
        state = await self._state(user, conv, head=head)
        wanted = max(delivered or 0, read or 0)
        if wanted > head:
            raise SeqBeyondEnd(f"seq {wanted} is beyond the conversation's last seq {head}")
        if state is None:
            if wanted == 0:
                return WatermarkResult(ConvState(conv, kind, head, 0, 0, 0, 0), changed=False)
            raise SeqBeyondEnd("no state for this conversation")
        new_read = max(state.read, read or 0)
        new_delivered = max(state.delivered, delivered or 0, new_read)
        if (new_delivered, new_read) == (state.delivered, state.read):
            return WatermarkResult(state, changed=False)
        now = self._clock.now() // 1000
        writes, version = self._state_writes(conv=conv, kind=state.kind, users=[user], ts=now)
        writes.extend(self._mark_writes(conv=conv, user=user, delivered=new_delivered, read=new_read))
        try:
            await self._cql.batch(writes)
        finally:
            self._clock.written(version)
        changed = ConvState(conv, state.kind, head, new_delivered, new_read, now, max(version, state.version))
        return WatermarkResult(changed, changed=True)

    async def conversation_state(self, *, conv: str, user: str) -> ConvState | None:
        return await self._state(user, conv)

    async def changes_since(self, *, user: str, version: int, limit: int) -> ChangesPage:
        if version <= 0 or version < self._clock.now() - CHANGE_TTL_S * 1_000_000:
            return await self._everything_since(user, version, limit)
        found: dict[str, ConvState] = {}
        stale: list[tuple[str, tuple[Any, ...]]] = []
        paging: bytes | None = None
        read_to = version
        while len(found) <= limit:
            page = await self._cql.page("changes_after", (user, version), paging_state=paging)
            rows = [(int(v), str(c)) for v, c in page.rows]
            read_to = max([read_to, *(v for v, _ in rows)])
            states = await asyncio.gather(*(self._state(user, c) for c in dict.fromkeys(c for _, c in rows)))
            by_conv = {s.conv: s for s in states if s is not None}
            for v, conv in rows:
                state = by_conv.get(conv)
                if state is None or (state.version > v and state.kind != "channel"):
                    stale.append(("change_delete", (user, v, conv)))  # superseded by a later change, or none
                elif conv not in found:
                    found[conv] = state
            paging = page.paging_state
            if paging is None:
                break
        # A channel changed later than the last index row read waits for the next page (unless
        # the index was read to its end), so a page never skips index rows below its version.
        bound = read_to if paging is not None else None
        for conv in await self._channels_changed(user, version):
            if conv not in found:
                state = await self._state(user, conv)
                if state is not None and state.version > version and (bound is None or state.version <= bound):
                    found[conv] = state
        if stale:
            await self._cql.batch(stale[:_PAGE])
        return self._page(found.values(), version, limit)

    async def _everything_since(self, user: str, version: int, limit: int) -> ChangesPage:
        """From the user's conversations themselves (a first sync, or a cursor older than the
        change index keeps): costs what the user is in, once."""
        convs = [str(r[0]) for r in await self._cql.all_pages("state_list", (user,))]
        states: list[ConvState] = []
        for start in range(0, len(convs), _PAGE):
            found = await asyncio.gather(*(self._state(user, c) for c in convs[start : start + _PAGE]))
            states.extend(s for s in found if s is not None and s.version > version)
        return self._page(states, version, limit)

    def _page(self, states: Iterable[ConvState], version: int, limit: int) -> ChangesPage:
        """The oldest limit of states, by version, up to the settled version (changes above it
        may still be landing: the next sync has them)."""
        settled = self._clock.settled()
        ordered = sorted((s for s in states if s.version <= settled), key=lambda s: (s.version, s.conv))
        chosen = tuple(ordered[:limit])
        return ChangesPage(chosen, version=chosen[-1].version if chosen else version, more=len(ordered) > limit)

    async def _channels_changed(self, user: str, version: int) -> list[str]:
        channels = [str(r[0]) for r in await self._cql.all_pages("channels_of", (user,))]
        versions = await asyncio.gather(*(self._cql.one("channel_version", (c,)) for c in channels))
        return [c for c, v in zip(channels, versions, strict=True) if v is not None and int(v[0] or 0) > version]

    async def current_version(self) -> int:
        # Cursors come from every node's clock: one made on a node a little ahead is still valid.
        return self._clock.now() + CLOCK_SKEW_US

    async def total_unread(self, user: str) -> int:
        convs = [str(r[0]) for r in await self._cql.all_pages("state_list", (user,))]
        total = 0
        for start in range(0, len(convs), _PAGE):
            part = convs[start : start + _PAGE]
            heads = await asyncio.gather(*(self._head(c) for c in part))
            reads = await asyncio.gather(*(self._cql.one("mark_max", (user, c, "read")) for c in part))
            total += sum(max(0, h - (int(r[0]) if r else 0)) for h, r in zip(heads, reads, strict=True))
        return total


async def _value(value: int) -> int:
    return value
