"""The message store interface, at the level of the domain.

Shaped so that a wide-column store (Cassandra / ScyllaDB) fits without a cross-partition
transaction:

- Messages live in partitions per conversation (and, at scale, a bucket of seqs:
  ``bucket = seq // BUCKET_SIZE``), ordered by ``seq``. Reads never span conversations.
- ``append`` is the one write. It dedups on (sender user, client message id), assigns the
  conversation's next ``seq`` and a ULID ``mid``, and returns only once the message is durable.
  Sequencing is a separate step from the insert: the SQLite store does it inside its
  transaction; a distributed store takes the seq from a sequencer (Redis ``INCR`` per
  conversation or a Cassandra LWT counter) and then inserts with ``IF NOT EXISTS``.
- Dedup is keyed by sender, not by conversation, so it is its own partition at scale.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

BUCKET_SIZE = 10_000
"""Seqs per partition bucket for stores that bucket conversations."""


@dataclass(frozen=True, slots=True)
class NewMessage:
    """A message the bridge has validated and wants stored."""

    conv: str
    sender: str
    device: str
    client_id: str
    kind: str
    body: str
    media: tuple[str, ...]
    ts: int  # server receipt time, ms since the epoch


@dataclass(frozen=True, slots=True)
class StoredMessage:
    conv: str
    seq: int
    mid: str
    sender: str
    device: str
    client_id: str
    ts: int
    kind: str
    body: str
    media: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class AppendResult:
    message: StoredMessage
    duplicate: bool  # True: (sender, client_id) was stored before; nothing was written now


@dataclass(frozen=True, slots=True)
class Page:
    messages: tuple[StoredMessage, ...]
    more: bool  # further messages exist in the direction of the read


@dataclass(frozen=True, slots=True)
class StoreStatistics:
    appended: int
    duplicates: int
    commits: int  # durable commits (fsyncs); appended / commits is the group-commit factor
    queued: int  # appends waiting for the writer right now


class MessageStore(ABC):
    """Durable, sequenced, deduplicated messages, partitioned by conversation."""

    @abstractmethod
    async def append(self, message: NewMessage) -> AppendResult:
        """Store message durably with the conversation's next seq; idempotent per
        (sender, client_id). Calls made in order from one task keep their order in seq."""

    @abstractmethod
    async def fetch_after(self, conv: str, after: int, limit: int) -> Page:
        """Messages with seq > after, ascending, at most limit."""

    @abstractmethod
    async def fetch_before(self, conv: str, before: int, limit: int) -> Page:
        """The (at most) limit messages just below seq before, ascending; more = older exist."""

    @abstractmethod
    async def last_seq(self, conv: str) -> int:
        """The highest seq of conv (0 when empty)."""

    @abstractmethod
    def statistics(self) -> StoreStatistics: ...

    @abstractmethod
    async def aclose(self) -> None:
        """Finish queued appends, then release the backend."""
