"""The push provider interface and what every provider shares: messages, normalised outcomes, retries.

A dispatcher builds one `PushMessage` per (device, conversation) and calls `send_with_retries`. The result's
`Outcome` says what to do next:

=================  ===================================================================================
``DELIVERED``      accepted by Apple/Google.
``INVALID_TOKEN``  delete the device token. For APNs 410 compare `PushResult.token_invalid_since` with when
                   the token was (re-)registered: a token registered after that instant is still good.
``RETRY``          transient (429, 5xx, timeout, connection): try again later, after `retry_after_s` if set.
``REJECTED``       this notification is malformed: drop it, keep the token, do not retry.
``AUTH_ERROR``     provider credentials or configuration are wrong: alert loudly, keep every token.
=================  ===================================================================================

Three providers implement `PushProvider`: `push.apns.ApnsProvider` drives ``aioapns`` (HTTP/2, token auth);
`push.fcm.FcmProvider` drives ``firebase-admin`` (``messaging.send_each_async``); `push.log.LogProvider` only
logs and is the default when no push service is configured. Providers never raise for provider failures:
`PushProvider.send` returns a `PushResult`. Misconfiguration (unreadable or invalid keys, bad credentials,
missing libraries) raises `PushConfigError` when the provider is built or started, so it is reported once, at
startup.

Device tokens are secrets: logs and reprs carry `token_fingerprint` only.

The push libraries are the optional ``push`` extra; they are imported when a provider that needs them is
built, so `LogProvider` works without them.
"""

from __future__ import annotations

import abc
import asyncio
import enum
import hashlib
import logging
import random
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal, Self

from mqchat.errors import ConfigError

log = logging.getLogger(__name__)

Platform = Literal["apns", "fcm"]
Priority = Literal["high", "normal"]

# Data keys that APNs (payload root) or FCM (data map) reserve for themselves.
_RESERVED_DATA_KEYS = frozenset({"aps", "from", "notification", "message_type", "collapse_key"})
_RESERVED_DATA_PREFIXES = ("google", "gcm")
# Namespace for `derive_notification_id`: fixed forever, so a key maps to the same id across releases.
_NOTIFICATION_NAMESPACE = uuid.UUID("0d9c7c1e-4b0e-5f7a-9a51-6d2f3c8e1b47")


class PushConfigError(ConfigError):
    """The push configuration cannot work (missing or invalid key/credentials file, bad settings)."""


def token_fingerprint(token: str) -> str:
    """A short, stable, non-reversible label for a device token, for logs and metrics."""
    return "tok:" + hashlib.sha256(token.encode()).hexdigest()[:12]


def derive_notification_id(idempotency_key: str) -> str:
    """The notification id (a UUID, used as ``apns-id``) for an idempotency key: retries reuse it."""
    return str(uuid.uuid5(_NOTIFICATION_NAMESPACE, idempotency_key))


# --- messages and results -------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class PushMessage:
    """One notification for one device.

    `title`/`body` are the visible alert (both None: no alert). `content_free` marks an end-to-end
    encrypted conversation: no text from the server is shown; APNs gets ``mutable-content`` with a generic
    alert for the app's extension to replace, FCM a data-only message. Without alert and without
    `content_free` the push is a silent one (APNs background push with ``content-available``; FCM data-only).
    `collapse_id` is per conversation. `notification_id` is a UUID derived from the caller's idempotency
    key (see `derive_notification_id`) so that every retry carries the same id.
    """

    platform: Platform
    token: str = field(repr=False)
    notification_id: str
    collapse_id: str
    title: str | None = None
    body: str | None = None
    badge: int | None = None
    priority: Priority = "high"
    content_free: bool = False
    data: Mapping[str, str] = field(default_factory=dict)
    topic: str | None = None
    sandbox: bool = False
    ttl_s: int = 24 * 3600

    def __post_init__(self) -> None:
        if self.platform not in ("apns", "fcm"):
            raise ValueError(f"unknown push platform {self.platform!r}")
        if not self.token:
            raise ValueError("empty device token")
        try:
            canonical = str(uuid.UUID(self.notification_id))
        except (ValueError, TypeError, AttributeError) as exc:
            raise ValueError(f"notification_id must be a UUID, got {self.notification_id!r}") from exc
        object.__setattr__(self, "notification_id", canonical)
        if not self.collapse_id:
            raise ValueError("empty collapse_id")
        if self.priority not in ("high", "normal"):
            raise ValueError(f"priority must be 'high' or 'normal', got {self.priority!r}")
        if self.badge is not None and self.badge < 0:
            raise ValueError("badge must not be negative")
        if self.ttl_s < 0:
            raise ValueError("ttl_s must not be negative")
        for key, value in self.data.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise ValueError("data keys and values must be strings")
            if key in _RESERVED_DATA_KEYS or key.startswith(_RESERVED_DATA_PREFIXES):
                raise ValueError(f"data key {key!r} is reserved by APNs/FCM")
        object.__setattr__(self, "data", dict(self.data))

    @property
    def has_alert(self) -> bool:
        """Whether the device shows something (own text, or the generic text for content-free pushes)."""
        return self.content_free or self.title is not None or self.body is not None

    @property
    def token_fingerprint(self) -> str:
        return token_fingerprint(self.token)


class Outcome(enum.StrEnum):
    DELIVERED = "delivered"
    INVALID_TOKEN = "invalid_token"
    RETRY = "retry"
    REJECTED = "rejected"
    AUTH_ERROR = "auth_error"


@dataclass(frozen=True, slots=True)
class PushResult:
    """The normalised answer. `status` is the HTTP status as text (``"200"``, ``"410"``), or ``"timeout"``,
    ``"connection"``, ``"credentials"``, ``"invalid"``, ``"error"`` when there was no HTTP answer; `reason` is
    the provider's reason/error code (``"Unregistered"``, ``"UNREGISTERED"``) or a short description.
    `LogProvider` answers ``"logged"``."""

    outcome: Outcome
    status: str
    reason: str = ""
    retry_after_s: float | None = None
    token_invalid_since: float | None = None  # APNs 410: Unix time since when the token is invalid
    message_id: str | None = None  # APNs: apns-id; FCM: the message name

    @property
    def delete_token(self) -> bool:
        return self.outcome is Outcome.INVALID_TOKEN


def _retry(status: str, reason: str, retry_after_s: float | None = None) -> PushResult:
    return PushResult(Outcome.RETRY, status, reason, retry_after_s)


# --- the interface ---------------------------------------------------------------------------------


class PushProvider(abc.ABC):
    """Sends the push messages of one platform. `send` never raises for provider failures."""

    platform: str

    async def start(self) -> None:
        """Check what can be checked before the first send; raise `PushConfigError` if it cannot work."""
        return None

    @abc.abstractmethod
    async def send(self, msg: PushMessage) -> PushResult: ...

    async def send_many(self, msgs: Sequence[PushMessage]) -> list[PushResult]:
        """Send several messages concurrently; results in the same order."""
        return list(await asyncio.gather(*(self.send(m) for m in msgs)))

    async def aclose(self) -> None:
        """Release connections. Idempotent."""
        return None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def _check_platform(self, msg: PushMessage) -> None:
        if msg.platform != self.platform:
            raise ValueError(f"{type(self).__name__} sends {self.platform} messages, got a {msg.platform} one")


async def send_with_retries(
    provider: PushProvider,
    msg: PushMessage,
    *,
    attempts: int = 4,
    base_delay_s: float = 0.5,
    max_delay_s: float = 30.0,
    timeout_s: float = 10.0,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> PushResult:
    """Send `msg`, retrying RETRY outcomes up to `attempts` sends in all; return the last result.

    Backoff is exponential with full jitter (``uniform(0, min(max_delay_s, base_delay_s * 2**n))``); a
    provider's ``retry_after_s`` is honoured as a lower bound, capped at `max_delay_s`. Each attempt runs
    under `timeout_s`; the same message (so the same notification id) is sent every time.
    """
    if attempts < 1:
        raise ValueError("attempts must be at least 1")
    attempt = 0
    while True:
        try:
            async with asyncio.timeout(timeout_s):
                result = await provider.send(msg)
        except TimeoutError:
            result = _retry("timeout", f"no answer within {timeout_s:g} s")
        attempt += 1
        if result.outcome is not Outcome.RETRY or attempt >= attempts:
            return result
        delay = random.uniform(0.0, min(max_delay_s, base_delay_s * 2 ** (attempt - 1)))
        if result.retry_after_s is not None:
            delay = max(delay, min(max_delay_s, result.retry_after_s))
        log.debug(
            "push %s to %s: %s %s, attempt %d/%d, next in %.2f s",
            msg.notification_id,
            msg.token_fingerprint,
            result.status,
            result.reason,
            attempt,
            attempts,
            delay,
        )
        await sleep(delay)
