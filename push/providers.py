"""Push providers: APNs and FCM behind one small interface, with normalised outcomes.

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

`ApnsProvider` drives ``aioapns`` (HTTP/2, token auth); `FcmProvider` drives ``firebase-admin``
(``messaging.send_each_async``); `LogProvider` only logs and is the default when no push service is
configured. Providers never raise for provider failures: `PushProvider.send` returns a `PushResult`.
Misconfiguration (unreadable or invalid keys, bad credentials, missing libraries) raises `PushConfigError`
when the provider is built or started, so it is reported once, at startup.

Device tokens are secrets: logs and reprs carry `token_fingerprint` only.

The push libraries are the optional ``push`` extra; they are imported when a provider that needs them is
built, so `LogProvider` works without them.
"""

from __future__ import annotations

import abc
import asyncio
import email.utils
import enum
import functools
import hashlib
import json
import logging
import random
import re
import ssl
import time
import urllib.parse
import uuid
import warnings
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self

from mqchat.errors import ConfigError

if TYPE_CHECKING:
    import google.auth.credentials
    from aioapns import APNs, NotificationRequest
    from aioapns.common import NotificationResult

log = logging.getLogger(__name__)

Platform = Literal["apns", "fcm"]
Priority = Literal["high", "normal"]
FcmTarget = Literal["token", "fid"]

APNS_PRODUCTION_HOST = "api.push.apple.com"
APNS_SANDBOX_HOST = "api.sandbox.push.apple.com"
APNS_PORT = 443
FCM_ENDPOINT = "https://fcm.googleapis.com"
DEFAULT_CONTENT_FREE_ALERT = "New message"
FCM_BATCH_LIMIT = 500
FCM_MAX_TTL_S = 28 * 24 * 3600
APNS_COLLAPSE_ID_MAX_BYTES = 64

# Data keys that APNs (payload root) or FCM (data map) reserve for themselves.
_RESERVED_DATA_KEYS = frozenset({"aps", "from", "notification", "message_type", "collapse_key"})
_RESERVED_DATA_PREFIXES = ("google", "gcm")
# Namespace for `derive_notification_id`: fixed forever, so a key maps to the same id across releases.
_NOTIFICATION_NAMESPACE = uuid.UUID("0d9c7c1e-4b0e-5f7a-9a51-6d2f3c8e1b47")
_APPLE_ID = re.compile(r"[A-Za-z0-9]{10}")


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


# --- log only --------------------------------------------------------------------------------------


class LogProvider(PushProvider):
    """Logs what it would send (never the token, never the text) and reports it delivered."""

    def __init__(self, platform: str, *, level: int = logging.INFO) -> None:
        if platform not in ("apns", "fcm"):
            raise PushConfigError(f"unknown push platform {platform!r}")
        self.platform = platform
        self._level = level

    async def send(self, msg: PushMessage) -> PushResult:
        self._check_platform(msg)
        kind = "content-free" if msg.content_free else "alert" if msg.has_alert else "silent"
        log.log(
            self._level,
            "push (log only) %s %s id=%s collapse=%s priority=%s kind=%s badge=%s data=%s",
            msg.platform,
            msg.token_fingerprint,
            msg.notification_id,
            msg.collapse_id,
            msg.priority,
            kind,
            msg.badge,
            sorted(msg.data),
        )
        return PushResult(Outcome.DELIVERED, "logged", message_id=msg.notification_id)


# --- APNs ------------------------------------------------------------------------------------------


def _apns_collapse_id(collapse_id: str) -> str:
    if len(collapse_id.encode()) <= APNS_COLLAPSE_ID_MAX_BYTES:
        return collapse_id
    return "h:" + hashlib.sha256(collapse_id.encode()).hexdigest()[: APNS_COLLAPSE_ID_MAX_BYTES - 2]


def apns_payload(msg: PushMessage, *, content_free_alert: str = DEFAULT_CONTENT_FREE_ALERT) -> dict[str, Any]:
    """The JSON payload: ``aps`` plus `PushMessage.data` at the root."""
    aps: dict[str, Any] = {}
    if msg.content_free:
        aps["alert"] = {"body": content_free_alert}
        aps["mutable-content"] = 1
        aps["sound"] = "default"
    elif msg.has_alert:
        aps["alert"] = {k: v for k, v in (("title", msg.title), ("body", msg.body)) if v is not None}
        aps["sound"] = "default"
    else:
        aps["content-available"] = 1
    if msg.badge is not None:
        aps["badge"] = msg.badge
    aps["thread-id"] = msg.collapse_id
    return {**msg.data, "aps": aps}


def apns_request(
    msg: PushMessage, *, topic: str | None = None, content_free_alert: str = DEFAULT_CONTENT_FREE_ALERT
) -> NotificationRequest:
    """The aioapns request for `msg` (headers: apns-id, -topic, -priority, -collapse-id, -push-type, -expiration)."""
    from aioapns import PRIORITY_HIGH, PRIORITY_NORMAL, NotificationRequest, PushType

    high = msg.has_alert and msg.priority == "high"  # background pushes must use priority 5
    return NotificationRequest(
        device_token=msg.token,
        message=apns_payload(msg, content_free_alert=content_free_alert),
        notification_id=msg.notification_id,
        time_to_live=msg.ttl_s,
        priority=int(PRIORITY_HIGH if high else PRIORITY_NORMAL),
        collapse_key=_apns_collapse_id(msg.collapse_id),
        push_type=PushType.ALERT if msg.has_alert else PushType.BACKGROUND,
        apns_topic=msg.topic or topic,
    )


_APNS_TOKEN_REASONS = frozenset({"BadDeviceToken", "DeviceTokenNotForTopic"})
_APNS_CONFIG_REASONS = frozenset({"BadTopic", "MissingTopic", "TopicDisallowed", "BadCertificate"})


def apns_result(
    status: str, reason: str | None, timestamp_ms: int | None = None, apns_id: str | None = None
) -> PushResult:
    """Normalise an APNs answer (status and ``reason`` from the response body)."""
    reason = reason or ""
    if status == "200":
        return PushResult(Outcome.DELIVERED, status, reason, message_id=apns_id)
    if status == "410":
        since = timestamp_ms / 1000 if timestamp_ms is not None else None
        return PushResult(Outcome.INVALID_TOKEN, status, reason, token_invalid_since=since, message_id=apns_id)
    if status == "400" and reason in _APNS_TOKEN_REASONS:
        return PushResult(Outcome.INVALID_TOKEN, status, reason, message_id=apns_id)
    if status == "403" or (status == "400" and reason in _APNS_CONFIG_REASONS):
        return PushResult(Outcome.AUTH_ERROR, status, reason, message_id=apns_id)
    if status == "429" or status.startswith("5"):
        return PushResult(Outcome.RETRY, status, reason, message_id=apns_id)
    if status.startswith("4"):
        return PushResult(Outcome.REJECTED, status, reason, message_id=apns_id)
    return PushResult(Outcome.RETRY, status or "error", reason, message_id=apns_id)


async def _quiet(request: NotificationRequest, result: NotificationResult) -> None:
    """aioapns logs every failure at ERROR unless given a handler; outcomes are reported by the caller."""


class ApnsProvider(PushProvider):
    """APNs over HTTP/2 with token (.p8 key) authentication, through ``aioapns``.

    Give the key as PEM text (`key_pem`) or a path (`key_file`). `use_sandbox` None routes each message by
    `PushMessage.sandbox`; True/False sends everything to that environment. `host`/`sandbox_host`, `port` and
    `ca_file` default to Apple's endpoints and the system trust store; tests point them at a local server
    (`sandbox_host` defaults to `host` when only `host` is given). Clients are built lazily, inside the
    running event loop, one per environment.
    """

    platform = "apns"

    def __init__(
        self,
        *,
        key_id: str,
        team_id: str,
        topic: str,
        key_pem: str | None = None,
        key_file: str | Path | None = None,
        use_sandbox: bool | None = None,
        host: str | None = None,
        sandbox_host: str | None = None,
        port: int = APNS_PORT,
        ca_file: str | Path | None = None,
        timeout_s: float = 10.0,
        max_connections: int = 4,
        max_connection_attempts: int = 2,
        content_free_alert: str = DEFAULT_CONTENT_FREE_ALERT,
    ) -> None:
        try:
            import aioapns  # noqa: F401
        except ImportError as exc:
            raise PushConfigError("APNs support needs the 'push' extra (aioapns)") from exc
        self._key_pem = _load_apns_key(key_pem, key_file)
        if not _APPLE_ID.fullmatch(key_id or ""):
            raise PushConfigError(f"APNs key id must be the 10-character key identifier, got {key_id!r}")
        if not _APPLE_ID.fullmatch(team_id or ""):
            raise PushConfigError(f"APNs team id must be the 10-character team identifier, got {team_id!r}")
        if not topic:
            raise PushConfigError("APNs topic (the app's bundle id) is required")
        if not 0 < port < 65536:
            raise PushConfigError(f"bad APNs port {port}")
        _check_apns_signing(self._key_pem, key_id, team_id)
        try:
            self._ssl_context = ssl.create_default_context(cafile=str(ca_file) if ca_file is not None else None)
        except (OSError, ssl.SSLError) as exc:
            raise PushConfigError(f"cannot load APNs CA file {ca_file}: {exc}") from exc
        self.key_id = key_id
        self.team_id = team_id
        self.topic = topic
        self.use_sandbox = use_sandbox
        self.hosts = {False: host or APNS_PRODUCTION_HOST, True: sandbox_host or host or APNS_SANDBOX_HOST}
        self.port = port
        self.timeout_s = timeout_s
        self.content_free_alert = content_free_alert
        self._max_connections = max_connections
        self._max_connection_attempts = max_connection_attempts
        self._clients: dict[bool, APNs] = {}
        self._closed = False

    def _client(self, sandbox: bool) -> APNs:
        client = self._clients.get(sandbox)
        if client is None:
            from aioapns import APNs
            from aioapns.connection import APNsDevelopmentClientProtocol, APNsProductionClientProtocol

            client = APNs(
                key=self._key_pem,
                key_id=self.key_id,
                team_id=self.team_id,
                topic=self.topic,
                use_sandbox=sandbox,
                ssl_context=self._ssl_context,
                max_connections=self._max_connections,
                max_connection_attempts=self._max_connection_attempts,
                err_func=_quiet,
            )
            # aioapns takes host and port from class attributes of its protocol: give this client's pool a
            # subclass carrying ours (the host is also the TLS server name and the `host` header).
            base = APNsDevelopmentClientProtocol if sandbox else APNsProductionClientProtocol
            client.pool.protocol_class = type(
                f"{base.__name__}For{'Sandbox' if sandbox else 'Production'}",
                (base,),
                {"APNS_SERVER": self.hosts[sandbox], "APNS_PORT": self.port},
            )
            self._clients[sandbox] = client
        return client

    async def send(self, msg: PushMessage) -> PushResult:
        self._check_platform(msg)
        if self._closed:
            raise RuntimeError("ApnsProvider is closed")
        request = apns_request(msg, topic=self.topic, content_free_alert=self.content_free_alert)
        client = self._client(msg.sandbox if self.use_sandbox is None else self.use_sandbox)
        answered = False
        try:
            async with asyncio.timeout(self.timeout_s):
                response = await client.send_notification(request)
            answered = True
        except TimeoutError:
            return _retry("timeout", f"no answer within {self.timeout_s:g} s")
        except Exception as exc:
            # aioapns raises MaxAttemptsExceeded after its connection attempts; h2/ssl/OS errors surface too.
            log.debug("APNs send %s to %s failed: %r", msg.notification_id, msg.token_fingerprint, exc)
            return _retry("connection", type(exc).__name__)
        finally:
            if not answered:
                _forget_request(client, request.notification_id)
        return apns_result(response.status, response.description, response.timestamp, response.notification_id)

    async def aclose(self) -> None:
        self._closed = True
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.pool.close()
        # Wait for the transports to be gone (aioapns drops a connection from its pool when it is lost).
        for _ in range(200):
            if not any(client.pool.connections for client in clients):
                break
            await asyncio.sleep(0.01)
        for client in clients:
            for connection in list(client.pool.connections):
                if connection.transport is not None:
                    connection.transport.abort()
        if any(client.pool.connections for client in clients):
            await asyncio.sleep(0)


def _forget_request(client: APNs, notification_id: str) -> None:
    """Drop the abandoned (cancelled) response future of a request we stopped waiting for, so that a late
    answer or the connection's end does not try to complete it."""
    for connection in client.pool.connections:
        future = connection.requests.get(notification_id)
        if future is not None and future.done():
            del connection.requests[notification_id]
            connection.request_statuses.pop(notification_id, None)


def _load_apns_key(key_pem: str | None, key_file: str | Path | None) -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if (key_pem is None) == (key_file is None):
        raise PushConfigError("give the APNs auth key as exactly one of key_pem or key_file")
    if key_file is not None:
        try:
            key_pem = Path(key_file).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise PushConfigError(f"cannot read APNs key file {key_file}: {exc}") from exc
    assert key_pem is not None
    source = f"APNs key file {key_file}" if key_file is not None else "APNs key"
    try:
        key = serialization.load_pem_private_key(key_pem.strip().encode(), password=None)
    except (ValueError, TypeError) as exc:
        raise PushConfigError(f"{source} is not a PEM private key (expected the .p8 file's text)") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise PushConfigError(f"{source} is not an EC P-256 key")
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return pem.decode()


def _check_apns_signing(key_pem: str, key_id: str, team_id: str) -> None:
    import jwt

    try:
        jwt.encode({"iss": team_id, "iat": int(time.time())}, key_pem, algorithm="ES256", headers={"kid": key_id})
    except Exception as exc:
        raise PushConfigError(f"cannot sign an APNs provider token with this key: {exc}") from exc


# --- FCM -------------------------------------------------------------------------------------------


def fcm_message(msg: PushMessage, *, target: FcmTarget = "token") -> Any:
    """The firebase-admin ``messaging.Message`` for `msg`: notification unless content-free or silent
    (data-only then), Android priority/collapse_key/ttl, the notification tagged with the collapse id so a
    newer one replaces it in the tray, the badge as Android notification count."""
    from firebase_admin import messaging  # type: ignore[import-untyped]

    notification = None
    android_notification = None
    if msg.has_alert and not msg.content_free:
        notification = messaging.Notification(title=msg.title, body=msg.body)
        android_notification = messaging.AndroidNotification(tag=msg.collapse_id, notification_count=msg.badge)
    android = messaging.AndroidConfig(
        collapse_key=msg.collapse_id,
        priority=msg.priority,
        ttl=min(msg.ttl_s, FCM_MAX_TTL_S),
        notification=android_notification,
    )
    fields: dict[str, Any] = {"data": dict(msg.data), "notification": notification, "android": android}
    if target == "fid":
        return messaging.Message(fid=msg.token, **fields)
    with warnings.catch_warnings():
        # firebase-admin 7 prefers installation ids (fid) and deprecates `token`; registration tokens are
        # what devices register today and FCM still accepts them.
        warnings.filterwarnings("ignore", message=r"Message\.token is deprecated", category=DeprecationWarning)
        return messaging.Message(token=msg.token, **fields)


def _error_json(response: Any) -> dict[str, Any]:
    if response is None:
        return {}
    try:
        body = json.loads(response.content.decode())
    except (ValueError, AttributeError, UnicodeDecodeError):
        return {}
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, dict) else {}


def _names_the_target(error: dict[str, Any]) -> bool:
    """Whether an INVALID_ARGUMENT is about the registration token rather than the payload: Google's
    ``BadRequest`` detail names the ``message.token`` field, or the message says so."""
    for detail in error.get("details") or []:
        if isinstance(detail, dict) and str(detail.get("@type", "")).endswith("google.rpc.BadRequest"):
            for violation in detail.get("fieldViolations") or []:
                if isinstance(violation, dict) and violation.get("field") in ("message.token", "message.fid"):
                    return True
    return "registration token" in str(error.get("message", "")).lower()


def _retry_after_s(response: Any) -> float | None:
    value = response.headers.get("retry-after") if response is not None else None
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def fcm_result(exc: BaseException) -> PushResult:
    """Normalise a firebase-admin error (one message's, or the whole call's)."""
    from firebase_admin import exceptions, messaging
    from google.auth.exceptions import RefreshError

    response = getattr(exc, "http_response", None)
    code = str(getattr(exc, "code", "") or "UNKNOWN")
    if response is None:
        cause = getattr(exc, "cause", None) or exc.__cause__
        if isinstance(cause, RefreshError) or isinstance(exc, RefreshError):
            return PushResult(Outcome.AUTH_ERROR, "credentials", f"cannot get an access token: {cause or exc}")
        if isinstance(exc, exceptions.DeadlineExceededError):
            return _retry("timeout", code)
        if isinstance(exc, exceptions.UnavailableError):
            return _retry("connection", code)
        return _retry("error", f"{code}: {type(cause or exc).__name__}")

    status = int(getattr(response, "status_code", 0) or 0)
    error = _error_json(response)
    fcm_code = next(
        (
            str(d.get("errorCode"))
            for d in error.get("details") or []
            if isinstance(d, dict) and str(d.get("@type", "")).endswith("google.firebase.fcm.v1.FcmError")
        ),
        None,
    )
    reason = fcm_code or code
    text = str(status)
    if isinstance(exc, messaging.UnregisteredError):
        return PushResult(Outcome.INVALID_TOKEN, text, reason)
    if isinstance(exc, messaging.SenderIdMismatchError | messaging.ThirdPartyAuthError):
        return PushResult(Outcome.AUTH_ERROR, text, reason)
    if code == exceptions.INVALID_ARGUMENT:
        outcome = Outcome.INVALID_TOKEN if _names_the_target(error) else Outcome.REJECTED
        return PushResult(outcome, text, reason)
    if code in (exceptions.UNAUTHENTICATED, exceptions.PERMISSION_DENIED, exceptions.NOT_FOUND):
        return PushResult(Outcome.AUTH_ERROR, text, reason)
    if status == 429 or status >= 500 or code in (exceptions.RESOURCE_EXHAUSTED, exceptions.UNAVAILABLE):
        return _retry(text, reason, _retry_after_s(response))
    if 400 <= status < 500:
        return PushResult(Outcome.REJECTED, text, reason)
    return _retry(text, reason, _retry_after_s(response))


@functools.cache
def _messaging_service_class() -> type[Any]:
    """firebase-admin's messaging service with: our send URL (the library formats its own once per app),
    no library-level retries (`send_with_retries` owns the retry policy; the library would retry 500/503
    four times with backoff), and a synchronous `close` that leaves the async client to `aclose` (the
    library's `close` calls ``asyncio.run``, which cannot run inside the service's event loop)."""
    from firebase_admin import _http_client, messaging
    from firebase_admin._retry import HttpxRetry  # type: ignore[import-untyped]

    class MessagingService(messaging._MessagingService):  # type: ignore[misc]
        def __init__(self, app: Any, send_url: str, timeout_s: float) -> None:
            super().__init__(app)
            self._fcm_url = send_url
            self._unused_async_client: Any = self._async_client
            self._async_client: Any = _http_client.HttpxAsyncClient(
                credential=self._credential, timeout=timeout_s, retry_config=HttpxRetry(max_retries=0)
            )

        def close(self) -> None:
            self._client.close()

        async def aclose(self) -> None:
            await self._async_client.aclose()
            await self._unused_async_client.aclose()

    return MessagingService


class FcmProvider(PushProvider):
    """FCM HTTP v1 through firebase-admin's ``messaging.send_each_async``, one Firebase app per provider.

    Credentials: a service-account JSON file (`service_account_file`) or a ``google.auth`` credentials
    object (`credentials`). `project_id` defaults to the service account's. `endpoint` is the API's base URL
    (Google's by default). `target` chooses the message field the device token goes to (``token``:
    registration tokens; ``fid``: Firebase installation ids). `timeout_s` bounds each ``send_each_async``
    call (a whole batch). Access tokens are fetched in a worker thread
    before they expire, so the event loop never waits on the token endpoint.
    """

    platform = "fcm"

    def __init__(
        self,
        *,
        project_id: str | None = None,
        service_account_file: str | Path | None = None,
        credentials: google.auth.credentials.Credentials | None = None,
        endpoint: str = FCM_ENDPOINT,
        timeout_s: float = 10.0,
        target: FcmTarget = "token",
        batch_size: int = FCM_BATCH_LIMIT,
    ) -> None:
        try:
            import firebase_admin
            from firebase_admin import _utils, messaging
            from firebase_admin import credentials as fb_credentials
        except ImportError as exc:
            raise PushConfigError("FCM support needs the 'push' extra (firebase-admin)") from exc

        if (service_account_file is None) == (credentials is None):
            raise PushConfigError("give FCM credentials as exactly one of service_account_file or credentials")
        cred: Any
        if service_account_file is not None:
            try:
                cred = fb_credentials.Certificate(str(service_account_file))
            except (OSError, ValueError) as exc:
                raise PushConfigError(f"FCM service-account file {service_account_file}: {exc}") from exc
            project_id = project_id or cred.project_id
        else:
            cred = credentials
        if not project_id:
            raise PushConfigError("FCM project id is required (not given, and not in the credentials)")
        parts = urllib.parse.urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise PushConfigError(f"bad FCM endpoint {endpoint!r}")
        if target not in ("token", "fid"):
            raise PushConfigError(f"FCM target must be 'token' or 'fid', got {target!r}")
        if not 0 < batch_size <= FCM_BATCH_LIMIT:
            raise PushConfigError(f"FCM batch size must be 1..{FCM_BATCH_LIMIT}, got {batch_size}")

        self.project_id = project_id
        self.endpoint = endpoint.rstrip("/")
        self.send_url = f"{self.endpoint}/v1/projects/{urllib.parse.quote(project_id, safe='')}/messages:send"
        self.timeout_s = timeout_s
        self.target: FcmTarget = target
        self.batch_size = batch_size
        name = f"mqchat-push-{uuid.uuid4().hex[:12]}"
        try:
            self._app = firebase_admin.initialize_app(cred, {"projectId": project_id}, name=name)
        except ValueError as exc:
            raise PushConfigError(f"cannot set up FCM: {exc}") from exc
        try:
            service_class = _messaging_service_class()
            self._service = _utils.get_app_service(
                self._app,
                messaging._MESSAGING_ATTRIBUTE,
                lambda app: service_class(app, self.send_url, timeout_s),
            )
            if messaging._get_messaging_service(self._app) is not self._service:
                raise AttributeError("messaging service not registered")
        except (AttributeError, ImportError, TypeError, ValueError) as exc:
            firebase_admin.delete_app(self._app)
            raise PushConfigError(f"unsupported firebase-admin version for FCM: {exc}") from exc
        self._credential: google.auth.credentials.Credentials = self._app.credential.get_credential()
        self._refresh_lock = asyncio.Lock()
        self._session: Any = None
        self._closed = False

    async def start(self) -> None:
        """Fetch an access token now: bad credentials fail here, with `PushConfigError`."""
        failure = await self._ensure_access_token()
        if failure is not None and failure.outcome is Outcome.AUTH_ERROR:
            raise PushConfigError(f"FCM credentials rejected: {failure.reason}")
        if failure is not None:
            log.warning("FCM access token not fetched at start (%s); will retry on send", failure.reason)

    async def _ensure_access_token(self) -> PushResult | None:
        """Refresh the access token in a worker thread when it is missing or about to expire (the library
        would otherwise refresh it synchronously inside the event loop)."""
        from google.auth.credentials import TokenState

        if self._credential.token_state is TokenState.FRESH:
            return None
        async with self._refresh_lock:
            if self._credential.token_state is TokenState.FRESH:
                return None
            from google.auth.exceptions import RefreshError, TransportError
            from google.auth.transport.requests import Request

            if self._session is None:
                import requests

                self._session = requests.Session()
            try:
                await asyncio.to_thread(self._credential.refresh, Request(session=self._session))
            except RefreshError as exc:
                return PushResult(Outcome.AUTH_ERROR, "credentials", f"access token refused: {exc}")
            except (TransportError, OSError) as exc:
                return _retry("connection", f"token endpoint unreachable: {type(exc).__name__}")
        return None

    async def send(self, msg: PushMessage) -> PushResult:
        return (await self.send_many([msg]))[0]

    async def send_many(self, msgs: Sequence[PushMessage]) -> list[PushResult]:
        """Send any number of messages, `batch_size` (at most 500) per ``send_each_async`` call, which sends
        them concurrently (one HTTP request each; over HTTP/2 they share a connection). Results are in order."""
        if self._closed:
            raise RuntimeError("FcmProvider is closed")
        results: list[PushResult | None] = [None] * len(msgs)
        pending: list[tuple[int, Any]] = []
        for i, msg in enumerate(msgs):
            self._check_platform(msg)
            try:
                message = fcm_message(msg, target=self.target)
                str(message)  # encodes and validates, as the library will
            except ValueError as exc:
                results[i] = PushResult(Outcome.REJECTED, "invalid", str(exc))
                continue
            pending.append((i, message))
        for start in range(0, len(pending), self.batch_size):
            chunk = pending[start : start + self.batch_size]
            for (i, _), result in zip(chunk, await self._send_chunk([m for _, m in chunk]), strict=True):
                results[i] = result
        assert all(r is not None for r in results)
        return [r for r in results if r is not None]

    async def _send_chunk(self, messages: list[Any]) -> list[PushResult]:
        from firebase_admin import exceptions, messaging

        failure = await self._ensure_access_token()
        if failure is not None:
            return [failure] * len(messages)
        try:
            async with asyncio.timeout(self.timeout_s):
                batch = await messaging.send_each_async(messages, dry_run=False, app=self._app)
        except TimeoutError:
            return [_retry("timeout", f"no answer within {self.timeout_s:g} s")] * len(messages)
        except exceptions.FirebaseError as exc:
            return [fcm_result(exc)] * len(messages)
        except ValueError as exc:
            return [PushResult(Outcome.REJECTED, "invalid", str(exc))] * len(messages)
        return [
            PushResult(Outcome.DELIVERED, "200", message_id=r.message_id) if r.success else fcm_result(r.exception)
            for r in batch.responses
        ]

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        import firebase_admin

        try:
            await self._service.aclose()
        finally:
            firebase_admin.delete_app(self._app)
            if self._session is not None:
                self._session.close()
