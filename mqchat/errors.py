"""Errors of mqchat and the stable codes clients see.

Exception tree::

    MqchatError
    ├── ConfigError              bad or missing configuration (reported once at start-up)
    │   └── PushConfigError      (push.base) unusable push credentials or options
    ├── AuthError                a token or service credential that does not verify
    ├── UnusableJwks             (mqchat.jwks) the JWKS URL answered with no usable signing key
    ├── RequestError             a client request refused; carries a stable ErrorCode
    ├── MalformedPacket          (mqchat.mqtt_codec) bytes that are not an MQTT 3.1.1 packet
    ├── PacketTooLarge           (broker.handler) a packet over the broker's limit: connection closed
    ├── WorkerDied               (mqchat.child) a background worker ended: the process exits, restarted
    ├── DevNodeError             (storage.cassandra.devnode) the local Cassandra node cannot be fetched or started
    ├── StoreRefusal             (storage.base) a write the store refuses; its class names the
    │   ├── SeqBeyondEnd         ErrorCode the client is told
    │   ├── NotMember
    │   └── NoSuchConversation
    └── StorageError             a backend failure, translated at the backend boundary
        ├── StorageClosed        the store was used after aclose()
        └── StorageUnavailable   the backend cannot answer now (cluster unreachable, timeout):
                                 the client is told ``unavailable`` and retries

The SDK's exceptions (``clients.errors.ClientError``) and the tools' (``mqchat.bench``'s
``BenchError``, ``clients.testing.loadgen``'s ``LoadgenError``) derive from ``MqchatError`` too.

A client never sees a traceback: it sees ``{"type":"error","code":ErrorCode,"message":…}`` on
MQTT, or an HTTP status (``ErrorCode.http_status``) with ``{"error":ErrorCode,"message":…}``.
The pipeline turns a refusal into an ``error`` envelope in one place (``bridge.pipeline``), the
HTTP API into a response in one exception handler (``bridge.http.errors``).
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """Stable error codes of wire protocol v1. Extend, never rename."""

    BAD_JSON = "bad_json"  # payload is not a UTF-8 JSON object
    BAD_REQUEST = "bad_request"  # wrong shape or types, bad ids
    UNKNOWN_TYPE = "unknown_type"  # "type" is not a request this server knows
    UNSUPPORTED = "unsupported"  # a known request type this server version does not serve yet
    BAD_CONV = "bad_conv"  # not a conversation id
    NOT_MEMBER = "not_member"  # the caller is not a member of the conversation
    NOT_FOUND = "not_found"  # no such conversation / resource
    BAD_SEQ = "bad_seq"  # a watermark beyond the conversation's last seq
    BAD_CURSOR = "bad_cursor"  # a sync cursor this server did not issue
    TOO_LARGE = "too_large"  # payload over the configured limit
    RATE_LIMITED = "rate_limited"
    UNAUTHORIZED = "unauthorized"  # no or bad credentials (HTTP 401)
    FORBIDDEN = "forbidden"  # authenticated but not allowed (HTTP 403)
    ID_REUSED = "id_reused"  # the client message id already names a message in another conversation
    INTERNAL = "internal"  # the server failed; the request may be retried unchanged
    UNAVAILABLE = "unavailable"  # a backend is unreachable right now; retry later (HTTP 503)
    BAD_MEDIA = "bad_media"  # a send names media that is not the sender's finished upload
    UNSUPPORTED_TYPE = "unsupported_type"  # an upload's type is not allowed, or not what its bytes are (415)
    OFFSET_MISMATCH = "offset_mismatch"  # an upload chunk not at the upload's offset (409: HEAD, then resume)
    CHECKSUM_MISMATCH = "checksum_mismatch"  # a finished upload's bytes do not have the declared sha256 (460)
    QUOTA_EXCEEDED = "quota_exceeded"  # the user's media would pass their quota (413)
    BAD_RANGE = "bad_range"  # a Range a file cannot satisfy (416)
    UPLOAD_LOST = "upload_lost"  # an upload's bytes are gone: create it again (410)

    @property
    def http_status(self) -> int:
        """The HTTP status that answers a request refused with this code."""
        return _HTTP_STATUS[self]


_HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.BAD_JSON: 400,
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.UNKNOWN_TYPE: 400,
    ErrorCode.UNSUPPORTED: 400,
    ErrorCode.BAD_CONV: 400,
    ErrorCode.NOT_MEMBER: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.BAD_SEQ: 400,
    ErrorCode.BAD_CURSOR: 400,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.ID_REUSED: 400,
    ErrorCode.INTERNAL: 500,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.BAD_MEDIA: 400,
    ErrorCode.UNSUPPORTED_TYPE: 415,
    ErrorCode.OFFSET_MISMATCH: 409,
    ErrorCode.CHECKSUM_MISMATCH: 460,  # tus's checksum extension
    ErrorCode.QUOTA_EXCEEDED: 413,
    ErrorCode.BAD_RANGE: 416,
    ErrorCode.UPLOAD_LOST: 410,
}


class MqchatError(Exception):
    """Base of every mqchat exception."""


class ConfigError(MqchatError):
    """Configuration is missing or invalid."""


class AuthError(MqchatError):
    """A credential did not verify. The message never contains the credential."""


class RequestError(MqchatError):
    """A client request is refused with a stable code and a human-readable reason."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        id: str | None = None,
        conv: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.id = id  # the request's client message id, when it had a valid one
        self.conv = conv  # the request's conversation, when it had a valid one
        self.retry_after_s = retry_after_s  # rate_limited: when a retry can succeed


class StorageError(MqchatError):
    """A storage backend failed."""


class StorageClosed(StorageError):
    """The store was used after it was closed."""


class StorageUnavailable(StorageError):
    """The backend cannot answer right now (unreachable, timed out); nothing was lost, retry later."""
