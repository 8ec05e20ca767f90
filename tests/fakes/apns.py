"""A local APNs provider API for tests: HTTP/2 over TLS on 127.0.0.1, spoken with the `h2` library directly.

It behaves as the parts of Apple's service that a provider client depends on:

* every response echoes the request's ``apns-id``;
* 200 is a HEADERS frame with END_STREAM and no DATA frame;
* an error is HEADERS followed by exactly one DATA frame holding ``{"reason": ...}`` (plus ``"timestamp"``
  in milliseconds for 410);
* the ``authorization: bearer <JWT>`` header must carry an ES256 token signed by this server's key, with
  ``kid`` = key id and ``iss`` = team id, not older than an hour; otherwise 403 (``MissingProviderToken``,
  ``InvalidProviderToken``, ``ExpiredProviderToken``).

Every request is recorded (headers and JSON payload). Replies are scripted per device token and answered in
turn; once a token's script is used up (or without one) the answer is 200. A reply can be delayed, or never
sent (`ApnsReply(hang=True)`) to exercise client timeouts.

The TLS certificate comes from a throw-away CA (`trustme`) and names 127.0.0.1 and ``localhost``;
`FakeApns.ca_file` is the PEM file a client must trust.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import shutil
import ssl
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import ConnectionTerminated, DataReceived, RequestReceived, StreamEnded, StreamReset
from h2.exceptions import ProtocolError, StreamClosedError
from h2.settings import SettingCodes

DEFAULT_REASONS = {
    400: "BadRequest",
    403: "Forbidden",
    404: "BadPath",
    405: "MethodNotAllowed",
    410: "Unregistered",
    413: "PayloadTooLarge",
    429: "TooManyRequests",
    500: "InternalServerError",
    503: "ServiceUnavailable",
}
MAX_PAYLOAD_BYTES = 4096
TOKEN_MAX_AGE_S = 3600


def new_p256_key_pem() -> str:
    """A fresh EC P-256 private key as PKCS#8 PEM text (the format of an APNs .p8 auth key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return pem.decode()


@dataclass(frozen=True)
class ApnsReply:
    """One scripted answer: an HTTP status with an APNs reason, optionally late or never."""

    status: int = 200
    reason: str | None = None
    timestamp_ms: int | None = None
    delay_s: float = 0.0
    hang: bool = False


ReplySpec = ApnsReply | int | tuple[int, str]


def _as_reply(spec: ReplySpec) -> ApnsReply:
    if isinstance(spec, ApnsReply):
        return spec
    if isinstance(spec, int):
        return ApnsReply(spec)
    status, reason = spec
    return ApnsReply(status, reason)


@dataclass
class ApnsRequest:
    """What the server received on one stream, and what it answered."""

    token: str
    headers: dict[str, str]
    payload: dict[str, Any]
    status: int | None = None
    reason: str | None = None

    @property
    def apns_id(self) -> str | None:
        return self.headers.get("apns-id")

    @property
    def aps(self) -> dict[str, Any]:
        aps = self.payload.get("aps", {})
        assert isinstance(aps, dict)
        return aps


@dataclass
class _Stream:
    headers: dict[str, str]
    body: bytearray = field(default_factory=bytearray)


class _Connection(asyncio.Protocol):
    def __init__(self, server: FakeApns) -> None:
        self.server = server
        self.h2 = H2Connection(H2Configuration(client_side=False, header_encoding="utf-8"))
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, _Stream] = {}
        self.timers: set[asyncio.TimerHandle] = set()
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.server.connections.add(self)
        self.h2.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: self.server.max_concurrent_streams})
        self.h2.initiate_connection()
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in self.timers:
            timer.cancel()
        self.timers.clear()
        self.server.connections.discard(self)
        if not self.lost.done():
            self.lost.set_result(None)

    def flush(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(self.h2.data_to_send())

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except ProtocolError:
            self.flush()
            self.close()
            return
        for event in events:
            if isinstance(event, RequestReceived):
                headers = {str(k): str(v) for k, v in event.headers or []}
                self.streams[event.stream_id] = _Stream(headers)
            elif isinstance(event, DataReceived):
                stream = self.streams.get(event.stream_id)
                if stream is not None and event.data:
                    stream.body += event.data
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, StreamEnded):
                stream = self.streams.pop(event.stream_id, None)
                if stream is not None:
                    self.handle(event.stream_id, stream)
            elif isinstance(event, StreamReset):
                self.streams.pop(event.stream_id, None)
            elif isinstance(event, ConnectionTerminated):
                self.flush()
                self.close()
                return
        self.flush()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def handle(self, stream_id: int, stream: _Stream) -> None:
        path = stream.headers.get(":path", "")
        token = path.removeprefix("/3/device/") if path.startswith("/3/device/") else ""
        try:
            payload = json.loads(stream.body.decode() or "null")
        except ValueError:
            payload = None
        record = ApnsRequest(token=token, headers=stream.headers, payload=payload if isinstance(payload, dict) else {})
        self.server.requests.append(record)
        reply = self.server.decide(record, stream.headers, stream.body)
        if not reply.hang and reply.status != 200 and reply.reason is None:
            reply = dataclasses.replace(reply, reason=DEFAULT_REASONS.get(reply.status, "BadRequest"))
        record.status = None if reply.hang else reply.status
        record.reason = None if reply.hang or reply.status == 200 else reply.reason
        if reply.hang:
            return
        if reply.delay_s > 0:
            timer: asyncio.TimerHandle

            def later() -> None:
                self.timers.discard(timer)
                self.respond(stream_id, stream.headers, reply)
                self.flush()

            timer = asyncio.get_running_loop().call_later(reply.delay_s, later)
            self.timers.add(timer)
            return
        self.respond(stream_id, stream.headers, reply)

    def respond(self, stream_id: int, headers: dict[str, str], reply: ApnsReply) -> None:
        response = [(":status", str(reply.status)), ("apns-id", headers.get("apns-id", ""))]
        try:
            if reply.status == 200:
                self.h2.send_headers(stream_id, response, end_stream=True)
                return
            body: dict[str, Any] = {"reason": reply.reason}
            if reply.status == 410:
                body["timestamp"] = reply.timestamp_ms if reply.timestamp_ms is not None else int(time.time() * 1000)
            self.h2.send_headers(stream_id, [*response, ("content-type", "application/json")])
            self.h2.send_data(stream_id, json.dumps(body).encode(), end_stream=True)
        except (StreamClosedError, ProtocolError):
            pass  # the client gave up on this stream (or the connection) first


class FakeApns:
    """The fake APNs server; use as ``async with FakeApns() as apns:``."""

    def __init__(
        self,
        *,
        key_id: str = "KEYID12345",
        team_id: str = "TEAMID1234",
        topics: set[str] | None = None,
        max_concurrent_streams: int = 100,
    ) -> None:
        self.key_id = key_id
        self.team_id = team_id
        self.key_pem = new_p256_key_pem()
        self.topics = topics
        self.max_concurrent_streams = max_concurrent_streams
        self.requests: list[ApnsRequest] = []
        self.connections: set[_Connection] = set()
        self.host = "127.0.0.1"
        self.port = 0
        self._public_key = serialization.load_pem_private_key(self.key_pem.encode(), password=None).public_key()
        self._scripts: dict[str, deque[ApnsReply]] = {}
        self._server: asyncio.Server | None = None
        self._tmpdir: Path | None = None
        self.ca_file = Path()
        self.connections_made = 0

    def script(self, token: str, *replies: ReplySpec) -> None:
        """Answer the next requests for `token` with `replies`, in turn (then 200 again)."""
        self._scripts.setdefault(token, deque()).extend(_as_reply(r) for r in replies)

    def requests_for(self, token: str) -> list[ApnsRequest]:
        return [r for r in self.requests if r.token == token]

    def decide(self, record: ApnsRequest, headers: dict[str, str], body: bytes) -> ApnsReply:
        if headers.get(":method") != "POST":
            return ApnsReply(405, "MethodNotAllowed")
        if not record.token:
            return ApnsReply(404, "BadPath")
        denied = self._check_auth(headers.get("authorization"))
        if denied is not None:
            return ApnsReply(403, denied)
        if "apns-topic" not in headers:
            return ApnsReply(400, "MissingTopic")
        if self.topics is not None and headers["apns-topic"] not in self.topics:
            return ApnsReply(400, "TopicDisallowed")
        if not body:
            return ApnsReply(400, "PayloadEmpty")
        if len(body) > MAX_PAYLOAD_BYTES:
            return ApnsReply(413, "PayloadTooLarge")
        script = self._scripts.get(record.token)
        if script:
            return script.popleft()
        return ApnsReply(200)

    def _check_auth(self, authorization: str | None) -> str | None:
        if not authorization or not authorization.lower().startswith("bearer "):
            return "MissingProviderToken"
        token = authorization[len("bearer ") :]
        try:
            header = jwt.get_unverified_header(token)
            claims = jwt.decode(
                token,
                self._public_key,
                algorithms=["ES256"],
                options={"require": ["iss", "iat"], "verify_iat": False},
            )
        except jwt.PyJWTError:
            return "InvalidProviderToken"
        if header.get("kid") != self.key_id or claims.get("iss") != self.team_id:
            return "InvalidProviderToken"
        if time.time() - float(claims["iat"]) > TOKEN_MAX_AGE_S:
            return "ExpiredProviderToken"
        return None

    async def __aenter__(self) -> FakeApns:
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(context)
        context.set_alpn_protocols(["h2"])
        self._tmpdir = Path(tempfile.mkdtemp(prefix="fake-apns-"))
        self.ca_file = self._tmpdir / "ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_file))

        def factory() -> _Connection:
            self.connections_made += 1
            return _Connection(self)

        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(factory, self.host, 0, ssl=context)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            connections = list(self.connections)
            for connection in connections:
                connection.close()
            if connections:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(5):
                        await asyncio.gather(*(c.lost for c in connections))
            await self._server.wait_closed()
            self._server = None
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
