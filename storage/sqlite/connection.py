"""Opening a SQLite file the way both stores do: private to the server, WAL, a 30 s busy wait."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal, TypeVar

from storage.files import private_dir, private_file

T = TypeVar("T")

MAX_PARAMS = 500
"""Bound parameters per query, well under SQLite's limit (``IN (?, …)`` lists are split by it)."""


def prepare_file(path: Path) -> None:
    """Create path's directory (0700) and path itself (0600) before SQLite opens it, so its -wal and
    -shm files are private too."""
    private_dir(path.parent)
    private_file(path)


def connect(path: Path, *, synchronous: Literal["FULL", "NORMAL"]) -> sqlite3.Connection:
    """An autocommit connection (transactions are explicit) in WAL mode."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


def chunks(items: Sequence[T]) -> Iterator[Sequence[T]]:
    """items in slices of at most MAX_PARAMS."""
    for start in range(0, len(items), MAX_PARAMS):
        yield items[start : start + MAX_PARAMS]


def placeholders(count: int) -> str:
    """``?,?,…`` for an ``IN (…)`` list of count values."""
    return ",".join("?" * count)
