"""The web chat under ``/app``: the built app's files, where it finds MQTT, and the dev sign-in.

::

    GET /app, /app/ ────────▶ index.html                      Cache-Control: no-cache
    GET /app/assets/{file} ─▶ a file whose name the build hashed: immutable for a year
    GET /app/{file} ────────▶ any other file of the build       no-cache
          (a dot-file, a folder, a path that leaves the directory, a missing file: 404)
    GET /app/server.json ───▶ the MQTT-over-WebSocket listeners the app connects to, and
                              whether the dev sign-in is open
    POST /app/dev-token ────▶ {"user","device"} ─▶ a short-lived access token (no-store), signed
                              with the secret the server generated in its data dir, on a server
                              that listens on a loopback host without TLS (dev mode); any other
                              server, and a request whose Host (or Origin) is not a loopback
                              name (DNS rebinding), answers 404

The files come from a directory (the Vite build, ``clients/js/app/dist``) read on each request,
so a rebuild is served without a restart; without one every ``/app`` path answers 404.
Conditional requests (``If-None-Match``) are answered 304.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import APIRouter, Body, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from mqchat.errors import ErrorCode, RequestError
from mqchat.ids import ID_PATTERN
from mqchat.tokens import issue_token

PREFIX = "/app"
HASHED_DIR = "assets"  # the build puts every file whose name carries its content hash here
IMMUTABLE = "public, max-age=31536000, immutable"
REVALIDATE = "no-cache"
NO_STORE = "no-store"
DEV_TOKEN_TTL_S = 3600

# Content types by extension: fixed here, not taken from the host's mime.types.
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".map": "application/json",
    ".webmanifest": "application/manifest+json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".webp": "image/webp",
    ".ico": "image/x-icon",
    ".woff2": "font/woff2",
    ".txt": "text/plain; charset=utf-8",
}
# The app loads only its own files and speaks MQTT over WebSocket to another port of this host.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data: blob:; "
    "style-src 'self'; script-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


@dataclass(frozen=True, slots=True)
class MqttWebSocket:
    """Where browsers reach MQTT: the WebSocket listeners' ports (None: not open) and path."""

    ws_port: int | None = None
    wss_port: int | None = None
    path: str = "/mqtt"


NO_WEBSOCKET = MqttWebSocket()


def is_loopback_host(host: str) -> bool:
    """True for a name or address that only reaches this machine: ``localhost``, 127.0.0.0/8,
    ``::1`` (bracketed or not). A wildcard ("", 0.0.0.0, ::) or any other name is not."""
    name = host.strip().lower().removesuffix(".")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name.removeprefix("[").removesuffix("]")).is_loopback
    except ValueError:
        return False


def loopback_request(request: Request) -> bool:
    """Whether the request names this machine by a loopback name: its Host, and its Origin when it
    has one. A page on another site whose name was made to resolve to 127.0.0.1 (DNS
    rebinding) sends its own name in Host, so it is refused."""
    host = urlsplit(f"//{request.headers.get('host', '')}").hostname
    if host is None or not is_loopback_host(host):
        return False
    origin = request.headers.get("origin")
    if origin is None:
        return True
    try:
        origin_host = urlsplit(origin).hostname
    except ValueError:
        return False
    return origin_host is not None and is_loopback_host(origin_host)


async def _loopback_only(request: Request) -> None:
    if not loopback_request(request):
        raise RequestError(ErrorCode.NOT_FOUND, "Not Found")


@dataclass(frozen=True, slots=True)
class DevTokens:
    """The dev sign-in: anyone who reaches the HTTP port gets a token for any user. Given only in
    dev mode (see mqchat.app.dev_sign_in_open); the tokens carry the configured issuer and
    audience, if any, so that the server's verifier takes them."""

    secret: str = field(repr=False)
    ttl_s: int = DEV_TOKEN_TTL_S
    issuer: str = ""
    audience: str = ""

    def issue(self, user: str, device: str) -> str:
        return issue_token(
            secret=self.secret,
            user=user,
            device=device,
            ttl_s=self.ttl_s,
            issuer=self.issuer or None,
            audience=self.audience or None,
        )


class DevTokenIn(BaseModel):
    user: str = Field(pattern=f"^{ID_PATTERN}$", description="the user to sign in as")
    device: str = Field(pattern=f"^{ID_PATTERN}$", description="a device id unique in the deployment")


class DevTokenOut(BaseModel):
    token: str = Field(description="an access token (HS256), for MQTT and HTTP alike")
    user: str
    device: str
    expires_in: int = Field(description="seconds until the token expires")


def resolve_file(root: Path, path: str) -> Path | None:
    """The regular file ``path`` names inside root, or None: a segment that is empty, ``.``,
    ``..`` or a dot-file, a backslash, a NUL, or a link that leads out of root."""
    parts = path.split("/")
    if any(not part or part.startswith(".") or "\\" in part or "\0" in part for part in parts):
        return None
    try:
        base = root.resolve(strict=True)
        found = base.joinpath(*parts).resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if not found.is_relative_to(base) or not found.is_file():
        return None
    return found


async def file_response(request: Request, file: Path, *, cache_control: str, html: bool = False) -> Response:
    """The file's bytes with its type, caching headers and ETag; 304 to a matching If-None-Match."""
    try:
        body = await asyncio.to_thread(file.read_bytes)
    except OSError:
        raise RequestError(ErrorCode.NOT_FOUND, "no such file") from None
    etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    headers = {
        "Cache-Control": cache_control,
        "ETag": etag,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }
    if html:
        headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    wanted = request.headers.get("if-none-match", "")
    if etag in (tag.strip().removeprefix("W/") for tag in wanted.split(",")):
        return Response(status_code=304, headers=headers)
    media_type = CONTENT_TYPES.get(file.suffix.lower(), "application/octet-stream")
    return Response(body, media_type=media_type, headers=headers)


def web_app_router(directory: Path | None, websocket: MqttWebSocket, dev_tokens: DevTokens | None) -> APIRouter:
    """The ``/app`` routes: the files of ``directory`` (None: not served), server.json, and the
    dev sign-in when ``dev_tokens`` is given."""
    router = APIRouter()

    if dev_tokens is not None:

        @router.post(
            f"{PREFIX}/dev-token",
            response_model=DevTokenOut,
            tags=["dev"],
            dependencies=[Depends(_loopback_only)],  # before the body is read: 404, not 400
            summary="Dev mode only: a short-lived access token for any user (404 on any other server)",
        )
        async def dev_token(response: Response, sign_in: Annotated[DevTokenIn, Body()]) -> dict[str, object]:
            token = dev_tokens.issue(sign_in.user, sign_in.device)
            response.headers["Cache-Control"] = NO_STORE
            return {"token": token, "user": sign_in.user, "device": sign_in.device, "expires_in": dev_tokens.ttl_s}

    else:

        @router.post(f"{PREFIX}/dev-token", include_in_schema=False)
        async def no_dev_token() -> None:
            # Not dev mode: as if the route did not exist (not 405 from the files' route).
            raise RequestError(ErrorCode.NOT_FOUND, "Not Found")

    if directory is None:
        return router

    @router.api_route(f"{PREFIX}/server.json", methods=["GET", "HEAD"], include_in_schema=False)
    async def server_settings() -> JSONResponse:
        body = {
            "ws_port": websocket.ws_port,
            "wss_port": websocket.wss_port,
            "ws_path": websocket.path,
            "dev_sign_in": dev_tokens is not None,
        }
        return JSONResponse(body, headers={"Cache-Control": REVALIDATE, "X-Content-Type-Options": "nosniff"})

    @router.api_route(PREFIX, methods=["GET", "HEAD"], include_in_schema=False)
    @router.api_route(f"{PREFIX}/", methods=["GET", "HEAD"], include_in_schema=False)
    async def index(request: Request) -> Response:
        return await _served(request, directory, "index.html")

    @router.api_route(f"{PREFIX}/{{path:path}}", methods=["GET", "HEAD"], include_in_schema=False)
    async def static_file(request: Request, path: str) -> Response:
        return await _served(request, directory, path)

    return router


async def _served(request: Request, directory: Path, path: str) -> Response:
    file = resolve_file(directory, path)
    if file is None:
        raise RequestError(ErrorCode.NOT_FOUND, "no such file in the web app")
    hashed = path.startswith(f"{HASHED_DIR}/")
    return await file_response(
        request, file, cache_control=IMMUTABLE if hashed else REVALIDATE, html=file.suffix.lower() == ".html"
    )
