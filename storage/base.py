"""The storage interfaces, at the level of the domain: one per thing held, two aggregates that a
backend implements, and the bundles the factory (``storage.open_storage``) yields.

::

    Storage ─┬─ messages: MessageStore ─┬─ MessageLog          append (dedup, seq), fetch_after/before, last_seq
             │                          ├─ ConversationStates  watermarks, the per-user change index, unread
             │                          ├─ Groups              groups and channels, members, roles, contacts
             │                          ├─ PrivacySettings     each user's consent (who may add them, who sees them)
             │                          ├─ Accounts            token revocations, account deletions, erasure
             │                          └─ MediaIndex          uploads and attachments: offsets, grants, collection
             └─ push: PushStore ────────┬─ DeviceTokens        one push token per device
                                        ├─ PushSettings        muted per user and conversation, e2e per conversation
                                        ├─ PushQueue           pending notifications: enqueue, claim, finish
                                        └─ forget_user         a deleted account's tokens, mutes and pending pushes

    MessageStorage: messages only (a process that keeps no push state, e.g. the broker)

A consumer takes each part it uses as its own keyword argument, annotated with that part
(``Pipeline(log=…, states=…, groups=…)``). The aggregates are held where parts are handed out:
the wiring (``mqchat.app``) and the HTTP app factory that builds the bridge's services. The values
passed in and out are the dataclasses of ``storage.records``.

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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from mqchat.errors import ErrorCode, MqchatError
from storage.records import (
    AppendResult,
    ChangesPage,
    ConvState,
    DeviceToken,
    Group,
    MediaRecord,
    Membership,
    NewMessage,
    Page,
    Pending,
    PushJob,
    StoreStatistics,
    UserSettings,
    WatermarkResult,
)

__all__ = [
    "BUCKET_SIZE",
    "Accounts",
    "ConversationStates",
    "DeviceTokens",
    "Groups",
    "MediaIndex",
    "MessageLog",
    "MessageStorage",
    "MessageStore",
    "NoSuchConversation",
    "NotMember",
    "PrivacySettings",
    "PushQueue",
    "PushSettings",
    "PushStore",
    "SeqBeyondEnd",
    "Storage",
    "StoreRefusal",
]

BUCKET_SIZE = 10_000
"""Seqs per partition bucket for stores that bucket conversations."""


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


# --- the message store's parts -------------------------------------------------------------------


class MessageLog(ABC):
    """Durable, sequenced, deduplicated messages, partitioned by conversation."""

    @abstractmethod
    async def append(self, message: NewMessage) -> AppendResult:
        """Store message durably with the conversation's next seq; idempotent per
        (sender, client_id). Calls made in order from one task keep their order in seq, and so
        do calls from several tasks in the order their first steps ran: an implementation queues
        the message before its first await (the pipeline relies on it to keep a device's order)."""

    @abstractmethod
    async def fetch_after(self, conv: str, after: int, limit: int) -> Page:
        """Messages with seq > after, ascending, at most limit."""

    @abstractmethod
    async def fetch_before(self, conv: str, before: int, limit: int) -> Page:
        """The (at most) limit messages just below seq before, ascending; more = older exist."""

    @abstractmethod
    async def last_seq(self, conv: str) -> int:
        """The highest seq of conv (0 when empty)."""


class ConversationStates(ABC):
    """Each member's state of each conversation (watermarks, unread) and the per-user change
    index that sync reads."""

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
    async def total_unread(self, user: str) -> int:
        """Unread messages over all of the user's conversations (an app badge)."""


class Groups(ABC):
    """Groups and channels: their members, roles and join points; who shares a conversation."""

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
    async def set_role(self, *, conv: str, user: str, role: str) -> Group: ...

    @abstractmethod
    async def membership(self, *, conv: str, user: str) -> Membership | None:
        """The user's standing in group conv without loading every member (channels are large);
        None when there is no such group."""

    @abstractmethod
    async def shares_conversation(self, a: str, b: str) -> bool:
        """Whether users a and b are both in some group, or in a 1:1 conversation that has a
        message. Channels do not count: their members are strangers to each other."""


class PrivacySettings(ABC):
    """Each user's saved consent (``UserSettings``)."""

    @abstractmethod
    async def user_settings(self, users: Sequence[str]) -> dict[str, UserSettings]:
        """The privacy settings each of users has saved (absent: never saved; the server's
        defaults apply)."""

    @abstractmethod
    async def set_user_settings(self, user: str, settings: UserSettings) -> None: ...


class Accounts(ABC):
    """What logging out and deleting an account keep: the tokens each device may no longer use,
    the record of an account being erased (durable, so that a worker resumes it after a crash),
    and the erasure of what the account left behind (the conversations it wrote in, its messages
    there, its own 1:1 states, its settings). Every method is idempotent."""

    @abstractmethod
    async def revoke(self, user: str, *, device: str | None, before_ms: int) -> None:
        """Tokens of user's device (None: of every device of the user) issued at or before
        before_ms are refused from now on (storage.revocations decides). Called again, the
        latest before_ms is kept (the maximum)."""

    async def revocations(self, user: str) -> dict[str, int]:
        """device → before_ms for every revocation of user; the key ``""`` stands for every device.
        Empty when there is none."""
        return (await self.revocations_of([user])).get(user, {})

    @abstractmethod
    async def revocations_of(self, users: Sequence[str]) -> dict[str, dict[str, int]]:
        """``revocations`` of each of users, read together (a reconnecting crowd's checks share
        reads); users without any revocation are left out."""

    @abstractmethod
    async def begin_deletion(self, user: str, *, at_ms: int) -> int:
        """Record durably that user's account is being erased, as of at_ms, and return the at_ms in
        effect: a deletion begun and not finished keeps its own. One that finished is begun anew."""

    @abstractmethod
    async def pending_deletions(self) -> list[tuple[str, int]]:
        """(user, at_ms) of every deletion begun and not finished: what a worker resumes."""

    @abstractmethod
    async def finish_deletion(self, user: str) -> None:
        """The deletion of user's account is done: no longer pending. The record is kept, so that
        ``deletion_state`` still answers "deleted". Nothing happens when none was begun."""

    @abstractmethod
    async def deletion_state(self, user: str) -> tuple[int, bool] | None:
        """(at_ms, finished) of user's deletion; None when none was ever begun."""

    @abstractmethod
    async def redact_messages(self, *, conv: str, sender: str) -> int:
        """Replace every message of sender in conv by a deletion marker (``records.REDACTED_KIND``,
        "deleted": an empty body, no media); its seq, mid, ts, sender, device and client id stay,
        so the history keeps its order and has no hole, and reads return the marker. Markers
        already there are left as they are. Returns how many messages this call redacted (0 when
        repeated); messages the sender appends while it runs are left to the next call."""

    @abstractmethod
    async def sender_conversations(self, sender: str) -> list[str]:
        """Every conversation sender ever wrote a message in, each once, in no particular order:
        1:1 conversations, groups and channels, those sender has left included (leaving removes
        the member's state row, not their messages). It may also name one where a send of theirs
        failed before it was stored (redacting there finds nothing). Costs what the sender is in,
        not what they wrote."""

    @abstractmethod
    async def forget_conversation_states(self, user: str) -> None:
        """Forget user's own state of every 1:1 conversation (watermarks, change version, its entries
        in the user's change index), so that an account created later with the same id has none of
        them to sync. The other member's state and the messages stay; groups and channels are not
        touched (leaving one removes the state row: ``Groups.remove_member``). A message appended
        to such a conversation afterwards gives the user a state row again."""

    @abstractmethod
    async def delete_user_settings(self, user: str) -> None:
        """Forget user's privacy settings (``PrivacySettings``): the server's defaults apply again."""


class MediaIndex(ABC):
    """What is known of attachments (their bytes are in ``storage.objects``): uploads in progress
    and their durable offset, finished files with what was read from them, the conversations
    each was sent to (who may read it), and the work of the collector."""

    @abstractmethod
    async def create_media(self, record: MediaRecord) -> None:
        """Record a new upload (state ``uploading``, offset 0). Its id is new (never reused)."""

    @abstractmethod
    async def media_records(self, ids: Sequence[str]) -> dict[str, MediaRecord]:
        """The records of ids that exist, read together (a history page's attachments)."""

    @abstractmethod
    async def advance_upload(self, id: str, *, expected: int, offset: int, staging: str) -> bool:
        """Move an upload's durable offset from expected to offset (and its staging state).
        False, changing nothing, when its offset is not expected (another request moved it,
        or it is no longer an upload)."""

    @abstractmethod
    async def complete_media(
        self, id: str, *, content_type: str, width: int, height: int, thumbnail: bytes, completed_ms: int
    ) -> bool:
        """An upload whose bytes are all there and checked becomes a file (state ``ready``,
        offset = size, staging emptied). False when it is not an upload at its full size."""

    @abstractmethod
    async def delete_media(self, id: str) -> None:
        """Forget the record, its grants and its place in the owner's list (idempotent). Its
        bytes must have been deleted first: a record is what the collector finds them by."""

    @abstractmethod
    async def grant_media(self, ids: Sequence[str], conv: str) -> None:
        """ids were sent to conv: its members may read them from now on, and they are no longer
        unsent (idempotent)."""

    @abstractmethod
    async def media_conversations(self, id: str) -> list[str]:
        """The conversations id was sent to."""

    @abstractmethod
    async def owner_media(self, owner: str) -> list[MediaRecord]:
        """Every record owner has (uploads and files): their quota, and their erasure."""

    @abstractmethod
    async def stale_media(self, *, uploading_before_ms: int, unsent_before_ms: int, limit: int) -> list[MediaRecord]:
        """What the collector deletes: uploads created before uploading_before_ms and files never
        sent that completed before unsent_before_ms, at most limit, oldest first."""


class MessageStore(MessageLog, ConversationStates, Groups, PrivacySettings, Accounts, MediaIndex):
    """Everything a backend keeps about messages, built from its per-domain parts."""

    @abstractmethod
    def statistics(self) -> StoreStatistics: ...

    def dead_workers(self) -> list[str]:
        """Names of the store's workers that have died (nothing can be stored then); none by default."""
        return []

    @abstractmethod
    async def aclose(self) -> None:
        """Finish queued appends, then release the backend."""


# --- the push store's parts ----------------------------------------------------------------------


class DeviceTokens(ABC):
    """Push tokens: a token is bound to one device, a device has one token."""

    @abstractmethod
    async def put_token(self, token: DeviceToken) -> None:
        """Bind token to (user, device): a token is bound to one device only (moving it re-binds it),
        and a device has one token (a new one replaces the old)."""

    @abstractmethod
    async def delete_device_token(self, user: str, device: str) -> bool:
        """Forget the device's token; False when it had none."""

    @abstractmethod
    async def delete_token(self, token: str, *, registered_before: int | None = None) -> bool:
        """Forget a token the provider reported invalid; with registered_before (APNs 410's
        timestamp), only if it was not registered again since."""

    @abstractmethod
    async def tokens(self, users: Iterable[str]) -> list[DeviceToken]:
        """The tokens of every device of users."""

    async def token_of(self, user: str, device: str) -> DeviceToken | None:
        """The device's token, if it has one."""
        found = [t for t in await self.tokens([user]) if t.device == device]
        return found[0] if found else None


class PushSettings(ABC):
    """Whether a user muted a conversation, and whether a conversation is end-to-end encrypted
    (its previews are then not shown)."""

    @abstractmethod
    async def set_muted(self, user: str, conv: str, muted: bool) -> None: ...

    @abstractmethod
    async def set_e2e(self, conv: str, e2e: bool) -> None: ...

    @abstractmethod
    async def settings(self, user: str, conv: str) -> tuple[bool, bool]:
        """(muted by user, conversation end-to-end encrypted)."""


class PushQueue(ABC):
    """Pending notifications, one per (user, device, conv): a burst within the window is one job;
    a job is claimed before it is sent and pushed at most once."""

    @abstractmethod
    async def enqueue(self, pending: list[Pending], *, due_at: int) -> int:
        """Add messages for offline devices; a device's pending notification for the same
        conversation absorbs them (its window does not move). Seqs already pushed are ignored.
        Returns how many jobs were added or grown."""

    @abstractmethod
    async def claim_due(self, now: int, limit: int) -> list[PushJob]:
        """Up to limit jobs whose window has closed, marked as being sent (durably) before return."""

    @abstractmethod
    async def finish(self, job: PushJob, *, sent: bool, next_due_at: int) -> None:
        """The job is done (sent or dropped). Messages that arrived while it was being sent
        open a new window (due at next_due_at)."""

    @abstractmethod
    async def drop_interrupted(self) -> int:
        """At start-up: jobs left being sent by a process that died may or may not have reached
        the provider; dropping them keeps the promise of at most one push per message."""

    @abstractmethod
    async def depth(self) -> int:
        """Jobs queued, claimed ones included."""

    @abstractmethod
    async def next_due(self) -> int | None:
        """When the earliest unclaimed job falls due (ms); None when there is none."""


class PushStore(DeviceTokens, PushSettings, PushQueue):
    """Everything push keeps, built from its per-domain parts."""

    @abstractmethod
    async def forget_user(self, user: str) -> None:
        """Forget a deleted account's push state: the tokens of all its devices, its mutes and its
        pending notifications. A backend whose queue cannot find a user's notifications cheaply
        leaves them to fall due: with no token for the device, each is dropped unsent. Idempotent."""

    def dead_workers(self) -> list[str]:
        """Names of the store's workers that have died; none by default."""
        return []

    @abstractmethod
    async def aclose(self) -> None:
        """Release the backend."""


# --- the bundles ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageStorage:
    """A backend's message store alone: ``storage.open_storage(config, push=False)``."""

    messages: MessageStore

    def statistics(self) -> StoreStatistics:
        return self.messages.statistics()

    def dead_workers(self) -> list[str]:
        return self.messages.dead_workers()


@dataclass(frozen=True, slots=True, kw_only=True)
class Storage(MessageStorage):
    """A backend's message store and push store, opened together by ``storage.open_storage``."""

    push: PushStore

    def dead_workers(self) -> list[str]:
        return [*self.messages.dead_workers(), *self.push.dead_workers()]
