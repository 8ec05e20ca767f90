"""FCM: `FcmProvider` sends through firebase-admin's FCM HTTP v1 client (``messaging.send_each_async``).

`fcm_message` builds what is sent; `fcm_result` normalises a firebase-admin error to a `PushResult`.
``firebase-admin`` (the ``push`` extra) is imported when a provider is built, not with this module.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import json
import logging
import time
import urllib.parse
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from push.base import Outcome, PushConfigError, PushMessage, PushProvider, PushResult, _retry

if TYPE_CHECKING:
    import google.auth.credentials

log = logging.getLogger(__name__)

FcmTarget = Literal["token", "fid"]

FCM_ENDPOINT = "https://fcm.googleapis.com"
FCM_BATCH_LIMIT = 500
FCM_MAX_TTL_S = 28 * 24 * 3600


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
