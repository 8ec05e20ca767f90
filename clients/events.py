"""What a device receives: typed views of the server's envelopes.

``parse_event`` turns one MQTT payload from ``u/{user}/in`` or ``u/{user}/{device}/in`` into a
:class:`Message`, :class:`Ack`, :class:`ErrorReply` or :class:`OtherEvent`; ``parse_envelope`` does
the same for an already decoded JSON object (the ``messages`` of the HTTP API). Both return None
for anything they cannot read and never raise, since the network is not trusted.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from mqchat.errors import RequestError
from mqchat.protocol import decode_object


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
    media: tuple[str, ...] = ()

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


def parse_event(payload: bytes) -> Event | None:
    """Parse one incoming envelope; None when it is not a well-formed one."""
    try:
        obj = decode_object(payload)
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
