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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mqchat.errors import StorageClosed, StorageError
from mqchat.ids import new_mid
from storage.base import AppendResult, MessageStore, NewMessage, Page, StoredMessage, StoreStatistics

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MAX_BATCH = 1024

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS conversations (
    conv TEXT PRIMARY KEY,
    last_seq INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
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
"""

_COLUMNS = "conv, seq, mid, sender, device, client_id, ts, kind, body, media"

_Job = tuple[NewMessage, "asyncio.Future[AppendResult]"]


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
        self._path.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = _connect(self._path)
            try:
                conn.executescript(_SCHEMA)
                row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
                if row is None:
                    conn.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                elif int(row[0]) > SCHEMA_VERSION:
                    raise StorageError(
                        f"{self._path} has schema version {row[0]}, newer than this mqchat ({SCHEMA_VERSION})"
                    )
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open {self._path}: {exc}") from exc

    # --- writes --------------------------------------------------------------------------------

    async def append(self, message: NewMessage) -> AppendResult:
        if self._closed or self._loop is None:
            raise StorageClosed("message store is closed")
        future: asyncio.Future[AppendResult] = self._loop.create_future()
        self._queued += 1
        self._jobs.put((message, future))
        return await future

    def _write_loop(self) -> None:
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
        results: list[AppendResult | BaseException] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for message, _ in batch:
                try:
                    results.append(self._append_one(conn, message))
                except sqlite3.Error as exc:
                    logger.exception("append failed for conversation %s", message.conv)
                    results.append(StorageError(f"append failed: {exc}"))
            conn.execute("COMMIT")
            self._commits += 1
        except sqlite3.Error as exc:
            logger.exception("group commit of %d messages failed", len(batch))
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            results = [StorageError(f"commit failed: {exc}") for _ in batch]
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._resolve, batch, results)

    def _append_one(self, conn: sqlite3.Connection, m: NewMessage) -> AppendResult:
        row = conn.execute(
            f"SELECT {_COLUMNS} FROM messages WHERE sender = ? AND client_id = ?", (m.sender, m.client_id)
        ).fetchone()
        if row is not None:
            return AppendResult(_row_to_message(row), duplicate=True)
        conn.execute("SAVEPOINT one")
        try:
            (seq,) = conn.execute(
                "INSERT INTO conversations (conv, last_seq, updated_at) VALUES (?, 1, ?) "
                "ON CONFLICT (conv) DO UPDATE SET last_seq = last_seq + 1, updated_at = excluded.updated_at "
                "RETURNING last_seq",
                (m.conv, m.ts),
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
        except BaseException:
            conn.execute("ROLLBACK TO one")
            conn.execute("RELEASE one")
            raise
        conn.execute("RELEASE one")
        return AppendResult(stored, duplicate=False)

    def _resolve(self, batch: list[_Job], results: list[AppendResult | BaseException]) -> None:
        self._queued -= len(batch)
        for (_, future), result in zip(batch, results, strict=True):
            if isinstance(result, BaseException):
                if not future.done():
                    future.set_exception(result)
                continue
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
