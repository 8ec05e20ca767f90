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
- Each member has a per-conversation state row (delivered/read watermarks, last change),
  indexed by (user, change version): a sync answers "what changed for me since version V"
  at a cost proportional to what changed, not to how many conversations the user is in.
  Watermarks are monotonic; ``unread`` is derived (``last_seq - read``), never counted.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from mqchat.errors import ErrorCode, MqchatError

BUCKET_SIZE = 10_000
"""Seqs per partition bucket for stores that bucket conversations."""


@dataclass(frozen=True, slots=True)
class NewMessage:
    """A message the bridge has validated and wants stored."""

    conv: str
    members: tuple[str, ...]  # the conversation's members: their state rows change with it
    sender: str
    device: str
    client_id: str
    kind: str
    body: str
    media: tuple[str, ...]
    ts: int  # server receipt time, ms since the epoch


WHO_MAY_ADD = ("everyone", "contacts", "nobody")
PRESENCE_VISIBILITY = ("contacts", "nobody")


@dataclass(frozen=True, slots=True)
class UserSettings:
    """A user's consent. ``who_may_add``: who may put them in a group or channel (everyone;
    contacts, users they already share a conversation with; nobody). ``presence``: who sees
    them online (contacts: users sharing a conversation; nobody)."""

    who_may_add: str = "everyone"
    presence: str = "contacts"


DEFAULT_SETTINGS = UserSettings()


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
    members: tuple[str, ...] = ()  # who the message goes to (for groups: the members at that seq; channels: none)
    kind: str = "dm"  # "dm" | "group" | "channel" (a channel's message is published once, to c/{conv}/in)


@dataclass(frozen=True, slots=True)
class GroupMember:
    user: str
    role: str  # "admin" | "member"
    joined_seq: int  # the first seq this member may read (history from the join point)


@dataclass(frozen=True, slots=True)
class Group:
    conv: str
    name: str
    kind: str  # "group" | "channel"
    creator: str
    created_at: int
    members: tuple[GroupMember, ...]

    def member(self, user: str) -> GroupMember | None:
        return next((m for m in self.members if m.user == user), None)

    @property
    def users(self) -> tuple[str, ...]:
        return tuple(m.user for m in self.members)


@dataclass(frozen=True, slots=True)
class Membership:
    """One user's standing in a group or channel."""

    kind: str  # "group" | "channel"
    member: GroupMember | None  # None: not a member


@dataclass(frozen=True, slots=True)
class Page:
    messages: tuple[StoredMessage, ...]
    more: bool  # further messages exist in the direction of the read


@dataclass(frozen=True, slots=True)
class ConvState:
    """One member's view of one conversation."""

    conv: str
    kind: str
    last_seq: int
    delivered: int  # highest seq the user's devices have received
    read: int  # highest seq the user has read
    updated_at: int  # ms since the epoch of the last change
    version: int  # the store-wide change counter at the last change (the sync cursor orders by it)

    @property
    def unread(self) -> int:
        return max(0, self.last_seq - self.read)


@dataclass(frozen=True, slots=True)
class WatermarkResult:
    state: ConvState
    changed: bool  # False: the new value was not above the stored one (monotonic: ignored)


@dataclass(frozen=True, slots=True)
class ChangesPage:
    states: tuple[ConvState, ...]  # ascending by version
    version: int  # resume after this version
    more: bool


class StoreRefusal(MqchatError):
    """A write the store refuses for a reason the client must hear (not a failure); ``code`` is
    what the client is told."""

    code: ErrorCode = ErrorCode.BAD_REQUEST


class SeqBeyondEnd(StoreRefusal, ValueError):
    """A watermark above the conversation's last seq."""

    code = ErrorCode.BAD_SEQ


class NotMember(StoreRefusal):
    """A write into a conversation by someone who is not (or no longer) a member."""

    code = ErrorCode.NOT_MEMBER


class NoSuchConversation(StoreRefusal):
    """A group that does not exist."""

    code = ErrorCode.NOT_FOUND


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
    async def set_watermark(self, *, conv: str, user: str, delivered: int | None, read: int | None) -> WatermarkResult:
        """Raise the user's delivered/read watermarks of conv (reading implies delivery).
        Lower values are ignored; a value above the last seq raises SeqBeyondEnd."""

    @abstractmethod
    async def conversation_state(self, *, conv: str, user: str) -> ConvState | None:
        """The user's state of conv; None when the user has no state there yet."""

    @abstractmethod
    async def changes_since(self, *, user: str, version: int, limit: int) -> ChangesPage:
        """The user's conversation states changed after version, oldest change first."""

    @abstractmethod
    async def current_version(self) -> int:
        """The store-wide change counter now (a cursor beyond it is invalid)."""

    @abstractmethod
    async def create_group(
        self, *, conv: str, name: str, kind: str, creator: str, members: tuple[str, ...], ts: int
    ) -> Group:
        """A new group; the creator is its first admin."""

    @abstractmethod
    async def group(self, conv: str) -> Group | None: ...

    @abstractmethod
    async def add_members(self, *, conv: str, users: tuple[str, ...], ts: int) -> Group:
        """Add users (they read history from the next seq on); existing members are kept as they are."""

    @abstractmethod
    async def remove_member(self, *, conv: str, user: str) -> Group:
        """Remove user: no further messages, no history, no state row."""

    @abstractmethod
    async def total_unread(self, user: str) -> int:
        """Unread messages over all of the user's conversations (an app badge)."""

    @abstractmethod
    async def membership(self, *, conv: str, user: str) -> Membership | None:
        """The user's standing in group conv without loading every member (channels are large);
        None when there is no such group."""

    @abstractmethod
    async def shares_conversation(self, a: str, b: str) -> bool:
        """Whether users a and b are both in some group, or in a 1:1 conversation that has a
        message. Channels do not count: their members are strangers to each other."""

    @abstractmethod
    async def user_settings(self, users: Sequence[str]) -> dict[str, UserSettings]:
        """The privacy settings each of users has saved (absent: never saved; the server's
        defaults apply)."""

    @abstractmethod
    async def set_user_settings(self, user: str, settings: UserSettings) -> None: ...

    @abstractmethod
    async def set_role(self, *, conv: str, user: str, role: str) -> Group: ...

    @abstractmethod
    def statistics(self) -> StoreStatistics: ...

    @abstractmethod
    async def aclose(self) -> None:
        """Finish queued appends, then release the backend."""
