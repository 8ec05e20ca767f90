"""The embedded message store: one SQLite file, WAL, ``synchronous=FULL``, group commit.

::

    append() ──▶ queue ──▶ writer thread: BEGIN IMMEDIATE; dedup; seq+1; INSERT … ×N; COMMIT
        ▲                                         (one fsync for the whole batch)
        └──────── future resolved on the event loop ◀──┘

    fetch_*() ──▶ reader threads (own connections; WAL lets them read beside the writer)

Appends are taken by the writer strictly in call order, so a device's sends keep their order in
seq. A batch is as large as what queued up while the previous commit was fsyncing, so many
concurrent sends share one fsync and an idle store commits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mqchat.errors import StorageClosed, StorageError
from mqchat.ids import new_mid, parse_conv
from storage.base import (
    AppendResult,
    ChangesPage,
    ConvState,
    Group,
    GroupMember,
    Membership,
    MessageStore,
    NewMessage,
    NoSuchConversation,
    NotMember,
    Page,
    SeqBeyondEnd,
    StoredMessage,
    StoreRefusal,
    StoreStatistics,
    UserSettings,
    WatermarkResult,
)
from storage.files import private_dir, private_file

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 3
MAX_BATCH = 1024

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS conversations (
    conv TEXT PRIMARY KEY,
    last_seq INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    version INTEGER NOT NULL DEFAULT 0  -- channels: the change version of the last message
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS messages (
    conv TEXT NOT NULL,
    seq INTEGER NOT NULL,
    mid TEXT NOT NULL,
    sender TEXT NOT NULL,
    device TEXT NOT NULL,
    client_id TEXT NOT NULL,
    ts INTEGER NOT NULL,
    kind TEXT NOT NULL,
    body TEXT NOT NULL,
    media TEXT,
    PRIMARY KEY (conv, seq)
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS messages_by_sender_client_id ON messages (sender, client_id);
CREATE TABLE IF NOT EXISTS user_convs (
    user TEXT NOT NULL,
    conv TEXT NOT NULL,
    kind TEXT NOT NULL,
    delivered INTEGER NOT NULL DEFAULT 0,
    read INTEGER NOT NULL DEFAULT 0,
    version INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (user, conv)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS user_convs_by_version ON user_convs (user, version);
CREATE INDEX IF NOT EXISTS user_convs_channels ON user_convs (user) WHERE kind = 'channel';
CREATE TABLE IF NOT EXISTS groups (
    conv TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    creator TEXT NOT NULL,
    created_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS group_members (
    conv TEXT NOT NULL,
    user TEXT NOT NULL,
    role TEXT NOT NULL,
    joined_seq INTEGER NOT NULL,
    PRIMARY KEY (conv, user)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS user_settings (
    user TEXT PRIMARY KEY,
    who_may_add TEXT NOT NULL,
    presence TEXT NOT NULL
) WITHOUT ROWID;
"""

# A channel's new messages do not touch its members' rows (fan-out on read): its state changes
# with the conversation's own version, so a row's version is the later of the two.
_STATE_COLUMNS = (
    "u.conv, u.kind, COALESCE(c.last_seq, 0), u.delivered, u.read, MAX(u.updated_at, COALESCE(c.updated_at, 0)), "
    "MAX(u.version, COALESCE(c.version, 0)) AS v"
)
_STATE_FROM = "user_convs u LEFT JOIN conversations c ON c.conv = u.conv"
_CHANGES = (
    f"SELECT {_STATE_COLUMNS} FROM {_STATE_FROM} WHERE u.user = ? AND u.version > ? "
    f"UNION SELECT {_STATE_COLUMNS} FROM {_STATE_FROM} WHERE u.user = ? AND u.kind = 'channel' AND c.version > ? "
    "ORDER BY v LIMIT ?"
)

_COLUMNS = "conv, seq, mid, sender, device, client_id, ts, kind, body, media"

_Job = tuple[Callable[[sqlite3.Connection], Any], "asyncio.Future[Any]"]


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


def _row_to_message(row: tuple[Any, ...]) -> StoredMessage:
    conv, seq, mid, sender, device, client_id, ts, kind, body, media = row
    return StoredMessage(
        conv=conv,
        seq=seq,
        mid=mid,
        sender=sender,
        device=device,
        client_id=client_id,
        ts=ts,
        kind=kind,
        body=body,
        media=tuple(json.loads(media)) if media else (),
    )


def _next_version(conn: sqlite3.Connection) -> int:
    (version,) = conn.execute(
        "UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'change_version' RETURNING value"
    ).fetchone()
    return int(version)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _kind(conn: sqlite3.Connection, conv: str) -> str:
    """dm, group or channel (NoSuchConversation for an unknown group)."""
    if conv.startswith("dm:"):
        return "dm"
    row = conn.execute("SELECT kind FROM groups WHERE conv = ?", (conv,)).fetchone()
    if row is None:
        raise NoSuchConversation(conv)
    return str(row[0])


def _is_member(conn: sqlite3.Connection, conv: str, user: str) -> bool:
    return conn.execute("SELECT 1 FROM group_members WHERE conv = ? AND user = ?", (conv, user)).fetchone() is not None


def _last_seq(conn: sqlite3.Connection, conv: str) -> int:
    row = conn.execute("SELECT last_seq FROM conversations WHERE conv = ?", (conv,)).fetchone()
    return int(row[0]) if row else 0


def _state(conn: sqlite3.Connection, user: str, conv: str) -> ConvState | None:
    row = conn.execute(
        f"SELECT {_STATE_COLUMNS} FROM {_STATE_FROM} WHERE u.user = ? AND u.conv = ?", (user, conv)
    ).fetchone()
    return ConvState(*row) if row else None


def _members(conn: sqlite3.Connection, conv: str, dm_members: tuple[str, ...]) -> tuple[str, ...]:
    """The conversation's members now: from the id for 1:1, from the table for groups."""
    if not conv.startswith("g:"):
        return dm_members
    rows = conn.execute("SELECT user FROM group_members WHERE conv = ? ORDER BY user", (conv,)).fetchall()
    if not rows:
        raise NoSuchConversation(conv)
    return tuple(r[0] for r in rows)


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
    kind = _kind(conn, conv)
    for user in users:
        conn.execute(
            "INSERT INTO user_convs (user, conv, kind, version, updated_at) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (user, conv) DO UPDATE SET version = excluded.version, updated_at = excluded.updated_at",
            (user, conv, kind, _next_version(conn), ts),
        )


def _migrate_to_v3(conn: sqlite3.Connection) -> None:
    """Schema 2 → 3: conversations get a change version (channels change without touching members)."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(conversations)")}
    if "version" not in columns:
        conn.execute("ALTER TABLE conversations ADD COLUMN version INTEGER NOT NULL DEFAULT 0")


def _migrate_to_v2(conn: sqlite3.Connection) -> None:
    """Schema 1 → 2: give every member of every existing 1:1 conversation a state row."""
    conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('change_version', '0')")
    for conv, updated_at in conn.execute("SELECT conv, updated_at FROM conversations").fetchall():
        parts = conv.split(":")
        if len(parts) != 3 or parts[0] != "dm":
            continue
        for member in dict.fromkeys(parts[1:]):
            conn.execute(
                "INSERT OR IGNORE INTO user_convs (user, conv, kind, version, updated_at) VALUES (?, ?, 'dm', ?, ?)",
                (member, conv, _next_version(conn), updated_at),
            )


class SqliteMessageStore(MessageStore):
    """SQLite-backed MessageStore. Use ``await SqliteMessageStore.open(path)``."""

    def __init__(self, *, path: Path, readers: int = 2) -> None:
        self._path = path
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._queued = 0
        self._appended = 0
        self._duplicates = 0
        self._commits = 0
        self._closed = False
        self._writer: threading.Thread | None = None
        self._writer_ended = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._local = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []
        self._reader_lock = threading.Lock()
        self._readers = ThreadPoolExecutor(max_workers=readers, thread_name_prefix="sqlite-read")

    @classmethod
    async def open(cls, path: Path, *, readers: int = 2) -> SqliteMessageStore:
        store = cls(path=path, readers=readers)
        await asyncio.to_thread(store._init_schema)
        store._loop = asyncio.get_running_loop()
        store._writer = threading.Thread(target=store._write_loop, name="sqlite-writer", daemon=True)
        store._writer.start()
        return store

    async def __aenter__(self) -> SqliteMessageStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _init_schema(self) -> None:
        private_dir(self._path.parent)
        private_file(self._path)
        try:
            conn = _connect(self._path)
            try:
                conn.executescript(_SCHEMA)
                conn.execute("BEGIN IMMEDIATE")  # another process (broker, bridge) may be opening it too
                row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
                if row is not None and int(row[0]) > SCHEMA_VERSION:
                    raise StorageError(
                        f"{self._path} has schema version {row[0]}, newer than this mqchat ({SCHEMA_VERSION})"
                    )
                if row is not None and int(row[0]) < 2:
                    _migrate_to_v2(conn)
                if row is not None and int(row[0]) < 3:
                    _migrate_to_v3(conn)
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema_version', ?) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (str(SCHEMA_VERSION),),
                )
                conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('change_version', '0')")
                conn.execute("COMMIT")
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open {self._path}: {exc}") from exc

    # --- writes --------------------------------------------------------------------------------

    def dead_workers(self) -> list[str]:
        """``["sqlite-writer"]`` when the writer thread has died (nothing can be stored)."""
        writer = self._writer
        return [] if self._closed or writer is None or writer.is_alive() else [writer.name]

    async def _write(self, job: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run job in the writer's next transaction (in call order); wait until it is durable."""
        if self._closed or self._loop is None:
            raise StorageClosed("message store is closed")
        if self.dead_workers():
            raise StorageError("the store's writer has stopped")
        future: asyncio.Future[Any] = self._loop.create_future()
        self._queued += 1
        self._jobs.put((job, future))
        if self._writer_ended:  # it ended between the check and the put: nobody else will answer
            self._fail_queued()
        return await future

    async def append(self, message: NewMessage) -> AppendResult:
        result: AppendResult = await self._write(lambda conn: self._append_one(conn, message))
        return result

    async def set_watermark(self, *, conv: str, user: str, delivered: int | None, read: int | None) -> WatermarkResult:
        result: WatermarkResult = await self._write(lambda conn: self._set_watermark(conn, conv, user, delivered, read))
        return result

    def _write_loop(self) -> None:
        try:
            self._write_jobs()
        finally:
            # However the writer ended (closed, or died), nothing waits for it any more: jobs
            # queued behind it get an error instead of waiting forever.
            self._writer_ended = True
            self._fail_queued()

    def _fail_queued(self) -> None:
        while True:
            try:
                item = self._jobs.get_nowait()
            except queue.Empty:
                return
            if item is not None and self._loop is not None:
                self._loop.call_soon_threadsafe(self._resolve, [item], [StorageError("the store's writer has stopped")])

    def _write_jobs(self) -> None:
        conn = _connect(self._path)
        try:
            while True:
                job = self._jobs.get()
                if job is None:
                    return
                batch = [job]
                stop = False
                while len(batch) < MAX_BATCH:
                    try:
                        more = self._jobs.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        stop = True
                        break
                    batch.append(more)
                self._commit_batch(conn, batch)
                if stop:
                    return
        finally:
            conn.close()

    def _commit_batch(self, conn: sqlite3.Connection, batch: list[_Job]) -> None:
        results: list[Any] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for job, _ in batch:
                conn.execute("SAVEPOINT job")
                try:
                    results.append(job(conn))
                except StoreRefusal as exc:
                    conn.execute("ROLLBACK TO job")
                    results.append(exc)
                except Exception as exc:  # a failing job fails alone: its caller gets the error
                    conn.execute("ROLLBACK TO job")
                    logger.exception("a write failed")
                    results.append(StorageError(f"write failed: {exc}"))
                conn.execute("RELEASE job")
            conn.execute("COMMIT")
            self._commits += 1
        except Exception as exc:
            logger.exception("group commit of %d writes failed", len(batch))
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            results = [StorageError(f"commit failed: {exc}") for _ in batch]
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._resolve, batch, results)

    def _append_one(self, conn: sqlite3.Connection, m: NewMessage) -> AppendResult:
        row = conn.execute(
            f"SELECT {_COLUMNS} FROM messages WHERE sender = ? AND client_id = ?", (m.sender, m.client_id)
        ).fetchone()
        kind = _kind(conn, m.conv)
        channel = kind == "channel"
        # A channel's members are not listed per message (fan-out on read): only the sender is checked.
        members = () if channel else _members(conn, m.conv, m.members)
        if row is not None:
            return AppendResult(_row_to_message(row), duplicate=True, members=members, kind=kind)
        if not (_is_member(conn, m.conv, m.sender) if channel else m.sender in members):
            raise NotMember(f"{m.sender} is not a member of {m.conv}")
        (seq,) = conn.execute(
            "INSERT INTO conversations (conv, last_seq, updated_at, version) VALUES (?, 1, ?, ?) "
            "ON CONFLICT (conv) DO UPDATE SET last_seq = last_seq + 1, updated_at = excluded.updated_at, "
            "version = excluded.version RETURNING last_seq",
            (m.conv, m.ts, _next_version(conn) if channel else 0),
        ).fetchone()
        stored = StoredMessage(
            conv=m.conv,
            seq=seq,
            mid=new_mid(),
            sender=m.sender,
            device=m.device,
            client_id=m.client_id,
            ts=m.ts,
            kind=m.kind,
            body=m.body,
            media=m.media,
        )
        conn.execute(
            f"INSERT INTO messages ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                stored.conv,
                stored.seq,
                stored.mid,
                stored.sender,
                stored.device,
                stored.client_id,
                stored.ts,
                stored.kind,
                stored.body,
                json.dumps(list(stored.media)) if stored.media else None,
            ),
        )
        for member in (m.sender,) if channel else dict.fromkeys(members):
            # The sender has read (and so received) what they sent.
            own = seq if member == m.sender else 0
            conn.execute(
                "INSERT INTO user_convs (user, conv, kind, delivered, read, version, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (user, conv) DO UPDATE SET "
                "delivered = MAX(delivered, excluded.delivered), read = MAX(read, excluded.read), "
                "version = excluded.version, updated_at = excluded.updated_at",
                (member, m.conv, kind, own, own, _next_version(conn), m.ts),
            )
        return AppendResult(stored, duplicate=False, members=members, kind=kind)

    def _set_watermark(
        self, conn: sqlite3.Connection, conv: str, user: str, delivered: int | None, read: int | None
    ) -> WatermarkResult:
        kind = _kind(conn, conv)
        parsed = parse_conv(conv)
        if not (parsed is not None and user in parsed.members if kind == "dm" else _is_member(conn, conv, user)):
            raise NotMember(f"{user} is not a member of {conv}")
        state = _state(conn, user, conv)
        last_seq = state.last_seq if state is not None else _last_seq(conn, conv)
        wanted = max(delivered or 0, read or 0)
        if wanted > last_seq:
            raise SeqBeyondEnd(f"seq {wanted} is beyond the conversation's last seq {last_seq}")
        if state is None:
            if wanted == 0:
                return WatermarkResult(ConvState(conv, kind, last_seq, 0, 0, 0, 0), changed=False)
            raise SeqBeyondEnd("no state for this conversation")  # pragma: no cover - last_seq > 0 implies a row
        new_read = max(state.read, read or 0)
        new_delivered = max(state.delivered, delivered or 0, new_read)
        if (new_delivered, new_read) == (state.delivered, state.read):
            return WatermarkResult(state, changed=False)
        version = _next_version(conn)
        now = _now_ms()
        conn.execute(
            "UPDATE user_convs SET delivered = ?, read = ?, version = ?, updated_at = ? WHERE user = ? AND conv = ?",
            (new_delivered, new_read, version, now, user, conv),
        )
        changed = ConvState(conv, state.kind, state.last_seq, new_delivered, new_read, now, max(version, state.version))
        return WatermarkResult(changed, changed=True)

    def _resolve(self, batch: list[_Job], results: list[Any]) -> None:
        self._queued -= len(batch)
        for (_, future), result in zip(batch, results, strict=True):
            if isinstance(result, BaseException):
                if not future.done():
                    future.set_exception(result)
                continue
            if isinstance(result, AppendResult):
                if result.duplicate:
                    self._duplicates += 1
                else:
                    self._appended += 1
            if not future.done():
                future.set_result(result)

    # --- reads ---------------------------------------------------------------------------------

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = _connect(self._path)
            self._local.conn = conn
            with self._reader_lock:
                self._reader_conns.append(conn)
        return conn

    async def _read(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        if self._closed:
            raise StorageClosed("message store is closed")

        def run() -> list[tuple[Any, ...]]:
            return self._reader().execute(sql, params).fetchall()

        try:
            return await asyncio.get_running_loop().run_in_executor(self._readers, run)
        except sqlite3.Error as exc:
            raise StorageError(f"read failed: {exc}") from exc

    async def fetch_after(self, conv: str, after: int, limit: int) -> Page:
        rows = await self._read(
            f"SELECT {_COLUMNS} FROM messages WHERE conv = ? AND seq > ? ORDER BY seq ASC LIMIT ?",
            (conv, after, limit + 1),
        )
        return Page(tuple(_row_to_message(r) for r in rows[:limit]), more=len(rows) > limit)

    async def fetch_before(self, conv: str, before: int, limit: int) -> Page:
        rows = await self._read(
            f"SELECT {_COLUMNS} FROM messages WHERE conv = ? AND seq < ? ORDER BY seq DESC LIMIT ?",
            (conv, before, limit + 1),
        )
        page = [_row_to_message(r) for r in rows[:limit]]
        page.reverse()
        return Page(tuple(page), more=len(rows) > limit)

    async def last_seq(self, conv: str) -> int:
        rows = await self._read("SELECT last_seq FROM conversations WHERE conv = ?", (conv,))
        return int(rows[0][0]) if rows else 0

    async def conversation_state(self, *, conv: str, user: str) -> ConvState | None:
        rows = await self._read(
            f"SELECT {_STATE_COLUMNS} FROM {_STATE_FROM} WHERE u.user = ? AND u.conv = ?", (user, conv)
        )
        return ConvState(*rows[0]) if rows else None

    async def changes_since(self, *, user: str, version: int, limit: int) -> ChangesPage:
        rows = await self._read(_CHANGES, (user, version, user, version, limit + 1))
        states = tuple(ConvState(*r) for r in rows[:limit])
        return ChangesPage(states, version=states[-1].version if states else version, more=len(rows) > limit)

    async def current_version(self) -> int:
        rows = await self._read("SELECT value FROM meta WHERE key = 'change_version'", ())
        return int(rows[0][0]) if rows else 0

    # --- groups ---------------------------------------------------------------------------------

    async def create_group(
        self, *, conv: str, name: str, kind: str, creator: str, members: tuple[str, ...], ts: int
    ) -> Group:
        def job(conn: sqlite3.Connection) -> Group:
            conn.execute(
                "INSERT INTO groups (conv, name, kind, creator, created_at) VALUES (?, ?, ?, ?, ?)",
                (conv, name, kind, creator, ts),
            )
            everyone = tuple(dict.fromkeys((creator, *members)))
            for user in everyone:
                role = "admin" if user == creator else "member"
                conn.execute(
                    "INSERT INTO group_members (conv, user, role, joined_seq) VALUES (?, ?, ?, 1)", (conv, user, role)
                )
            _touch(conn, conv, everyone, ts)
            return _load_group(conn, conv)

        group: Group = await self._write(job)
        return group

    async def group(self, conv: str) -> Group | None:
        def run(conn: sqlite3.Connection) -> Group | None:
            try:
                return _load_group(conn, conv)
            except NoSuchConversation:
                return None

        if self._closed:
            raise StorageClosed("message store is closed")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._readers, lambda: run(self._reader()))
        except sqlite3.Error as exc:
            raise StorageError(f"read failed: {exc}") from exc

    async def add_members(self, *, conv: str, users: tuple[str, ...], ts: int) -> Group:
        def job(conn: sqlite3.Connection) -> Group:
            kind = _load_group(conn, conv).kind
            joined = _last_seq(conn, conv) + 1
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
                    (user, conv, kind, joined - 1, joined - 1, _next_version(conn), ts),
                )
            return _load_group(conn, conv)

        group: Group = await self._write(job)
        return group

    async def remove_member(self, *, conv: str, user: str) -> Group:
        def job(conn: sqlite3.Connection) -> Group:
            _load_group(conn, conv)
            cur = conn.execute("DELETE FROM group_members WHERE conv = ? AND user = ?", (conv, user))
            if not cur.rowcount:
                raise NotMember(f"{user} is not a member of {conv}")
            conn.execute("DELETE FROM user_convs WHERE conv = ? AND user = ?", (conv, user))
            return _load_group(conn, conv)

        group: Group = await self._write(job)
        return group

    async def total_unread(self, user: str) -> int:
        rows = await self._read(
            "SELECT COALESCE(SUM(MAX(0, COALESCE(c.last_seq, 0) - u.read)), 0) FROM user_convs u "
            "LEFT JOIN conversations c ON c.conv = u.conv WHERE u.user = ?",
            (user,),
        )
        return int(rows[0][0])

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

    async def user_settings(self, users: Sequence[str]) -> dict[str, UserSettings]:
        found: dict[str, UserSettings] = {}
        unique = list(dict.fromkeys(users))
        for start in range(0, len(unique), 500):  # SQLite's limit on bound parameters
            part = unique[start : start + 500]
            rows = await self._read(
                f"SELECT user, who_may_add, presence FROM user_settings WHERE user IN ({','.join('?' * len(part))})",
                tuple(part),
            )
            found.update({user: UserSettings(who_may_add=w, presence=p) for user, w, p in rows})
        return found

    async def set_user_settings(self, user: str, settings: UserSettings) -> None:
        def job(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO user_settings (user, who_may_add, presence) VALUES (?, ?, ?) "
                "ON CONFLICT (user) DO UPDATE SET who_may_add = excluded.who_may_add, presence = excluded.presence",
                (user, settings.who_may_add, settings.presence),
            )

        await self._write(job)

    async def set_role(self, *, conv: str, user: str, role: str) -> Group:
        def job(conn: sqlite3.Connection) -> Group:
            _load_group(conn, conv)
            cur = conn.execute("UPDATE group_members SET role = ? WHERE conv = ? AND user = ?", (role, conv, user))
            if not cur.rowcount:
                raise NotMember(f"{user} is not a member of {conv}")
            return _load_group(conn, conv)

        group: Group = await self._write(job)
        return group

    def statistics(self) -> StoreStatistics:
        return StoreStatistics(
            appended=self._appended, duplicates=self._duplicates, commits=self._commits, queued=self._queued
        )

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._jobs.put(None)
        if self._writer is not None:
            await asyncio.to_thread(self._writer.join)
        self._readers.shutdown(wait=True)
        with self._reader_lock:
            for conn in self._reader_conns:
                conn.close()
            self._reader_conns.clear()
