"""Wire protocol v1: topics and JSON envelopes (see docs/protocol.md).

Requests arrive on ``u/{user}/{device}/out``; replies go to ``u/{user}/{device}/in``; events
for every device of a user go to ``u/{user}/in``. Envelopes are compact UTF-8 JSON objects
with a ``type``. This module is pure: parsing and building, no I/O. It ships with the client
SDK; the server's own ``$mqchat/`` topics are in ``mqchat.internal_topics``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Literal

from mqchat.errors import ErrorCode, RequestError
from mqchat.ids import Conv, is_valid_id, parse_conv

PROTOCOL_VERSION = 1
DEFAULT_MAX_ENVELOPE_BYTES = 64 * 1024
MAX_MEDIA_PER_MESSAGE = 32

OUT_TOPIC_FILTER = "u/+/+/out"
"""What the bridge subscribes to: every device's request topic."""

PRESENCE_TOPIC_FILTER = "p/+"
"""Every user's retained presence (the bridge's view of who is online, without a shared registry)."""


# --- topics -----------------------------------------------------------------------------------


def out_topic(user: str, device: str) -> str:
    return f"u/{user}/{device}/out"


def user_in_topic(user: str) -> str:
    return f"u/{user}/in"


def device_in_topic(user: str, device: str) -> str:
    return f"u/{user}/{device}/in"


def presence_topic(user: str) -> str:
    return f"p/{user}"


def channel_topic(conv: str) -> str:
    return f"c/{conv}/in"


def parse_out_topic(topic: str) -> tuple[str, str] | None:
    """``u/{user}/{device}/out`` → (user, device); None for any other topic."""
    parts = topic.split("/")
    if len(parts) != 4 or parts[0] != "u" or parts[3] != "out":
        return None
    user, device = parts[1], parts[2]
    if not (is_valid_id(user) and is_valid_id(device)):
        return None
    return user, device


# --- requests ---------------------------------------------------------------------------------

MessageKind = Literal["text", "media"]


@dataclass(frozen=True, slots=True)
class SendRequest:
    id: str
    conv: Conv
    body: str
    kind: MessageKind = "text"
    media: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class WatermarkRequest:
    type: Literal["recv", "read"]
    conv: Conv
    seq: int


@dataclass(frozen=True, slots=True)
class TypingRequest:
    conv: Conv
    state: bool


Request = SendRequest | WatermarkRequest | TypingRequest


def encode(envelope: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON, the only encoding on the wire."""
    return json.dumps(envelope, separators=(",", ":"), ensure_ascii=False).encode()


# A JSON escape of a UTF-16 surrogate (\ud800-\udfff). A pair of them is one character; a
# lone one decodes to a Python str that cannot be encoded as UTF-8 (so it can be neither stored
# nor sent on), and is refused at the edge.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def is_encodable(value: object) -> bool:
    """True when every string in value (a decoded JSON value: keys included) is valid Unicode."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return False
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


def decode_object(payload: bytes, *, max_bytes: int = DEFAULT_MAX_ENVELOPE_BYTES) -> dict[str, Any]:
    """Decode a payload into a JSON object, or raise RequestError (too_large / bad_json /
    bad_request for text that is not valid Unicode)."""
    if len(payload) > max_bytes:
        raise RequestError(ErrorCode.TOO_LARGE, f"envelope is {len(payload)} bytes; the limit is {max_bytes}")
    try:
        obj = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise RequestError(ErrorCode.BAD_JSON, "payload is not UTF-8 JSON") from None
    if not isinstance(obj, dict):
        raise RequestError(ErrorCode.BAD_JSON, "payload must be a JSON object")
    if _SURROGATE_ESCAPE.search(payload) and not is_encodable(obj):
        raw_id = obj.get("id")
        raise RequestError(
            ErrorCode.BAD_REQUEST,
            "text must be valid Unicode (a lone UTF-16 surrogate is not)",
            id=raw_id if is_valid_id(raw_id) else None,
        )
    return obj


def parse_request(payload: bytes, *, max_bytes: int = DEFAULT_MAX_ENVELOPE_BYTES) -> Request:
    """Parse and validate one request envelope; raise RequestError with a stable code."""
    obj = decode_object(payload, max_bytes=max_bytes)
    raw_id = obj.get("id")
    ref_id = raw_id if is_valid_id(raw_id) else None
    raw_conv = obj.get("conv")
    kind = obj.get("type")

    def fail(code: ErrorCode, message: str) -> RequestError:
        conv_ref = raw_conv if isinstance(raw_conv, str) and parse_conv(raw_conv) else None
        return RequestError(code, message, id=ref_id, conv=conv_ref)

    if not isinstance(kind, str):
        raise fail(ErrorCode.BAD_REQUEST, '"type" must be a string')
    if kind not in ("send", "recv", "read", "typing"):
        raise fail(ErrorCode.UNKNOWN_TYPE, f"unknown request type {kind[:32]!r}")
    if "conv" not in obj:
        raise fail(ErrorCode.BAD_REQUEST, '"conv" is required')
    conv = parse_conv(raw_conv)
    if conv is None:
        raise fail(ErrorCode.BAD_CONV, '"conv" is not a conversation id (dm:{a}:{b} sorted, or g:{ulid})')

    if kind == "send":
        if ref_id is None:
            raise fail(ErrorCode.BAD_REQUEST, '"id" must be 1-64 characters of [A-Za-z0-9_.@-]')
        msg_kind = obj.get("kind", "text")
        body = obj.get("body", "")
        if msg_kind not in ("text", "media"):
            raise fail(ErrorCode.BAD_REQUEST, '"kind" must be "text" or "media"')
        if not isinstance(body, str):
            raise fail(ErrorCode.BAD_REQUEST, '"body" must be a string')
        media: tuple[str, ...] = ()
        if msg_kind == "media":
            raw_media = obj.get("media")
            if (
                not isinstance(raw_media, list)
                or not 1 <= len(raw_media) <= MAX_MEDIA_PER_MESSAGE
                or not all(is_valid_id(m) for m in raw_media)
            ):
                raise fail(ErrorCode.BAD_REQUEST, f'"media" must list 1-{MAX_MEDIA_PER_MESSAGE} media ids')
            media = tuple(raw_media)
        elif not body:
            raise fail(ErrorCode.BAD_REQUEST, 'a text message needs a non-empty "body"')
        return SendRequest(id=ref_id, conv=conv, body=body, kind=msg_kind, media=media)

    if kind == "recv" or kind == "read":
        seq = obj.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq < 2**63:
            raise fail(ErrorCode.BAD_REQUEST, '"seq" must be a non-negative integer')
        return WatermarkRequest(type="recv" if kind == "recv" else "read", conv=conv, seq=seq)

    state = obj.get("state")
    if not isinstance(state, bool):
        raise fail(ErrorCode.BAD_REQUEST, '"state" must be true or false')
    return TypingRequest(conv=conv, state=state)


# --- replies and events -----------------------------------------------------------------------


def ack_envelope(*, id: str, conv: str, seq: int, mid: str, ts: int) -> dict[str, Any]:
    return {"type": "ack", "id": id, "conv": conv, "seq": seq, "mid": mid, "ts": ts}


def retry_after_ms(seconds: float) -> int:
    """The ``retry_after_ms`` of a ``rate_limited`` answer: rounded up, at least 1."""
    return max(1, math.ceil(seconds * 1000))


def error_envelope(
    code: ErrorCode,
    message: str,
    *,
    id: str | None = None,
    conv: str | None = None,
    retry_after_s: float | None = None,
) -> dict[str, Any]:
    env: dict[str, Any] = {"type": "error", "code": str(code), "message": message}
    if id is not None:
        env["id"] = id
    if conv is not None:
        env["conv"] = conv
    if retry_after_s is not None:
        env["retry_after_ms"] = retry_after_ms(retry_after_s)
    return env


def msg_envelope(
    *,
    conv: str,
    seq: int,
    mid: str,
    sender: str,
    device: str,
    id: str,
    ts: int,
    kind: str,
    body: str,
    media: tuple[str, ...] = (),
    attachments: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    env: dict[str, Any] = {
        "type": "msg",
        "conv": conv,
        "seq": seq,
        "mid": mid,
        "from": sender,
        "dev": device,
        "id": id,
        "ts": ts,
        "kind": kind,
        "body": body,
    }
    if media:
        env["media"] = list(media)
    if attachments:
        env["attachments"] = attachments
    return env


def send_envelope(*, id: str, conv: str, body: str, kind: MessageKind = "text") -> dict[str, Any]:
    """A ``send`` request, as clients build it."""
    return {"type": "send", "id": id, "conv": conv, "body": body, "kind": kind}
