"""The core every SQLite domain part builds on: the group-commit writer and the readers.

::

    _write(job) ──▶ queue ──▶ writer thread: BEGIN IMMEDIATE; job; job; … COMMIT ──▶ futures resolved
                                             (one SAVEPOINT per job, one fsync per batch)
    _read(sql) / _read_with(fn) ──▶ reader threads (own connections; WAL lets them read beside the writer)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Self, TypeVar, cast

from mqchat.errors import StorageClosed, StorageError
from storage.base import StoreRefusal
from storage.records import AppendResult, StoreStatistics
from storage.sqlite.connection import connect
from storage.sqlite.schema import init_schema

logger = logging.getLogger(__name__)

T = TypeVar("T")

MAX_BATCH = 1024

_Job = tuple[Callable[[sqlite3.Connection], Any], "asyncio.Future[Any]"]


class SqliteDatabase:
    """One message database file: jobs written in call order by one thread, reads on a pool.
    Use ``await cls.open(path)``."""

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
    async def open(cls, path: Path, *, readers: int = 2) -> Self:
        store = cls(path=path, readers=readers)
        await asyncio.to_thread(init_schema, path)
        store._loop = asyncio.get_running_loop()
        store._writer = threading.Thread(target=store._write_loop, name="sqlite-writer", daemon=True)
        store._writer.start()
        return store

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def statistics(self) -> StoreStatistics:
        return StoreStatistics(
            appended=self._appended, duplicates=self._duplicates, commits=self._commits, queued=self._queued
        )

    def dead_workers(self) -> list[str]:
        """``["sqlite-writer"]`` when the writer thread has died (nothing can be stored)."""
        writer = self._writer
        return [] if self._closed or writer is None or writer.is_alive() else [writer.name]

    async def aclose(self) -> None:
        """Finish queued writes, then close every connection."""
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

    # --- writes --------------------------------------------------------------------------------

    async def _write(self, job: Callable[[sqlite3.Connection], T]) -> T:
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
        return cast(T, await future)

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
        conn = connect(self._path, synchronous="FULL")
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
            conn = connect(self._path, synchronous="FULL")
            self._local.conn = conn
            with self._reader_lock:
                self._reader_conns.append(conn)
        return conn

    async def _read_with(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """fn(connection) on a reader thread."""
        if self._closed:
            raise StorageClosed("message store is closed")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._readers, lambda: fn(self._reader()))
        except sqlite3.Error as exc:
            raise StorageError(f"read failed: {exc}") from exc

    async def _read(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        """The rows of one query, read on a reader thread."""
        rows: list[tuple[Any, ...]] = await self._read_with(lambda conn: conn.execute(sql, params).fetchall())
        return rows
