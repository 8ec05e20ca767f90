"""What a device remembers between runs: the sync cursor and, per conversation, the last message
handed to the app; and the uploads it has begun but not finished.

:class:`ClientState` is the interface; :class:`MemoryState` forgets with the process and
:class:`SqliteState` keeps it in the same local SQLite file as :class:`clients.outbox.SqliteOutbox`.
Both are keyed by user, so a file never mixes two users' positions.

:class:`UploadLedger` maps a file (:class:`UploadKey`: server, path, size, mtime, sha256) to the
URL of its unfinished upload, so that a new process resumes it rather than starting over;
:class:`MemoryUploads` and :class:`SqliteUploads` (the same file again) implement it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
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


@dataclass(frozen=True, slots=True)
class UploadKey:
    """A file an upload was begun for: where it is sent, where it lives and what it holds."""

    origin: str  # the server's base URL
    path: str  # absolute
    size: int
    mtime_ns: int
    sha256: str  # hex


class UploadLedger(ABC):
    """The URLs of unfinished uploads, by file. Implementations need not be thread-safe."""

    KEPT = 100  # the newest uploads remembered per user; an older one is begun again

    @abstractmethod
    def find(self, key: UploadKey) -> str | None:
        """The upload URL remembered for this file, or None."""

    @abstractmethod
    def remember(self, key: UploadKey, url: str) -> None:
        """Remember the upload URL of a file (replacing any other)."""

    @abstractmethod
    def forget(self, key: UploadKey) -> None:
        """Forget a file's upload (finished, or gone from the server)."""

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release what the ledger holds; the default has nothing to release."""


class MemoryUploads(UploadLedger):
    """Unfinished uploads for the life of the process."""

    def __init__(self) -> None:
        self._urls: dict[UploadKey, str] = {}

    def find(self, key: UploadKey) -> str | None:
        return self._urls.get(key)

    def remember(self, key: UploadKey, url: str) -> None:
        self._urls.pop(key, None)
        self._urls[key] = url
        while len(self._urls) > self.KEPT:
            del self._urls[next(iter(self._urls))]

    def forget(self, key: UploadKey) -> None:
        self._urls.pop(key, None)


class SqliteUploads(UploadLedger):
    """Unfinished uploads of ``user`` in a local SQLite file (the device's state file)."""

    def __init__(self, path: Path, *, user: str) -> None:
        self._user = user
        self._db = open_db(path)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS media_uploads ("
            " user TEXT NOT NULL, origin TEXT NOT NULL, path TEXT NOT NULL, size INTEGER NOT NULL,"
            " mtime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL, url TEXT NOT NULL,"
            " PRIMARY KEY (user, origin, path, size, mtime_ns, sha256))"
        )

    def _where(self, key: UploadKey) -> tuple[str, tuple[str | int, ...]]:
        return (
            "user = ? AND origin = ? AND path = ? AND size = ? AND mtime_ns = ? AND sha256 = ?",
            (self._user, key.origin, key.path, key.size, key.mtime_ns, key.sha256),
        )

    def find(self, key: UploadKey) -> str | None:
        where, params = self._where(key)
        row = self._db.execute(f"SELECT url FROM media_uploads WHERE {where}", params).fetchone()
        return None if row is None else str(row[0])

    def remember(self, key: UploadKey, url: str) -> None:
        self.forget(key)  # a new rowid: the newest entry
        self._db.execute(
            "INSERT INTO media_uploads (user, origin, path, size, mtime_ns, sha256, url) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (self._user, key.origin, key.path, key.size, key.mtime_ns, key.sha256, url),
        )
        self._db.execute(
            "DELETE FROM media_uploads WHERE user = ? AND rowid NOT IN"
            " (SELECT rowid FROM media_uploads WHERE user = ? ORDER BY rowid DESC LIMIT ?)",
            (self._user, self._user, self.KEPT),
        )

    def forget(self, key: UploadKey) -> None:
        where, params = self._where(key)
        self._db.execute(f"DELETE FROM media_uploads WHERE {where}", params)

    def close(self) -> None:
        self._db.close()
