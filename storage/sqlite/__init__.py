"""The embedded backend: SQLite files in the data directory, nothing to install.

::

    SqliteMessageStore (mqchat.sqlite3: WAL, synchronous=FULL, group commit)
      = SqliteMessageLog + SqliteConversationStates + SqliteGroups + SqlitePrivacySettings + SqliteAccounts
        └─ each a SqliteDatabase (database.py):

           _write(job) ──▶ queue ──▶ writer thread: BEGIN IMMEDIATE; job ×N; COMMIT
                ▲                                   (one fsync for the whole batch)
                └──────── future resolved on the event loop ◀──┘
           _read(sql) ──▶ reader threads (own connections; WAL lets them read beside the writer)

    SqlitePushStore (push.sqlite3: WAL, synchronous=NORMAL, one connection, one thread)

Appends are taken by the writer strictly in call order, so a device's sends keep their order in
seq. A batch is as large as what queued up while the previous commit was fsyncing, so many
concurrent sends share one fsync and an idle store commits at once. The schema and its
migrations are in ``schema.py``; ``open_message_store`` and ``open_push_store`` are what
``storage.open_storage`` calls.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from mqchat.config import StorageConfig
from storage.sqlite.push import SqlitePushStore
from storage.sqlite.store import SqliteMessageStore

__all__ = ["SqliteMessageStore", "SqlitePushStore", "open_message_store", "open_push_store"]


@contextlib.asynccontextmanager
async def open_message_store(config: StorageConfig) -> AsyncIterator[SqliteMessageStore]:
    """The message store, ``mqchat.sqlite3`` in config's data directory."""
    store = await SqliteMessageStore.open(config.sqlite_path)
    try:
        yield store
    finally:
        await store.aclose()


@contextlib.asynccontextmanager
async def open_push_store(config: StorageConfig) -> AsyncIterator[SqlitePushStore]:
    """The push store, ``push.sqlite3`` in config's data directory."""
    store = await SqlitePushStore.open(config.data_dir / "push.sqlite3")
    try:
        yield store
    finally:
        await store.aclose()
