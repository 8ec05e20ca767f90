"""What a device remembers between runs: the sync cursor and, per conversation, the last message
handed to the app.

:class:`ClientState` is the interface; :class:`MemoryState` forgets with the process and
:class:`SqliteState` keeps it in the same local SQLite file as :class:`clients.outbox.SqliteOutbox`.
Both are keyed by user, so a file never mixes two users' positions.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

from clients._sqlite import open_db


class ClientState(ABC):
    """A device's sync position. Implementations need not be thread-safe."""

    @abstractmethod
    def cursor(self) -> str | None:
        """The cursor of the last completed sync, or None to sync from the start."""

    @abstractmethod
    def set_cursor(self, cursor: str | None) -> None:
        """Remember a sync cursor (None forgets it)."""

    @abstractmethod
    def delivered(self) -> dict[str, int]:
        """The last seq handed to the app, per conversation."""

    @abstractmethod
    def set_delivered(self, conv: str, seq: int) -> None:
        """Remember that every message of ``conv`` up to ``seq`` reached the app."""

    @abstractmethod
    def channels(self) -> set[str]:
        """The channels the user follows (subscribed to on every connect)."""

    @abstractmethod
    def set_channel(self, conv: str, member: bool) -> None:
        """Start (member) or stop following a channel."""

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release what the state holds; the default has nothing to release."""


class MemoryState(ClientState):
    """State for the life of the process."""

    def __init__(self) -> None:
        self._cursor: str | None = None
        self._delivered: dict[str, int] = {}
        self._channels: set[str] = set()

    def cursor(self) -> str | None:
        return self._cursor

    def set_cursor(self, cursor: str | None) -> None:
        self._cursor = cursor

    def delivered(self) -> dict[str, int]:
        return dict(self._delivered)

    def set_delivered(self, conv: str, seq: int) -> None:
        self._delivered[conv] = seq

    def channels(self) -> set[str]:
        return set(self._channels)

    def set_channel(self, conv: str, member: bool) -> None:
        if member:
            self._channels.add(conv)
        else:
            self._channels.discard(conv)


class SqliteState(ClientState):
    """State of ``user`` in a local SQLite file; every change is committed at once."""

    def __init__(self, path: Path, *, user: str) -> None:
        self._user = user
        self._db = open_db(path)
        self._db.execute("CREATE TABLE IF NOT EXISTS sync_cursor (user TEXT PRIMARY KEY, cursor TEXT NOT NULL)")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS delivered ("
            " user TEXT NOT NULL, conv TEXT NOT NULL, seq INTEGER NOT NULL, PRIMARY KEY (user, conv))"
        )
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS channels (user TEXT NOT NULL, conv TEXT NOT NULL, PRIMARY KEY (user, conv))"
        )

    def cursor(self) -> str | None:
        row = self._db.execute("SELECT cursor FROM sync_cursor WHERE user = ?", (self._user,)).fetchone()
        return None if row is None else str(row[0])

    def set_cursor(self, cursor: str | None) -> None:
        if cursor is None:
            self._db.execute("DELETE FROM sync_cursor WHERE user = ?", (self._user,))
        else:
            self._db.execute(
                "INSERT INTO sync_cursor (user, cursor) VALUES (?, ?)"
                " ON CONFLICT (user) DO UPDATE SET cursor = excluded.cursor",
                (self._user, cursor),
            )

    def delivered(self) -> dict[str, int]:
        rows = self._db.execute("SELECT conv, seq FROM delivered WHERE user = ?", (self._user,)).fetchall()
        return {str(conv): int(seq) for conv, seq in rows}

    def set_delivered(self, conv: str, seq: int) -> None:
        self._db.execute(
            "INSERT INTO delivered (user, conv, seq) VALUES (?, ?, ?)"
            " ON CONFLICT (user, conv) DO UPDATE SET seq = max(seq, excluded.seq)",
            (self._user, conv, seq),
        )

    def channels(self) -> set[str]:
        rows = self._db.execute("SELECT conv FROM channels WHERE user = ?", (self._user,)).fetchall()
        return {str(conv) for (conv,) in rows}

    def set_channel(self, conv: str, member: bool) -> None:
        if member:
            self._db.execute("INSERT OR IGNORE INTO channels (user, conv) VALUES (?, ?)", (self._user, conv))
        else:
            self._db.execute("DELETE FROM channels WHERE user = ? AND conv = ?", (self._user, conv))

    def close(self) -> None:
        self._db.close()
