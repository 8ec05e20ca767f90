"""What push keeps, on SQLite: device tokens, per-user conversation settings, and the push queue.

Its own SQLite file beside the message store (``push.sqlite3``): push writes never wait on,
or add fsyncs to, the message store's group commits. WAL with ``synchronous=NORMAL``: a
committed write survives the process being killed (the queue must survive a bridge restart);
only a power cut may lose the last moments, and then a push is late, never a message lost.

::

    message stored ─▶ enqueue(user, device, conv, seq)  one row per (user, device, conv): a burst
                                                         within the window is one row (count, last)
    dispatcher ─▶ claim_due(now) ─▶ state 'sending' (durable before the provider is called)
               ─▶ finish(job)     ─▶ remembered as pushed up to seq; newer messages → a new window
    restart    ─▶ rows still 'sending' are dropped: a push is sent at most once, never twice
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from mqchat.errors import StorageError
from storage.base import PushStore
from storage.records import DeviceToken, Pending, PushJob
from storage.sqlite.connection import chunks, connect, placeholders, prepare_file

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS push_tokens (
    token TEXT PRIMARY KEY,
    platform TEXT NOT NULL,
    user TEXT NOT NULL,
    device TEXT NOT NULL,
    topic TEXT,
    sandbox INTEGER NOT NULL DEFAULT 0,
    registered_at INTEGER NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS push_tokens_by_device ON push_tokens (user, device);
CREATE TABLE IF NOT EXISTS conv_settings (
    user TEXT NOT NULL,
    conv TEXT NOT NULL,
    muted INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (user, conv)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS conv_flags (conv TEXT PRIMARY KEY, e2e INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS push_jobs (
    user TEXT NOT NULL,
    device TEXT NOT NULL,
    conv TEXT NOT NULL,
    first_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    count INTEGER NOT NULL,
    sender TEXT NOT NULL,
    preview TEXT NOT NULL,
    due_at INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    UNIQUE (user, device, conv)
);
CREATE INDEX IF NOT EXISTS push_jobs_due ON push_jobs (state, due_at);
CREATE TABLE IF NOT EXISTS push_sent (
    user TEXT NOT NULL,
    device TEXT NOT NULL,
    conv TEXT NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (user, device, conv)
) WITHOUT ROWID;
"""

_JOB_COLUMNS = "rowid, user, device, conv, first_seq, last_seq, count, sender, preview, due_at"


class SqlitePushStore(PushStore):
    """Use ``await SqlitePushStore.open(path)``; one connection, one thread."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="push-store")
        self._conn: sqlite3.Connection | None = None

    @classmethod
    async def open(cls, path: Path) -> SqlitePushStore:
        store = cls(path)
        await store._run(store._init)
        return store

    async def __aenter__(self) -> SqlitePushStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        def close() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await self._run(close)
        self._pool.shutdown(wait=True)

    def _init(self) -> None:
        prepare_file(self._path)
        conn = connect(self._path, synchronous="NORMAL")
        conn.executescript(_SCHEMA)
        self._conn = conn

    async def _run(self, fn: Callable[[], T]) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn)
        except sqlite3.Error as exc:
            raise StorageError(f"push store: {exc}") from exc

    def _tx(self, fn: Callable[[sqlite3.Connection], T]) -> Callable[[], T]:
        def run() -> T:
            conn = self._conn
            assert conn is not None, "push store is closed"
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return result

        return run

    # --- tokens -----------------------------------------------------------------------------------

    async def put_token(self, token: DeviceToken) -> None:
        def job(conn: sqlite3.Connection) -> None:
            conn.execute(
                "DELETE FROM push_tokens WHERE token = ? OR (user = ? AND device = ?)",
                (token.token, token.user, token.device),
            )
            conn.execute(
                "INSERT INTO push_tokens (token, platform, user, device, topic, sandbox, registered_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    token.token,
                    token.platform,
                    token.user,
                    token.device,
                    token.topic,
                    int(token.sandbox),
                    token.registered_at,
                ),
            )

        await self._run(self._tx(job))

    async def delete_device_token(self, user: str, device: str) -> bool:
        def job(conn: sqlite3.Connection) -> bool:
            return conn.execute("DELETE FROM push_tokens WHERE user = ? AND device = ?", (user, device)).rowcount > 0

        return await self._run(self._tx(job))

    async def delete_token(self, token: str, *, registered_before: int | None = None) -> bool:
        def job(conn: sqlite3.Connection) -> bool:
            if registered_before is None:
                return conn.execute("DELETE FROM push_tokens WHERE token = ?", (token,)).rowcount > 0
            return (
                conn.execute(
                    "DELETE FROM push_tokens WHERE token = ? AND registered_at <= ?", (token, registered_before)
                ).rowcount
                > 0
            )

        return await self._run(self._tx(job))

    async def tokens(self, users: Iterable[str]) -> list[DeviceToken]:
        wanted = list(dict.fromkeys(users))

        def run() -> list[DeviceToken]:
            assert self._conn is not None
            found: list[DeviceToken] = []
            for chunk in chunks(wanted):
                rows = self._conn.execute(
                    "SELECT user, device, platform, token, topic, sandbox, registered_at FROM push_tokens "
                    f"WHERE user IN ({placeholders(len(chunk))})",
                    chunk,
                ).fetchall()
                found.extend(DeviceToken(r[0], r[1], r[2], r[3], r[4], bool(r[5]), r[6]) for r in rows)
            return found

        return await self._run(run)

    # --- a deleted account -------------------------------------------------------------------------

    async def forget_user(self, user: str) -> None:
        """One transaction: the user's tokens, mutes, queued notifications (a job being sent
        now is finished as one that is gone) and what was pushed to them. Each delete goes by
        an index that leads with the user."""

        def job(conn: sqlite3.Connection) -> None:
            for table in ("push_tokens", "conv_settings", "push_jobs", "push_sent"):
                conn.execute(f"DELETE FROM {table} WHERE user = ?", (user,))

        await self._run(self._tx(job))

    # --- settings ---------------------------------------------------------------------------------

    async def set_muted(self, user: str, conv: str, muted: bool) -> None:
        def job(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO conv_settings (user, conv, muted) VALUES (?, ?, ?) "
                "ON CONFLICT (user, conv) DO UPDATE SET muted = excluded.muted",
                (user, conv, int(muted)),
            )

        await self._run(self._tx(job))

    async def set_e2e(self, conv: str, e2e: bool) -> None:
        def job(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO conv_flags (conv, e2e) VALUES (?, ?) ON CONFLICT (conv) DO UPDATE SET e2e = excluded.e2e",
                (conv, int(e2e)),
            )

        await self._run(self._tx(job))

    async def settings(self, user: str, conv: str) -> tuple[bool, bool]:
        def run() -> tuple[bool, bool]:
            assert self._conn is not None
            muted = self._conn.execute(
                "SELECT muted FROM conv_settings WHERE user = ? AND conv = ?", (user, conv)
            ).fetchone()
            e2e = self._conn.execute("SELECT e2e FROM conv_flags WHERE conv = ?", (conv,)).fetchone()
            return bool(muted and muted[0]), bool(e2e and e2e[0])

        return await self._run(run)

    # --- the queue --------------------------------------------------------------------------------

    async def enqueue(self, pending: list[Pending], *, due_at: int) -> int:
        def job(conn: sqlite3.Connection) -> int:
            changed = 0
            for p in pending:
                sent = conn.execute(
                    "SELECT seq FROM push_sent WHERE user = ? AND device = ? AND conv = ?", (p.user, p.device, p.conv)
                ).fetchone()
                if sent is not None and p.seq <= sent[0]:
                    continue
                changed += conn.execute(
                    "INSERT INTO push_jobs (user, device, conv, first_seq, last_seq, count, sender, preview, due_at) "
                    "VALUES (?, ?, ?, ?, ?, 1, ?, ?, ?) ON CONFLICT (user, device, conv) DO UPDATE SET "
                    "count = count + 1, last_seq = excluded.last_seq, sender = excluded.sender, "
                    "preview = excluded.preview WHERE excluded.last_seq > push_jobs.last_seq",
                    (p.user, p.device, p.conv, p.seq, p.seq, p.sender, p.preview, due_at),
                ).rowcount
            return changed

        return await self._run(self._tx(job))

    async def claim_due(self, now: int, limit: int) -> list[PushJob]:
        def job(conn: sqlite3.Connection) -> list[PushJob]:
            rows = conn.execute(
                f"SELECT {_JOB_COLUMNS} FROM push_jobs WHERE state = 'pending' AND due_at <= ? ORDER BY due_at LIMIT ?",
                (now, limit),
            ).fetchall()
            conn.executemany("UPDATE push_jobs SET state = 'sending' WHERE rowid = ?", [(r[0],) for r in rows])
            return [PushJob(*r) for r in rows]

        return await self._run(self._tx(job))

    async def finish(self, job: PushJob, *, sent: bool, next_due_at: int) -> None:
        def run(conn: sqlite3.Connection) -> None:
            if sent:
                conn.execute(
                    "INSERT INTO push_sent (user, device, conv, seq) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (user, device, conv) DO UPDATE SET seq = MAX(seq, excluded.seq)",
                    (job.user, job.device, job.conv, job.last_seq),
                )
            row = conn.execute("SELECT last_seq, count FROM push_jobs WHERE rowid = ?", (job.id,)).fetchone()
            if row is not None and row[0] > job.last_seq:
                conn.execute(
                    "UPDATE push_jobs SET state = 'pending', first_seq = ?, count = ?, due_at = ? WHERE rowid = ?",
                    (job.last_seq + 1, max(1, row[1] - job.count), next_due_at, job.id),
                )
            else:
                conn.execute("DELETE FROM push_jobs WHERE rowid = ?", (job.id,))

        await self._run(self._tx(run))

    async def drop_interrupted(self) -> int:
        def job(conn: sqlite3.Connection) -> int:
            return conn.execute("DELETE FROM push_jobs WHERE state = 'sending'").rowcount

        return await self._run(self._tx(job))

    async def depth(self) -> int:
        def run() -> int:
            assert self._conn is not None
            return int(self._conn.execute("SELECT COUNT(*) FROM push_jobs").fetchone()[0])

        return await self._run(run)

    async def next_due(self) -> int | None:
        def run() -> Any:
            assert self._conn is not None
            return self._conn.execute("SELECT MIN(due_at) FROM push_jobs WHERE state = 'pending'").fetchone()[0]

        due = await self._run(run)
        return int(due) if due is not None else None
