"""The values that go into and come out of the storage interfaces of ``storage.base``: frozen
dataclasses, the same for every backend."""

from __future__ import annotations

from dataclasses import dataclass, field

# --- messages ------------------------------------------------------------------------------------

REDACTED_KIND = "deleted"
"""The kind of a message erased with its sender's account (``Accounts.redact_messages``): its body
is empty and it has no media; seq, mid, ts, sender, device and client id are the original's."""


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

    @classmethod
    def of(cls, message: NewMessage, *, seq: int, mid: str) -> StoredMessage:
        """message as stored at seq with server id mid."""
        m = message
        return cls(m.conv, seq, mid, m.sender, m.device, m.client_id, m.ts, m.kind, m.body, m.media)


@dataclass(frozen=True, slots=True)
class AppendResult:
    message: StoredMessage
    duplicate: bool  # True: (sender, client_id) was stored before; nothing was written now
    members: tuple[str, ...] = ()  # who the message goes to (for groups: the members at that seq; channels: none)
    kind: str = "dm"  # "dm" | "group" | "channel" (a channel's message is published once, to c/{conv}/in)


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


# --- conversation state --------------------------------------------------------------------------


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


# --- groups --------------------------------------------------------------------------------------


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
    _by_user: dict[str, GroupMember] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # A channel has thousands of members, and adding a thousand asks after each of them.
        object.__setattr__(self, "_by_user", {m.user: m for m in self.members})

    def member(self, user: str) -> GroupMember | None:
        return self._by_user.get(user)

    @property
    def users(self) -> tuple[str, ...]:
        return tuple(m.user for m in self.members)


@dataclass(frozen=True, slots=True)
class Membership:
    """One user's standing in a group or channel."""

    kind: str  # "group" | "channel"
    member: GroupMember | None  # None: not a member


# --- privacy -------------------------------------------------------------------------------------

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


# --- push ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeviceToken:
    user: str
    device: str
    platform: str  # "apns" | "fcm"
    token: str
    topic: str | None
    sandbox: bool
    registered_at: int  # ms


@dataclass(frozen=True, slots=True)
class PushJob:
    """One pending notification: messages first_seq..last_seq of conv for one device."""

    id: int
    user: str
    device: str
    conv: str
    first_seq: int
    last_seq: int
    count: int  # messages in the window
    sender: str  # of the last message
    preview: str  # of the last message
    due_at: int  # ms


@dataclass(frozen=True, slots=True)
class Pending:
    """A message for a device that is not connected."""

    user: str
    device: str
    conv: str
    seq: int
    sender: str
    preview: str


UPLOADING = "uploading"
READY = "ready"


@dataclass(frozen=True, slots=True)
class MediaRecord:
    """One attachment: an upload in progress (state ``uploading``) or a file (state ``ready``).
    Its bytes are in the object store (``storage.objects``) under the key ``media/{id}``."""

    id: str
    owner: str  # the user who uploaded it (only they may send it)
    size: int  # bytes, declared when the upload was created
    content_type: str  # declared, and confirmed from the bytes unless opaque
    sha256: str  # hex digest, declared when the upload was created, checked when it completes
    opaque: bool  # an end-to-end encrypted blob: never sniffed, no thumbnail
    created_ms: int
    state: str = UPLOADING
    offset: int = 0  # bytes received and durable (== size when ready)
    staging: str = ""  # the object store's own state of the upload (opaque here)
    filename: str = ""  # as the client gave it; never in a push, never logged
    width: int = 0  # images: pixels, after the EXIF orientation (0: not an image or unknown)
    height: int = 0
    thumbnail: bytes = b""  # images: a small JPEG
    completed_ms: int = 0
    sent: bool = False  # a stored message refers to it (it was granted to a conversation)
