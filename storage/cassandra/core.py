"""What every part of the Cassandra message store shares: the connection, the change-version
clock, the conversation's kind and members, the log's head, and the writes that move a member's
state row up the change index."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Hashable, Sequence
from typing import Any, TypeVar

from mqchat.ids import parse_conv
from storage.base import BUCKET_SIZE, NoSuchConversation
from storage.cassandra.session import Cql

__all__ = ["STATEMENTS", "CassandraPart", "VersionClock", "bounded", "bucket_of"]

T = TypeVar("T")

CONCURRENT = 16
"""Requests in flight at once for one call that makes many (members joining a channel)."""


async def bounded(jobs: Sequence[Awaitable[T]]) -> list[T]:
    """The results of jobs, in order, at most CONCURRENT running at a time; the first failure is
    raised once all have ended."""
    slots = asyncio.Semaphore(CONCURRENT)

    async def one(job: Awaitable[T]) -> T:
        async with slots:
            return await job

    results = await asyncio.gather(*(one(j) for j in jobs), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return [r for r in results if not isinstance(r, BaseException)]


STATEMENTS = {
    "head_hint_get": "SELECT last_seq FROM {ks}.conv_heads WHERE conv = ?",
    "head_hint_set": "INSERT INTO {ks}.conv_heads (conv, last_seq) VALUES (?, ?) USING TIMESTAMP ?",
    "bucket_head": "SELECT last_seq FROM {ks}.messages WHERE conv = ? AND bucket = ? LIMIT 1",
    "group_kind": "SELECT kind FROM {ks}.groups WHERE conv = ?",
    "group_member": "SELECT role, joined_seq FROM {ks}.group_members WHERE conv = ? AND user = ?",
    "group_members": "SELECT user, role, joined_seq FROM {ks}.group_members WHERE conv = ?",
    "state_touch": "UPDATE {ks}.user_convs SET kind = ?, version = ?, updated_at = ? WHERE user = ? AND conv = ?",
    "change_add": "INSERT INTO {ks}.user_changes (user, version, conv) VALUES (?, ?, ?)",
    "mark_add": "INSERT INTO {ks}.watermarks (user, conv, mark, value) VALUES (?, ?, ?, ?)",
    "mark_prune": "DELETE FROM {ks}.watermarks WHERE user = ? AND conv = ? AND mark = ? AND value < ?",
    "channel_touch": "UPDATE {ks}.channel_versions SET version = ?, updated_at = ? WHERE conv = ?",
}

_CACHE_SIZE = 100_000
_PRUNE_EVERY = 64
"""Watermark rows below the maximum are pruned when the value is a multiple of this."""


def bucket_of(seq: int) -> int:
    """The partition bucket of a seq (bucket 0 holds 1..BUCKET_SIZE-1, bucket k kS..(k+1)S-1)."""
    return seq // BUCKET_SIZE


class VersionClock:
    """Change versions: microseconds of the wall clock, strictly increasing within the process.
    Across nodes they order by the clocks (docs/design/cassandra.md: nodes run NTP). A version is
    taken before its write lands, so the versions still being written are tracked."""

    def __init__(self) -> None:
        self._last = 0
        self._writing: set[int] = set()

    def next(self) -> int:
        """A new version, counted as being written until ``written(version)``."""
        self._last = max(time.time_ns() // 1000, self._last + 1)
        self._writing.add(self._last)
        return self._last

    def written(self, version: int) -> None:
        self._writing.discard(version)

    def now(self) -> int:
        return max(time.time_ns() // 1000, self._last)

    def settled(self) -> int:
        """The highest version below every one still being written by this process: a sync
        cursor never passes it, so a change that lands late is not skipped."""
        return min(self._writing) - 1 if self._writing else self.now()


class _Lru(OrderedDict[Hashable, Any]):
    def remember(self, key: Hashable, value: Any) -> None:
        self[key] = value
        self.move_to_end(key)
        if len(self) > _CACHE_SIZE:
            self.popitem(last=False)


class CassandraPart:
    """Base of each domain part; the parts of one store share one instance's state."""

    _cql: Cql
    _clock: VersionClock
    _kinds: _Lru  # conv -> "group" | "channel" (a group's kind never changes)
    _heads: _Lru  # conv -> the highest seq this process has seen (may be behind other writers)
    _sender_convs: _Lru  # (sender, conv) -> True: its sender_convs row is written (rows are never deleted)
    _mark_locks: dict[tuple[str, str], asyncio.Lock]  # (user, conv) -> watermark writes in turn

    def _init_part(self, cql: Cql) -> None:
        self._cql = cql
        self._clock = VersionClock()
        self._kinds = _Lru()
        self._heads = _Lru()
        self._sender_convs = _Lru()
        self._mark_locks = {}

    async def _kind(self, conv: str) -> str:
        """dm, group or channel (NoSuchConversation for an unknown group)."""
        if conv.startswith("dm:"):
            return "dm"
        kind = self._kinds.get(conv)
        if kind is None:
            row = await self._cql.one("group_kind", (conv,))
            if row is None or row[0] is None:
                raise NoSuchConversation(conv)
            kind = str(row[0])
            self._kinds.remember(conv, kind)
        return str(kind)

    async def _members(self, conv: str) -> list[tuple[str, str, int]]:
        """(user, role, joined_seq) of every member of group conv, by user."""
        rows = await self._cql.all_pages("group_members", (conv,))
        return sorted((str(u), str(r), int(j)) for u, r, j in rows)

    async def _is_member(self, conv: str, user: str) -> bool:
        if conv.startswith("dm:"):
            parsed = parse_conv(conv)
            return parsed is not None and user in parsed.members
        return await self._cql.one("group_member", (conv, user)) is not None

    async def _head(self, conv: str) -> int:
        """The conversation's last seq, read from the log: from the head this process saw last (or,
        when it saw none, the hint), walk the buckets forward while the bucket read is full."""
        seen = self._heads.get(conv)
        if seen is None:
            row = await self._cql.one("head_hint_get", (conv,))
            seen = int(row[0]) if row and row[0] is not None else 0
        last = int(seen)
        bucket = bucket_of(last)
        while True:
            found = await self._cql.one("bucket_head", (conv, bucket))
            if found is None or found[0] is None:
                break
            last = max(last, int(found[0]))
            if last < (bucket + 1) * BUCKET_SIZE - 1:
                break
            bucket += 1
        self._heads.remember(conv, last)
        return last

    def _state_writes(
        self, *, conv: str, kind: str, users: list[str], ts: int
    ) -> tuple[list[tuple[str, tuple[Any, ...]]], int]:
        """The writes that give users a state row in conv (or move it) to a new change version."""
        version = self._clock.next()
        writes: list[tuple[str, tuple[Any, ...]]] = []
        for user in users:
            writes.append(("state_touch", (kind, version, ts, user, conv)))
            writes.append(("change_add", (user, version, conv)))
        return writes, version

    @staticmethod
    def _mark_writes(*, conv: str, user: str, delivered: int, read: int) -> list[tuple[str, tuple[Any, ...]]]:
        """Raise user's watermarks (the stored value is the maximum written; rows below it are
        pruned every _PRUNE_EVERY seqs, so a partition holds a few dozen short rows at most)."""
        writes: list[tuple[str, tuple[Any, ...]]] = []
        for mark, value in (("delivered", delivered), ("read", read)):
            writes.append(("mark_add", (user, conv, mark, value)))
            if value and value % _PRUNE_EVERY == 0:  # a range tombstone now and then, not one per write
                writes.append(("mark_prune", (user, conv, mark, value)))
        return writes
