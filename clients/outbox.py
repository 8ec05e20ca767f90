"""The outbox: sends not yet acknowledged by the server.

A send enters the outbox before it is published and leaves it when its ``ack`` (or a final
``error``) arrives. Until then the client re-publishes it with the same id after every reconnect
and every ``resend_after`` seconds; the server dedups on the id, so a resend never doubles a
message. :class:`Outbox` is the interface; :class:`MemoryOutbox` keeps entries for the life of the
process.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Literal

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
