"""Storage backends behind domain-level interfaces (see ``base.py``).

::

    bridge pipeline ──append(NewMessage)──▶ MessageStore ──▶ SQLite file (WAL, group commit)
    bridge HTTP API ──fetch_after/before──▶ MessageStore      (later: Cassandra / ScyllaDB)

``open_message_store(config)`` picks the backend from config; the embedded default is
``SqliteMessageStore`` and needs nothing installed.
"""

from storage.base import AppendResult, MessageStore, NewMessage, Page, StoredMessage, StoreStatistics
from storage.sqlite import SqliteMessageStore

__all__ = [
    "AppendResult",
    "MessageStore",
    "NewMessage",
    "Page",
    "SqliteMessageStore",
    "StoreStatistics",
    "StoredMessage",
]
