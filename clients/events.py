"""What a device receives: typed views of the server's envelopes.

``parse_event`` turns one MQTT payload from ``u/{user}/in`` or ``u/{user}/{device}/in`` into a
:class:`Message`, :class:`Ack`, :class:`ErrorReply` or :class:`OtherEvent`; ``parse_envelope`` does
the same for an already decoded JSON object (the ``messages`` of the HTTP API). Both return None
for anything they cannot read and never raise, since the network is not trusted.

A media message's ``attachments`` are read leniently: an element without a usable id, type and
size is left out, an unreadable optional field (a name, dimensions, a thumbnail) is dropped, and
the message itself stands.
"""

from __future__ import annotations

import base64
import binascii
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from mqchat.errors import RequestError
from mqchat.protocol import decode_object


@dataclass(frozen=True, slots=True)
class Attachment:
    """A file a media message carries, as the server describes it (``GET /v1/media/{id}`` fetches it)."""

    id: str
    type: str  # its content type ("application/octet-stream" when encrypted)
    size: int  # bytes
    name: str | None = None  # the file name the sender gave (never for an encrypted one)
    width: int | None = None  # images: pixels as displayed
    height: int | None = None
    thumbnail: bytes | None = None  # images: a small JPEG
    encrypted: bool = False  # an end-to-end encrypted blob: the server never read it

    def envelope(self) -> dict[str, Any]:
        env: dict[str, Any] = {"id": self.id, "type": self.type, "size": self.size}
        if self.name is not None:
            env["name"] = self.name
        if self.width is not None and self.height is not None:
            env["width"], env["height"] = self.width, self.height
        if self.thumbnail is not None:
            env["thumbnail"] = base64.b64encode(self.thumbnail).decode("ascii")
        if self.encrypted:
            env["encrypted"] = True
        return env


@dataclass(frozen=True, slots=True)
class Message:
    """A stored message of a conversation (``msg``), the device's own ones included."""

    conv: str
    seq: int
    mid: str
    sender: str  # "from": the sending user
    device: str  # "dev": the sending device
    id: str  # the sender's client message id
    ts: int  # server time, ms since the epoch
    kind: str
    body: str
    media: tuple[str, ...] = ()  # the media ids of a "media" message, as sent
    attachments: tuple[Attachment, ...] = ()  # what the server says of each of them

    def envelope(self) -> dict[str, Any]:
        env: dict[str, Any] = {
            "type": "msg",
            "conv": self.conv,
            "seq": self.seq,
            "mid": self.mid,
            "from": self.sender,
            "dev": self.device,
            "id": self.id,
            "ts": self.ts,
            "kind": self.kind,
            "body": self.body,
        }
        if self.media:
            env["media"] = list(self.media)
        if self.attachments:
            env["attachments"] = [a.envelope() for a in self.attachments]
        return env


@dataclass(frozen=True, slots=True)
class Ack:
    """The server stored a send of this device durably as ``seq`` of ``conv``."""

    id: str
    conv: str
    seq: int
    mid: str
    ts: int

    def envelope(self) -> dict[str, Any]:
        return {
            "type": "ack",
            "id": self.id,
            "conv": self.conv,
            "seq": self.seq,
            "mid": self.mid,
            "ts": self.ts,
        }


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """The server refused a request of this device; ``code`` is a stable ``ErrorCode`` value."""

    code: str
    message: str
    id: str | None = None
    conv: str | None = None
    retry_after_ms: int | None = None  # rate_limited: when a retry can succeed

    def envelope(self) -> dict[str, Any]:
        env: dict[str, Any] = {"type": "error", "code": self.code, "message": self.message}
        if self.id is not None:
            env["id"] = self.id
        if self.conv is not None:
            env["conv"] = self.conv
        if self.retry_after_ms is not None:
            env["retry_after_ms"] = self.retry_after_ms
        return env


@dataclass(frozen=True, slots=True)
class OtherEvent:
    """Any other envelope (``receipt``, ``typing``, ``conv``, future types), kept whole."""

    type: str
    data: dict[str, Any] = field(hash=False)

    def envelope(self) -> dict[str, Any]:
        return dict(self.data)


Event = Message | Ack | ErrorReply | OtherEvent


def _str(obj: dict[str, Any], key: str) -> str | None:
    value = obj.get(key)
    return value if isinstance(value, str) else None


def _int(obj: dict[str, Any], key: str) -> int | None:
    value = obj.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


MAX_EVENT_BYTES = 1024 * 1024
"""The largest event taken: an event says more than the request it answers (a ``msg`` carries
its attachments' descriptions beside the body of a send at the request limit)."""


def parse_event(payload: bytes) -> Event | None:
    """Parse one incoming envelope; None when it is not a well-formed one."""
    try:
        obj = decode_object(payload, max_bytes=MAX_EVENT_BYTES)
    except RequestError:
        return None
    return parse_envelope(obj)


def parse_envelope(obj: dict[str, Any]) -> Event | None:
    """Parse one decoded envelope (an element of an HTTP history page, say); None when malformed."""
    kind = _str(obj, "type")
    if kind is None:
        return None
    if kind == "msg":
        return _parse_msg(obj)
    if kind == "ack":
        id_, conv, mid = _str(obj, "id"), _str(obj, "conv"), _str(obj, "mid")
        seq, ts = _int(obj, "seq"), _int(obj, "ts")
        if id_ is None or conv is None or mid is None or seq is None or ts is None:
            return None
        return Ack(id=id_, conv=conv, seq=seq, mid=mid, ts=ts)
    if kind == "error":
        code, message = _str(obj, "code"), _str(obj, "message")
        if code is None or message is None:
            return None
        if obj.get("id") is not None and _str(obj, "id") is None:
            return None
        if obj.get("conv") is not None and _str(obj, "conv") is None:
            return None
        retry_after = _int(obj, "retry_after_ms")
        return ErrorReply(
            code=code,
            message=message,
            id=_str(obj, "id"),
            conv=_str(obj, "conv"),
            retry_after_ms=retry_after if retry_after is not None and retry_after >= 0 else None,
        )
    return OtherEvent(type=kind, data=obj)


def _parse_msg(obj: dict[str, Any]) -> Message | None:
    conv, mid, sender, device = _str(obj, "conv"), _str(obj, "mid"), _str(obj, "from"), _str(obj, "dev")
    id_, kind, body = _str(obj, "id"), _str(obj, "kind"), _str(obj, "body")
    seq, ts = _int(obj, "seq"), _int(obj, "ts")
    if conv is None or mid is None or sender is None or device is None or id_ is None:
        return None
    if kind is None or body is None or seq is None or ts is None:
        return None
    raw_media = obj.get("media", [])
    if not isinstance(raw_media, list) or not all(isinstance(m, str) for m in raw_media):
        return None
    return Message(
        conv=conv,
        seq=seq,
        mid=mid,
        sender=sender,
        device=device,
        id=id_,
        ts=ts,
        kind=kind,
        body=body,
        media=tuple(raw_media),
        attachments=parse_attachments(obj.get("attachments")),
    )


def parse_attachments(raw: object) -> tuple[Attachment, ...]:
    """The readable elements of a msg's ``attachments`` (anything else: none); never raises."""
    if not isinstance(raw, list):
        return ()
    found = []
    for item in raw:
        attachment = _parse_attachment(item) if isinstance(item, dict) else None
        if attachment is not None:
            found.append(attachment)
    return tuple(found)


def _parse_attachment(obj: dict[str, Any]) -> Attachment | None:
    id_, type_, size = _str(obj, "id"), _str(obj, "type"), _int(obj, "size")
    if not id_ or type_ is None or size is None or size < 0:
        return None
    width, height = _int(obj, "width"), _int(obj, "height")
    if width is None or height is None or width <= 0 or height <= 0:
        width = height = None
    thumbnail = None
    encoded = _str(obj, "thumbnail")
    if encoded:
        try:
            thumbnail = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            thumbnail = None
    return Attachment(
        id=id_,
        type=type_,
        size=size,
        name=_str(obj, "name"),
        width=width,
        height=height,
        thumbnail=thumbnail,
        encrypted=obj.get("encrypted") is True,
    )


class SeenMessages:
    """The (conv, seq) pairs seen lately, to drop redelivered ``msg`` events.

    Bounded: the oldest pairs are forgotten past ``capacity``. Redeliveries come soon after the
    original (QoS 1 retries, outbox resends), so a recent window is enough.
    """

    def __init__(self, *, capacity: int = 65536) -> None:
        self._capacity = capacity
        self._seen: OrderedDict[tuple[str, int], None] = OrderedDict()

    def first_time(self, conv: str, seq: int) -> bool:
        """Record (conv, seq); True the first time it is seen, False for a duplicate."""
        key = (conv, seq)
        if key in self._seen:
            self._seen.move_to_end(key)
            return False
        self._seen[key] = None
        if len(self._seen) > self._capacity:
            self._seen.popitem(last=False)
        return True
