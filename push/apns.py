"""APNs: `ApnsProvider` sends over HTTP/2 with token (.p8 key) authentication, through ``aioapns``.

`apns_payload` and `apns_request` build what is sent; `apns_result` normalises Apple's answer to a
`PushResult`. ``aioapns`` (the ``push`` extra) is imported when a provider is built, not with this module.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import ssl
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from push.base import Outcome, PushConfigError, PushMessage, PushProvider, PushResult, _retry

if TYPE_CHECKING:
    from aioapns import APNs, NotificationRequest
    from aioapns.common import NotificationResult

log = logging.getLogger(__name__)

APNS_PRODUCTION_HOST = "api.push.apple.com"
APNS_SANDBOX_HOST = "api.sandbox.push.apple.com"
APNS_PORT = 443
DEFAULT_CONTENT_FREE_ALERT = "New message"
APNS_COLLAPSE_ID_MAX_BYTES = 64
_APPLE_ID = re.compile(r"[A-Za-z0-9]{10}")


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
