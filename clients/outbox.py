"""The outbox: sends not yet acknowledged by the server.

A send enters the outbox before it is published and leaves it when its ``ack`` (or a final
``error``) arrives. Until then the client re-publishes it with the same id after every reconnect
and every ``resend_after`` seconds; the server dedups on the id, so a resend never doubles a
message. :class:`Outbox` is the interface; :class:`MemoryOutbox` keeps entries for the life of the
process, :class:`SqliteOutbox` in a local SQLite file across restarts.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from clients._sqlite import open_db
from mqchat.protocol import send_envelope


@dataclass(frozen=True, slots=True)
class PendingSend:
    """One unacknowledged send, enough to publish it again unchanged."""

    id: str
    conv: str
    body: str
    kind: Literal["text", "media"] = "text"
    media: tuple[str, ...] = ()

    def envelope(self) -> dict[str, Any]:
        env = send_envelope(id=self.id, conv=self.conv, body=self.body, kind=self.kind)
        if self.media:
            env["media"] = list(self.media)
        return env


class Outbox(ABC):
    """Where unacknowledged sends wait. Implementations need not be thread-safe."""

    @abstractmethod
    def add(self, entry: PendingSend) -> None:
        """Store an entry; adding an id again replaces the entry and keeps its place."""

    @abstractmethod
    def remove(self, id: str) -> bool:
        """Forget the entry with this id; False when there was none."""

    @abstractmethod
    def pending(self) -> list[PendingSend]:
        """Every entry, in the order first added."""

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release what the outbox holds (a file, say); the default has nothing to release."""


class MemoryOutbox(Outbox):
    """An outbox in memory: entries are lost with the process."""

    def __init__(self) -> None:
        self._entries: dict[str, PendingSend] = {}

    def add(self, entry: PendingSend) -> None:
        self._entries[entry.id] = entry

    def remove(self, id: str) -> bool:
        return self._entries.pop(id, None) is not None

    def pending(self) -> list[PendingSend]:
        return list(self._entries.values())


class SqliteOutbox(Outbox):
    """An outbox in a local SQLite file: entries survive a restart of the app.

    A new client on the same file re-publishes the unacked entries with their original ids (the
    server dedups them). One file per device; call :meth:`close` when done.
    """

    def __init__(self, path: Path) -> None:
        self._db = open_db(path)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS outbox ("
            " position INTEGER PRIMARY KEY AUTOINCREMENT,"
            " id TEXT NOT NULL UNIQUE, conv TEXT NOT NULL, body TEXT NOT NULL,"
            " kind TEXT NOT NULL, media TEXT NOT NULL)"
        )

    def add(self, entry: PendingSend) -> None:
        self._db.execute(
            "INSERT INTO outbox (id, conv, body, kind, media) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (id) DO UPDATE SET"
            " conv = excluded.conv, body = excluded.body, kind = excluded.kind, media = excluded.media",
            (entry.id, entry.conv, entry.body, entry.kind, json.dumps(list(entry.media))),
        )

    def remove(self, id: str) -> bool:
        return self._db.execute("DELETE FROM outbox WHERE id = ?", (id,)).rowcount > 0

    def pending(self) -> list[PendingSend]:
        rows = self._db.execute("SELECT id, conv, body, kind, media FROM outbox ORDER BY position").fetchall()
        entries = []
        for id_, conv, body, kind, media in rows:
            entries.append(
                PendingSend(
                    id=id_,
                    conv=conv,
                    body=body,
                    kind="media" if kind == "media" else "text",
                    media=tuple(json.loads(media)),
                )
            )
        return entries

    def close(self) -> None:
        self._db.close()
