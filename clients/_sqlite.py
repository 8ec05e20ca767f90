"""The device-local SQLite file shared by :mod:`clients.state` and :class:`clients.outbox.SqliteOutbox`."""

from __future__ import annotations

import sqlite3
from pathlib import Path


def open_db(path: Path) -> sqlite3.Connection:
    """Open (creating if needed) a state file in WAL mode, autocommit: every statement is durable
    on its own, and several connections of one process may share the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5.0)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    return db
