"""Errors the SDK raises, on top of :mod:`mqchat.errors`.

Exception tree::

    MqchatError                 (mqchat.errors)
    └── ClientError             anything the SDK raises itself
        ├── AuthFailed          the broker refused CONNACK: bad or expired credentials; not retried
        ├── SendFailed          the server answered a send with an ``error`` reply (``.reply``)
        ├── ConnectionFailed    the first connect failed, or the connection dropped with reconnect off
        ├── HistoryFailed       the HTTP API refused a sync/history call for good (``.code``)
        ├── MediaFailed         an upload, a download or a media call failed for good (``.code``)
        └── ClientClosed        the client was used after ``aclose()`` / ``close()``
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mqchat.errors import MqchatError

if TYPE_CHECKING:
    from clients.events import ErrorReply


class ClientError(MqchatError):
    """Base of the SDK's own exceptions."""


class AuthFailed(ClientError):
    """The broker refused the connection for bad credentials. The message never holds the token."""


class SendFailed(ClientError):
    """The server refused a send; ``reply`` is its ``error`` envelope, ``reply.code`` a stable code."""

    def __init__(self, reply: ErrorReply) -> None:
        super().__init__(f"{reply.code}: {reply.message}")
        self.reply = reply


class ConnectionFailed(ClientError):
    """The broker could not be reached, or the connection dropped and the client does not reconnect."""


class HistoryFailed(ClientError):
    """The HTTP API answered a call with a final error; ``code`` is its stable ``error`` code
    (``bad_cursor``, ``not_member``, ``unauthorized`` …) or ``bad_response`` for an unreadable answer."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class MediaFailed(ClientError):
    """An upload, a download or a media call failed for good. ``code`` is the server's stable
    ``error`` code (``checksum_mismatch``, ``unsupported_type``, ``too_large``, ``quota_exceeded``,
    ``not_found`` …) or one of the SDK's: ``size_mismatch`` (a download is not the file's size),
    ``gave_up`` (the retries ran out without progress), ``bad_response`` (an unreadable answer).
    ``status`` is the HTTP status when there was one."""

    def __init__(self, code: str, message: str, *, status: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.status = status


class ClientClosed(ClientError):
    """The client was used after it was closed."""
