"""What the HTTP edge refuses before the API sees a request.

::

    TCP ─▶ uvicorn (HeaderTimeoutProtocol: a request's headers within header_timeout_s, else closed;
    │        limit_concurrency: connections and requests at once, 503 beyond)
    ▼
    Authenticate (/v1/*: bearer token checked, and not revoked by a logout, and the user's rate
    │             budget taken BEFORE the body is read: 401 / 429 with Retry-After)
    ▼
    BodyLimit (POST/PUT: Content-Length over max_body_bytes: 413 before reading; a body without a length is
    │          counted as it arrives and refused at the limit; the whole body within 30 s, else 408;
    │          a body under the limit is handed on whole)
    ▼
    the API (bridge.http routers), which find the caller's identity in ``request.state.identity``
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from bridge.ratelimit import RateLimiter
from mqchat.errors import AuthError, ErrorCode, StorageError
from mqchat.protocol import retry_after_ms
from mqchat.tokens import TokenVerifier
from storage.revocations import Revocations

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Any
Send = Any
App = Any


async def _reply(
    send: Send, code: ErrorCode, message: str, *, status: int | None = None, retry_after_s: float | None = None
) -> None:
    """Answer with an error body; the status is the code's own unless given."""
    status = code.http_status if status is None else status
    body: dict[str, Any] = {"error": str(code), "message": message}
    headers = [(b"content-type", b"application/json")]
    if retry_after_s is not None:
        body["retry_after_ms"] = ms = retry_after_ms(retry_after_s)
        headers.append((b"retry-after", str(math.ceil(ms / 1000)).encode()))  # whole seconds
    payload = json.dumps(body).encode()
    headers.append((b"content-length", str(len(payload)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


class Authenticate:
    """ASGI middleware: every ``/v1/`` request carries a valid bearer token, and its user has
    budget left, or it is answered at once, before its body is read or parsed."""

    def __init__(self, app: App, *, verifier: TokenVerifier, limiter: RateLimiter, revocations: Revocations) -> None:
        self.app = app
        self.verifier = verifier
        self.limiter = limiter
        self.revocations = revocations

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        header = next((v for k, v in scope["headers"] if k == b"authorization"), b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            await _reply(send, ErrorCode.UNAUTHORIZED, "missing bearer token")
            return
        try:
            identity = await self.verifier.verify(token.strip())
            await self.revocations.check(identity)  # a logged-out device's token
        except AuthError as exc:
            await _reply(send, ErrorCode.UNAUTHORIZED, str(exc))
            return
        except StorageError:  # the revocation list cannot be read now: no answer either way
            await _reply(send, ErrorCode.UNAVAILABLE, "the server cannot check tokens right now; retry later")
            return
        wait = self.limiter.take(identity.user)
        if wait:
            await _reply(send, ErrorCode.RATE_LIMITED, "too many HTTP calls; retry later", retry_after_s=wait)
            return
        scope.setdefault("state", {})["identity"] = identity
        await self.app(scope, receive, send)


class BodyLimit:
    """ASGI middleware: a request body is at most ``max_bytes``; a larger one gets 413 without
    being read (by its Content-Length) or as soon as it passes the limit (chunked). A body under
    the limit is read here, then handed to the app in one piece."""

    def __init__(
        self, app: App, *, max_bytes: int, timeout_s: float = 30.0, streamed: tuple[str, str] | None = None
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.streamed = streamed  # (method, path prefix) of requests whose route streams the body itself

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)  # no body to read (or none the API takes)
            return
        if (
            self.streamed is not None
            and scope["method"] == self.streamed[0]
            and scope["path"].startswith(self.streamed[1])
        ):
            await self.app(scope, receive, send)
            return
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await _reply(send, ErrorCode.TOO_LARGE, f"the request body is over {self.max_bytes} bytes")
            return
        chunks: list[bytes] = []
        seen = 0
        try:
            async with asyncio.timeout(self.timeout_s):  # a body that trickles is cut off
                while True:
                    message: Message = await receive()
                    if message["type"] != "http.request":  # the client went away
                        return
                    chunk = message.get("body", b"")
                    seen += len(chunk)
                    if seen > self.max_bytes:
                        await _reply(send, ErrorCode.TOO_LARGE, f"the request body is over {self.max_bytes} bytes")
                        return
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            late = f"the request body did not arrive within {self.timeout_s:g} s"
            await _reply(send, ErrorCode.BAD_REQUEST, late, status=408)
            return
        whole: Message = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return whole
            after: Message = await receive()  # after the body: a disconnect, when it comes
            return after

        await self.app(scope, replay, send)


MAX_HEADER_BYTES = 16 * 1024
"""A request line and headers larger than this get 431 and the connection is closed."""
_TOO_LARGE_HEADERS = (
    json.dumps({"error": str(ErrorCode.TOO_LARGE), "message": f"request headers over {MAX_HEADER_BYTES} bytes"})
).encode()


class _HeaderTimeout:
    """A connection must deliver a request's complete headers within ``header_timeout_s`` of
    being opened or of its previous response, or it is closed; and at most MAX_HEADER_BYTES of
    them, or it gets 431. (uvicorn alone keeps a connection that trickles its headers, or sends
    nothing, for ever, and on httptools takes headers of any size.) Mixed into uvicorn's protocol."""

    header_timeout_s = 10.0
    _header_bytes: int | None = None  # received since the request began; None: its headers are in
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    cycle: Any

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_bytes = 0
        self._header_timer: asyncio.TimerHandle | None = self.loop.call_later(
            self.header_timeout_s, self._headers_too_slow
        )

    def _cancel_header_timer(self) -> None:
        self._header_bytes = None
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        counting = self._header_bytes is not None
        super().data_received(data)  # type: ignore[misc]  # the parser may complete the headers
        if counting and self._header_bytes is not None:  # still incomplete after all of data
            self._header_bytes += len(data)
            if self._header_bytes > MAX_HEADER_BYTES and not self.transport.is_closing():
                self._cancel_header_timer()
                head = (
                    "HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
                    f"content-length: {len(_TOO_LARGE_HEADERS)}\r\nconnection: close\r\n\r\n"
                )
                self.transport.write(head.encode() + _TOO_LARGE_HEADERS)
                self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        # The next request's headers, on a kept-alive connection (unless a pipelined request
        # already started: its headers are in).
        idle = self.cycle is None or self.cycle.response_complete
        if idle and not self.transport.is_closing():
            self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)  # type: ignore[misc]


class HeaderTimeoutProtocol(_HeaderTimeout, HttpToolsProtocol):  # type: ignore[misc]  # connection_made narrows
    """uvicorn's HTTP/1.1 protocol on httptools (llhttp, in C: a request parsed in a fraction of
    h11's time, which a reconnect storm's catch-up calls feel), with the header timeout."""

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._cancel_header_timer()
