"""What push keeps, on Cassandra: device tokens, per-user conversation settings and the push
queue, shared by every node (nothing of it lives on a node's disk).

The queue lives in the cluster rather than in Redis so that a deployment has one durable store
to run and back up, and so that a window that is open when a node dies is still there for the
others (Redis holds presence, which may be lost). The claim is the one contended step, and it is
a lightweight transaction per window (not per message): a burst of N messages costs N plain
writes and one LWT.

::

    push_items   ((user, device, conv), seq)   the messages waiting: sender, preview
    push_windows ((user, device, conv))        pushed_seq, due_at (open window), owner + lease (being sent)
    push_due     ((shard), due_at, key)        open windows by due time, over PUSH_SHARDS partitions
    push_claimed ((shard), key)                windows being sent: owner, lease

    enqueue  ─▶ item rows; then, window closed and not being sent? index it in push_due and open
                it (LWT IF due_at = null AND owner = null); otherwise the open window absorbs them
    claim    ─▶ due rows ≤ now ─▶ push_claimed row ─▶ LWT IF owner = null AND due_at = row's
    finish   ─▶ LWT IF owner = me: pushed_seq = job's last (if sent), window closed; items ≤ it
                deleted; items that arrived meanwhile open a new window (due at next_due_at)

    Each step writes its index row before the state it indexes, so a failure between the two
    leaves a row that the next reader deletes, never a window nobody can find.
    restart  ─▶ windows this node was sending are dropped (at most one push per message); a
                window whose owner's lease ran out is dropped by whichever node sees it
"""

from __future__ import annotations

import asyncio
import socket
import time
import zlib
from collections.abc import Iterable
from typing import Any

from mqchat.config import StorageConfig
from storage.base import PushStore
from storage.cassandra.session import Cql
from storage.records import DeviceToken, Pending, PushJob

__all__ = ["STATEMENTS", "CassandraPushStore"]

PUSH_SHARDS = 16
LEASE_MS = 120_000
"""How long a claimed window is its node's to send; past it, the window is dropped."""

_KEY = "user = ? AND device = ? AND conv = ?"

STATEMENTS = {
    "token_get": "SELECT user, device, registered_at FROM {ks}.push_tokens WHERE push_token = ?",
    "token_put": (
        "INSERT INTO {ks}.push_tokens (push_token, platform, user, device, topic, sandbox, registered_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)"
    ),
    "token_delete": "DELETE FROM {ks}.push_tokens WHERE push_token = ?",
    "device_token_get": "SELECT push_token FROM {ks}.device_tokens WHERE user = ? AND device = ?",
    "device_token_put": (
        "INSERT INTO {ks}.device_tokens (user, device, push_token, platform, topic, sandbox, registered_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)"
    ),
    "device_token_delete": "DELETE FROM {ks}.device_tokens WHERE user = ? AND device = ?",
    "device_tokens_of": (
        "SELECT user, device, platform, push_token, topic, sandbox, registered_at "
        "FROM {ks}.device_tokens WHERE user = ?"
    ),
    "device_tokens_forget": "DELETE FROM {ks}.device_tokens WHERE user = ?",
    "mute_put": "INSERT INTO {ks}.conv_mutes (user, conv, muted) VALUES (?, ?, ?)",
    "mutes_forget": "DELETE FROM {ks}.conv_mutes WHERE user = ?",
    "mute_get": "SELECT muted FROM {ks}.conv_mutes WHERE user = ? AND conv = ?",
    "e2e_put": "INSERT INTO {ks}.conv_flags (conv, e2e) VALUES (?, ?)",
    "e2e_get": "SELECT e2e FROM {ks}.conv_flags WHERE conv = ?",
    "item_put": "INSERT INTO {ks}.push_items (user, device, conv, seq, sender, preview) VALUES (?, ?, ?, ?, ?, ?)",
    "items_get": f"SELECT seq, sender, preview FROM {{ks}}.push_items WHERE {_KEY}",
    "items_drop": f"DELETE FROM {{ks}}.push_items WHERE {_KEY} AND seq <= ?",
    "window_get": f"SELECT pushed_seq, due_at, owner FROM {{ks}}.push_windows WHERE {_KEY}",
    "window_open": f"UPDATE {{ks}}.push_windows SET due_at = ? WHERE {_KEY} IF due_at = null AND owner = null",
    "window_claim": (
        f"UPDATE {{ks}}.push_windows SET owner = ?, lease_until = ? WHERE {_KEY} IF owner = null AND due_at = ?"
    ),
    "window_close": (
        f"UPDATE {{ks}}.push_windows SET owner = null, lease_until = null, due_at = null, pushed_seq = ? "
        f"WHERE {_KEY} IF owner = ?"
    ),
    "due_put": "INSERT INTO {ks}.push_due (shard, due_at, user, device, conv) VALUES (?, ?, ?, ?, ?)",
    "due_delete": f"DELETE FROM {{ks}}.push_due WHERE shard = ? AND due_at = ? AND {_KEY}",
    "due_upto": "SELECT due_at, user, device, conv FROM {ks}.push_due WHERE shard = ? AND due_at <= ? LIMIT ?",
    "due_first": "SELECT due_at FROM {ks}.push_due WHERE shard = ? LIMIT 1",
    "due_count": "SELECT COUNT(*) FROM {ks}.push_due WHERE shard = ?",
    "claimed_put": (
        "INSERT INTO {ks}.push_claimed (shard, user, device, conv, owner, lease_until) VALUES (?, ?, ?, ?, ?, ?)"
    ),
    "claimed_delete": f"DELETE FROM {{ks}}.push_claimed WHERE shard = ? AND {_KEY}",
    "claimed_all": "SELECT user, device, conv, owner, lease_until FROM {ks}.push_claimed WHERE shard = ?",
    "claimed_count": "SELECT COUNT(*) FROM {ks}.push_claimed WHERE shard = ?",
}


def _shard(user: str, device: str, conv: str) -> int:
    return zlib.crc32(f"{user}\0{device}\0{conv}".encode("utf-8", "surrogatepass")) % PUSH_SHARDS


def _pushed(window: tuple[Any, ...] | None) -> int:
    """The pushed_seq of a window_get row (0: nothing pushed yet, or no row)."""
    return int(window[0]) if window is not None and window[0] is not None else 0


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def owner_of(config: StorageConfig) -> str:
    """This node's name as the owner of the windows it sends: stable across its restarts."""
    return f"{socket.gethostname()}:{config.data_dir.resolve()}"


class CassandraPushStore(PushStore):
    def __init__(self, cql: Cql, *, owner: str, release: Any) -> None:
        self._cql = cql
        self._owner = owner
        self._release = release  # gives the shared connection back

    async def aclose(self) -> None:
        await self._release()

    # --- tokens ---------------------------------------------------------------------------------

    async def put_token(self, token: DeviceToken) -> None:
        old = await self._cql.one("device_token_get", (token.user, token.device))
        bound = await self._cql.one("token_get", (token.token,))
        writes: list[tuple[str, tuple[Any, ...]]] = []
        if old is not None and old[0] != token.token:
            writes.append(("token_delete", (old[0],)))
        if bound is not None and (bound[0], bound[1]) != (token.user, token.device):
            writes.append(("device_token_delete", (bound[0], bound[1])))
        row = (token.platform, token.topic, token.sandbox, token.registered_at)
        writes.append(("token_put", (token.token, token.platform, token.user, token.device, *row[1:])))
        writes.append(("device_token_put", (token.user, token.device, token.token, *row)))
        await self._cql.batch(writes, logged=True)

    async def delete_device_token(self, user: str, device: str) -> bool:
        row = await self._cql.one("device_token_get", (user, device))
        if row is None:
            return False
        await self._cql.batch([("token_delete", (row[0],)), ("device_token_delete", (user, device))], logged=True)
        return True

    async def delete_token(self, token: str, *, registered_before: int | None = None) -> bool:
        row = await self._cql.one("token_get", (token,))
        if row is None:
            return False
        user, device, registered_at = row
        if registered_before is not None and int(registered_at) > registered_before:
            return False
        writes: list[tuple[str, tuple[Any, ...]]] = [("token_delete", (token,))]
        current = await self._cql.one("device_token_get", (user, device))
        if current is not None and current[0] == token:
            writes.append(("device_token_delete", (user, device)))
        await self._cql.batch(writes, logged=True)
        return True

    async def tokens(self, users: Iterable[str]) -> list[DeviceToken]:
        wanted = list(dict.fromkeys(users))
        found = await asyncio.gather(*(self._cql.all_pages("device_tokens_of", (u,)) for u in wanted))
        return [
            DeviceToken(str(u), str(d), str(p), str(t), tp, bool(sb), int(at))
            for rows in found
            for u, d, p, t, tp, sb, at in rows
        ]

    # --- a deleted account ----------------------------------------------------------------------

    async def forget_user(self, user: str) -> None:
        """The user's tokens (both sides; a token since bound to another user is left to them)
        and mutes, in one logged batch. The user's queued notifications stay: the queue is found
        by (user, device, conv) and by due time, not by user, so finding them would read the whole
        queue. They are harmless. When a window falls due, the dispatcher finds no token for its
        device and drops it unsent, which closes the window and deletes its items; items expire
        after 7 days in any case (the table's TTL)."""
        devices = await self._cql.all_pages("device_tokens_of", (user,))
        tokens = [str(row[3]) for row in devices]
        bound = await asyncio.gather(*(self._cql.one("token_get", (t,)) for t in tokens))
        writes: list[tuple[str, tuple[Any, ...]]] = [
            ("token_delete", (t,)) for t, row in zip(tokens, bound, strict=True) if row is not None and row[0] == user
        ]
        writes.append(("device_tokens_forget", (user,)))
        writes.append(("mutes_forget", (user,)))
        await self._cql.batch(writes, logged=True)

    # --- settings -------------------------------------------------------------------------------

    async def set_muted(self, user: str, conv: str, muted: bool) -> None:
        await self._cql.run("mute_put", (user, conv, muted))

    async def set_e2e(self, conv: str, e2e: bool) -> None:
        await self._cql.run("e2e_put", (conv, e2e))

    async def settings(self, user: str, conv: str) -> tuple[bool, bool]:
        muted, e2e = await asyncio.gather(self._cql.one("mute_get", (user, conv)), self._cql.one("e2e_get", (conv,)))
        return bool(muted and muted[0]), bool(e2e and e2e[0])

    # --- the queue ------------------------------------------------------------------------------

    async def _open_window(self, user: str, device: str, conv: str, due_at: int) -> None:
        # The index row first: a window is never open without it (a row left without its window,
        # by a failure here, is deleted by the claim that meets it).
        due = (_shard(user, device, conv), due_at, user, device, conv)
        await self._cql.run("due_put", due)
        answer = await self._cql.conditional("window_open", (due_at, user, device, conv))
        if not answer.get("[applied]"):
            await self._cql.run("due_delete", due)

    async def enqueue(self, pending: list[Pending], *, due_at: int) -> int:
        by_key: dict[tuple[str, str, str], list[Pending]] = {}
        for p in pending:
            by_key.setdefault((p.user, p.device, p.conv), []).append(p)
        counts = await asyncio.gather(*(self._enqueue_key(key, items, due_at) for key, items in by_key.items()))
        return sum(counts)

    async def _enqueue_key(self, key: tuple[str, str, str], items: list[Pending], due_at: int) -> int:
        # The items first, then the window: a finish that closes the window meanwhile sees them
        # and opens the next one itself. Items at or below pushed_seq are never pushed (a claim
        # skips them; the next close deletes them).
        await self._cql.batch([("item_put", (*key, p.seq, p.sender, p.preview)) for p in items])
        window = await self._cql.one("window_get", key)
        pushed = _pushed(window)
        fresh = [p for p in items if p.seq > pushed]
        if fresh and (window is None or (window[1] is None and window[2] is None)):
            await self._open_window(*key, due_at)
        return len(fresh)

    async def claim_due(self, now: int, limit: int) -> list[PushJob]:
        await self._drop_expired()
        pages = await asyncio.gather(*(self._cql.rows("due_upto", (s, now, limit)) for s in range(PUSH_SHARDS)))
        due = sorted((int(d), str(u), str(dv), str(c)) for rows in pages for d, u, dv, c in rows)
        jobs: list[PushJob] = []
        for due_at, user, device, conv in due:
            if len(jobs) >= limit:
                break
            job = await self._claim(due_at, user, device, conv)
            if job is not None:
                jobs.append(job)
        return jobs

    async def _claim(self, due_at: int, user: str, device: str, conv: str) -> PushJob | None:
        key = (user, device, conv)
        shard = _shard(*key)
        lease_until = _now_ms() + LEASE_MS
        # The claimed row first: a window is never owned without it, so its lease is always found.
        await self._cql.run("claimed_put", (shard, *key, self._owner, lease_until))
        answer = await self._cql.conditional("window_claim", (self._owner, lease_until, *key, due_at))
        cleanup: list[tuple[str, tuple[Any, ...]]] = [("due_delete", (shard, due_at, *key))]  # claimed, or stale
        if not answer.get("[applied]"):
            cleanup.append(("claimed_delete", (shard, *key)))
        await self._cql.batch(cleanup)
        if not answer.get("[applied]"):
            return None
        pushed = _pushed(await self._cql.one("window_get", key))
        items = [
            (int(s), str(snd), str(pv)) for s, snd, pv in await self._cql.all_pages("items_get", key) if s > pushed
        ]
        if not items:
            await self._close(key, pushed)
            return None
        first, last = items[0][0], items[-1][0]
        return PushJob(
            id=zlib.crc32(f"{user}\0{device}\0{conv}\0{due_at}".encode("utf-8", "surrogatepass")),
            user=user,
            device=device,
            conv=conv,
            first_seq=first,
            last_seq=last,
            count=len(items),
            sender=items[-1][1],
            preview=items[-1][2],
            due_at=due_at,
        )

    async def _close(self, key: tuple[str, str, str], pushed: int, *, owner: str | None = None) -> bool:
        """Close the window owner is sending, with everything up to pushed done."""
        answer = await self._cql.conditional("window_close", (pushed, *key, owner or self._owner))
        applied = bool(answer.get("[applied]"))
        cleanup: list[tuple[str, tuple[Any, ...]]] = [("claimed_delete", (_shard(*key), *key))]
        if applied:  # not applied: the window is someone else's now, and so are its items
            cleanup.append(("items_drop", (*key, pushed)))
        await self._cql.batch(cleanup)
        return applied

    async def finish(self, job: PushJob, *, sent: bool, next_due_at: int) -> None:
        key = (job.user, job.device, job.conv)
        if sent:
            await self._close(key, job.last_seq)
        else:  # dropped: its messages are forgotten, but not recorded as pushed
            if await self._close(key, _pushed(await self._cql.one("window_get", key))):
                await self._cql.run("items_drop", (*key, job.last_seq))
        newer = [r for r in await self._cql.all_pages("items_get", key) if int(r[0]) > job.last_seq]
        if newer:
            await self._open_window(*key, next_due_at)

    async def _claimed(self) -> list[tuple[str, str, str, str, int]]:
        pages = await asyncio.gather(*(self._cql.all_pages("claimed_all", (s,)) for s in range(PUSH_SHARDS)))
        return [(str(u), str(d), str(c), str(o), int(lease or 0)) for rows in pages for u, d, c, o, lease in rows]

    async def _drop(self, user: str, device: str, conv: str, owner: str) -> None:
        key = (user, device, conv)
        items = await self._cql.all_pages("items_get", key)
        last = max((int(r[0]) for r in items), default=0)
        pushed = max(last, _pushed(await self._cql.one("window_get", key)))
        await self._close(key, pushed, owner=owner)

    async def _drop_expired(self) -> None:
        now = _now_ms()
        for user, device, conv, owner, lease_until in await self._claimed():
            if lease_until < now:
                await self._drop(user, device, conv, owner)

    async def drop_interrupted(self) -> int:
        dropped = 0
        for user, device, conv, owner, _ in await self._claimed():
            if owner == self._owner:
                await self._drop(user, device, conv, owner)
                dropped += 1
        return dropped

    async def depth(self) -> int:
        counts = await asyncio.gather(
            *(self._cql.one(q, (s,)) for q in ("due_count", "claimed_count") for s in range(PUSH_SHARDS))
        )
        return sum(int(c[0]) for c in counts if c is not None)

    async def next_due(self) -> int | None:
        firsts = await asyncio.gather(*(self._cql.one("due_first", (s,)) for s in range(PUSH_SHARDS)))
        due = [int(r[0]) for r in firsts if r is not None]
        return min(due) if due else None
