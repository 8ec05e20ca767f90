"""A local FCM HTTP v1 API for tests (plain HTTP/1.1 on 127.0.0.1), with an OAuth token endpoint.

``POST /v1/projects/{project}/messages:send`` answers like Google's service:

* success: ``200 {"name": "projects/{project}/messages/{id}"}``;
* failure: Google's error format, ``{"error": {"code", "message", "status", "details": [...]}}``, where
  ``details`` holds ``{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": ...}``
  for FCM's own codes (the firebase-admin SDK maps ``errorCode`` to ``UnregisteredError`` and friends) and,
  for ``INVALID_ARGUMENT``, a ``google.rpc.BadRequest`` naming the offending field.

The ``authorization: Bearer`` token must be one of `FakeFcm.access_tokens` (else 401 ``UNAUTHENTICATED``)
and the project must be `FakeFcm.project_id` (else 404 ``NOT_FOUND``, no FCM code). Every send is recorded.
Replies are scripted per registration token and answered in turn; after the script (or without one), 200.

``POST /token`` is a Google OAuth 2.0 token endpoint for the service account of `service_account_info`:
it checks the RS256 JWT assertion against that account's key and issues a fresh access token.

firebase-admin sends through httpx with HTTP/2 enabled; over ``http://`` httpx speaks HTTP/1.1, which is
all this server implements (keep-alive, ``Content-Length`` bodies).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import urllib.parse
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
BAD_REQUEST_TYPE = "type.googleapis.com/google.rpc.BadRequest"
DEFAULT_ACCESS_TOKEN = "ya29.fake-access-token"

# error name -> (HTTP status, canonical status, message, carries an FcmError detail)
ERRORS: dict[str, tuple[int, str, str, bool]] = {
    "UNREGISTERED": (404, "NOT_FOUND", "Requested entity was not found.", True),
    "INVALID_ARGUMENT": (400, "INVALID_ARGUMENT", "Request contains an invalid argument.", True),
    "SENDER_ID_MISMATCH": (403, "PERMISSION_DENIED", "SenderId mismatch", True),
    "QUOTA_EXCEEDED": (429, "RESOURCE_EXHAUSTED", "Quota exceeded for quota metric 'Send requests'.", True),
    "UNAVAILABLE": (503, "UNAVAILABLE", "The service is currently unavailable.", True),
    "INTERNAL": (500, "INTERNAL", "Internal error encountered.", True),
    "THIRD_PARTY_AUTH_ERROR": (401, "UNAUTHENTICATED", "Auth error from APNS or Web Push Service", True),
    "UNAUTHENTICATED": (
        401,
        "UNAUTHENTICATED",
        "Request had invalid authentication credentials. Expected OAuth 2 access token.",
        False,
    ),
    "PERMISSION_DENIED": (
        403,
        "PERMISSION_DENIED",
        "Permission 'cloudmessaging.messages.create' denied on resource (or it may not exist).",
        False,
    ),
    "NOT_FOUND": (404, "NOT_FOUND", "Requested entity was not found.", False),
}
REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
}
REASONS |= {413: "Payload Too Large", 429: "Too Many Requests", 500: "Internal Server Error", 503: "Unavailable"}


@dataclass(frozen=True)
class FcmReply:
    """One scripted answer. `error` is a key of `ERRORS` (None: success). For INVALID_ARGUMENT,
    `field` names the offending field in the BadRequest detail (the token's by default)."""

    error: str | None = None
    field: str = "message.token"
    retry_after: str | None = None
    delay_s: float = 0.0
    hang: bool = False


def _as_reply(spec: FcmReply | str) -> FcmReply:
    return spec if isinstance(spec, FcmReply) else FcmReply(spec)


@dataclass
class FcmRequest:
    """One send the server received, and what it answered."""

    target: str
    headers: dict[str, str]
    message: dict[str, Any]
    status: int | None = None
    error: str | None = None

    @property
    def android(self) -> dict[str, Any]:
        android = self.message.get("android", {})
        assert isinstance(android, dict)
        return android

    @property
    def data(self) -> dict[str, Any]:
        data = self.message.get("data", {})
        assert isinstance(data, dict)
        return data


def error_body(status: int, canonical: str, message: str, details: list[dict[str, Any]]) -> dict[str, Any]:
    error: dict[str, Any] = {"code": status, "message": message, "status": canonical}
    if details:
        error["details"] = details
    return {"error": error}


class FakeFcm:
    """The fake FCM server; use as ``async with FakeFcm() as fcm:``."""

    def __init__(self, *, project_id: str = "mqchat-test") -> None:
        self.project_id = project_id
        self.access_tokens: set[str] = {DEFAULT_ACCESS_TOKEN}
        self.requests: list[FcmRequest] = []
        self.token_requests = 0
        self.host = "127.0.0.1"
        self.port = 0
        self._scripts: dict[str, deque[FcmReply]] = {}
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._closing = asyncio.Event()
        self._sa_key: rsa.RSAPrivateKey | None = None
        self._issued = itertools.count(1)
        self.client_email = f"firebase-adminsdk@{project_id}.iam.gserviceaccount.com"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def script(self, target: str, *replies: FcmReply | str) -> None:
        """Answer the next sends to `target` with `replies` (error names or `FcmReply`), in turn."""
        self._scripts.setdefault(target, deque()).extend(_as_reply(r) for r in replies)

    def requests_for(self, target: str) -> list[FcmRequest]:
        return [r for r in self.requests if r.target == target]

    def service_account_info(self, *, private_key_pem: str | None = None) -> dict[str, str]:
        """The JSON of a service-account key file whose token endpoint is this server."""
        if self._sa_key is None:
            self._sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = (
            private_key_pem
            or self._sa_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ).decode()
        )
        return {
            "type": "service_account",
            "project_id": self.project_id,
            "private_key_id": "0123456789abcdef",
            "private_key": pem,
            "client_email": self.client_email,
            "client_id": "123456789012345678901",
            "auth_uri": f"{self.url}/auth",
            "token_uri": f"{self.url}/token",
        }

    # --- HTTP ------------------------------------------------------------------------------------

    async def __aenter__(self) -> FakeFcm:
        self._server = await asyncio.start_server(self._serve, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._server is None:
            return
        self._server.close()
        self._closing.set()
        for writer in list(self._writers):
            writer.close()
        # Handlers end on their own once their connection is closed (not cancelled: asyncio's stream
        # protocol reports a cancelled handler as an error).
        while self._handlers:
            await asyncio.gather(*self._handlers, return_exceptions=True)
            for writer in list(self._writers):
                writer.close()
        await self._server.wait_closed()
        self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._writers.add(writer)
        if self._closing.is_set():
            writer.close()
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    break
                lines = head.decode("latin-1").split("\r\n")
                method, target, _version = lines[0].split(" ", 2)
                headers: dict[str, str] = {}
                for line in lines[1:]:
                    if line:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                status, extra, payload = await self._dispatch(method, target, headers, body)
                data = json.dumps(payload).encode()
                response = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}", "content-type: application/json"]
                response += [f"{k}: {v}" for k, v in extra.items()]
                response.append(f"content-length: {len(data)}")
                writer.write(("\r\n".join(response) + "\r\n\r\n").encode() + data)
                await writer.drain()
                if headers.get("connection", "").lower() == "close":
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            self._handlers.discard(task)

    async def _dispatch(
        self, method: str, target: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], dict[str, Any]]:
        path = urllib.parse.urlsplit(target).path
        if method == "POST" and path == "/token":
            return self._token(body)
        if method == "POST" and path.startswith("/v1/projects/") and path.endswith("/messages:send"):
            return await self._send(path, headers, body)
        return 404, {}, error_body(404, "NOT_FOUND", f"no such resource: {path}", [])

    def _token(self, body: bytes) -> tuple[int, dict[str, str], dict[str, Any]]:
        self.token_requests += 1
        form = urllib.parse.parse_qs(body.decode())
        assertion = form.get("assertion", [""])[0]
        if self._sa_key is None or form.get("grant_type", [""])[0] != "urn:ietf:params:oauth:grant-type:jwt-bearer":
            return 400, {}, {"error": "unsupported_grant_type"}
        try:
            claims = jwt.decode(
                assertion, self._sa_key.public_key(), algorithms=["RS256"], options={"verify_aud": False}
            )
        except jwt.PyJWTError:
            return 400, {}, {"error": "invalid_grant", "error_description": "Invalid JWT Signature."}
        if claims.get("iss") != self.client_email:
            return 400, {}, {"error": "invalid_grant", "error_description": "Invalid issuer."}
        token = f"ya29.fake-{next(self._issued)}"
        self.access_tokens.add(token)
        return 200, {}, {"access_token": token, "expires_in": 3600, "token_type": "Bearer"}

    async def _send(
        self, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], dict[str, Any]]:
        project = path.removeprefix("/v1/projects/").removesuffix("/messages:send")
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = {}
        message = parsed.get("message") if isinstance(parsed, dict) else None
        message = message if isinstance(message, dict) else {}
        target = next((str(message[k]) for k in ("token", "fid", "topic", "condition") if k in message), "")
        record = FcmRequest(target=target, headers=headers, message=message)
        self.requests.append(record)

        reply = self._decide(record, project, headers.get("authorization", ""))
        if reply.hang:
            await self._closing.wait()  # no answer while the server runs
            raise ConnectionResetError("server closing")
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        if reply.error is None:
            record.status = 200
            name = f"projects/{self.project_id}/messages/{uuid.uuid4().int % 10**16}"
            return 200, {}, {"name": name}
        status, canonical, text, fcm = ERRORS[reply.error]
        details: list[dict[str, Any]] = [{"@type": FCM_ERROR_TYPE, "errorCode": reply.error}] if fcm else []
        if reply.error == "INVALID_ARGUMENT":
            text = "The registration token is not a valid FCM registration token" if "token" in reply.field else text
            violation = {"field": reply.field, "description": "Invalid value"}
            details.append({"@type": BAD_REQUEST_TYPE, "fieldViolations": [violation]})
        record.status, record.error = status, reply.error
        extra = {"retry-after": reply.retry_after} if reply.retry_after else {}
        return status, extra, error_body(status, canonical, text, details)

    def _decide(self, record: FcmRequest, project: str, authorization: str) -> FcmReply:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or token not in self.access_tokens:
            return FcmReply("UNAUTHENTICATED")
        if project != self.project_id:
            return FcmReply("NOT_FOUND")
        targets = [k for k in ("token", "fid", "topic", "condition") if k in record.message]
        if len(targets) != 1:
            return FcmReply("INVALID_ARGUMENT", field="message")
        data = record.message.get("data", {})
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            return FcmReply("INVALID_ARGUMENT", field="message.data")
        script = self._scripts.get(record.target)
        if script:
            return script.popleft()
        return FcmReply()
