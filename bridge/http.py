"""The bridge's HTTP API (ASGI, FastAPI): history and catch-up, health, metrics.

Every ``/v1`` call takes ``Authorization: Bearer <access token>`` (the same JWT as MQTT).
Errors are JSON: ``{"error": <stable code>, "message": <reason>}`` with a 4xx/5xx status.
"""

import base64
import logging
import os
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from bridge.pipeline import message_event, require_member
from mqchat import __version__
from mqchat.errors import AuthError, ErrorCode, RequestError, StorageError
from mqchat.ids import parse_conv
from mqchat.tokens import Identity, TokenVerifier
from storage.base import MessageStore

logger = logging.getLogger(__name__)

_STATUS = {
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.BAD_CONV: 400,
    ErrorCode.BAD_CURSOR: 400,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.NOT_MEMBER: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.INTERNAL: 500,
    ErrorCode.UNAVAILABLE: 503,
}


class ErrorBody(BaseModel):
    error: str = Field(description="stable error code")
    message: str


class MessageOut(BaseModel):
    type: str = "msg"
    conv: str
    seq: int
    mid: str
    from_: str = Field(alias="from")
    dev: str
    id: str
    ts: int
    kind: str
    body: str
    media: list[str] | None = None


class ConversationOut(BaseModel):
    conv: str
    kind: str
    last_seq: int
    delivered: int = Field(description="your delivered watermark")
    read: int = Field(description="your read watermark")
    unread: int = Field(description="last_seq - read")
    updated_at: int = Field(description="ms since the epoch of the last change")
    messages: list[MessageOut] | None = Field(
        default=None, description="with include_messages=N: the newest N messages, ascending"
    )
    messages_more: bool | None = Field(default=None, description="older messages exist before `messages`")


class ConversationsPage(BaseModel):
    conversations: list[ConversationOut]
    cursor: str = Field(description="pass as `since` next time")
    more: bool = Field(description="more changes wait: call again with the new cursor now")


def encode_cursor(version: int) -> str:
    return base64.urlsafe_b64encode(f"v1:{version}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int | None:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        return None
    prefix, _, number = raw.partition(":")
    if prefix != "v1" or not number.isdigit() or len(number) > 19:
        return None
    return int(number)


class MessagesPage(BaseModel):
    conv: str
    messages: list[MessageOut]
    more: bool = Field(description="more messages exist in the direction of the read")
    last_seq: int = Field(description="the conversation's highest seq right now")


def _error(code: ErrorCode, message: str) -> JSONResponse:
    return JSONResponse({"error": str(code), "message": message}, status_code=_STATUS.get(code, 400))


def metrics_payload() -> bytes:
    """Prometheus text for this process, or for all mqchat processes in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest(REGISTRY)


def create_app(
    *,
    store: MessageStore,
    verifier: TokenVerifier,
    history_max_limit: int = 500,
    broker_connected: Callable[[], bool] = lambda: True,
) -> FastAPI:
    """Build the ASGI app over the given store and token verifier.

    ``broker_connected`` tells /healthz whether the bridge currently reaches the broker.
    """
    app = FastAPI(
        title="mqchat",
        version=__version__,
        description="HTTP API of mqchat: history and catch-up. The MQTT side is in docs/protocol.md.",
    )
    error_responses: dict[int | str, dict[str, Any]] = {s: {"model": ErrorBody} for s in (400, 401, 403, 404, 503)}

    @app.exception_handler(RequestError)
    async def on_request_error(_: Request, exc: RequestError) -> JSONResponse:
        return _error(exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return _error(ErrorCode.BAD_REQUEST, f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: ErrorCode.NOT_FOUND, 401: ErrorCode.UNAUTHORIZED, 403: ErrorCode.FORBIDDEN}.get(
            exc.status_code, ErrorCode.BAD_REQUEST
        )
        return JSONResponse({"error": str(code), "message": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(StorageError)
    async def on_storage_error(_: Request, exc: StorageError) -> JSONResponse:
        logger.error("storage failed during an HTTP request: %s", exc)
        return _error(ErrorCode.UNAVAILABLE, "storage unavailable; retry")

    async def identity(request: Request) -> Identity:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise RequestError(ErrorCode.UNAUTHORIZED, "missing bearer token")
        try:
            return verifier.verify(token.strip())
        except AuthError as exc:
            raise RequestError(ErrorCode.UNAUTHORIZED, str(exc)) from None

    @app.get(
        "/v1/conversations/{conv}/messages",
        response_model=MessagesPage,
        response_model_exclude_none=True,
        responses=error_responses,
        summary="Catch-up (after=SEQ, ascending) or scrollback (before=SEQ)",
    )
    async def messages(
        conv: str,
        who: Annotated[Identity, Depends(identity)],
        after: Annotated[int | None, Query(ge=0, lt=2**63)] = None,
        before: Annotated[int | None, Query(ge=1, lt=2**63)] = None,
        limit: Annotated[int, Query(ge=1, le=history_max_limit)] = 100,
    ) -> dict[str, Any]:
        parsed = parse_conv(conv)
        if parsed is None:
            raise RequestError(ErrorCode.BAD_CONV, "not a conversation id")
        require_member(who.user, parsed)
        if after is not None and before is not None:
            raise RequestError(ErrorCode.BAD_REQUEST, "give after or before, not both")
        if before is not None:
            page = await store.fetch_before(parsed.id, before, limit)
        else:
            page = await store.fetch_after(parsed.id, after or 0, limit)
        last_seq = await store.last_seq(parsed.id)
        return {
            "conv": parsed.id,
            "messages": [message_event(m) for m in page.messages],
            "more": page.more,
            "last_seq": last_seq,
        }

    @app.get(
        "/v1/conversations",
        response_model=ConversationsPage,
        response_model_exclude_none=True,
        responses=error_responses,
        summary="What changed for you since a cursor (sync): conversations with your watermarks and unread",
    )
    async def conversations(
        who: Annotated[Identity, Depends(identity)],
        since: Annotated[str | None, Query(max_length=64, description="the cursor of your last sync")] = None,
        limit: Annotated[int, Query(ge=1, le=history_max_limit)] = 100,
        include_messages: Annotated[int, Query(ge=0, le=100)] = 0,
    ) -> dict[str, Any]:
        after = 0
        if since is not None:
            decoded = decode_cursor(since)
            if decoded is None or decoded > await store.current_version():
                raise RequestError(ErrorCode.BAD_CURSOR, "not a cursor from this server; sync again without one")
            after = decoded
        page = await store.changes_since(user=who.user, version=after, limit=limit)
        out: list[dict[str, Any]] = []
        for state in page.states:
            item: dict[str, Any] = {
                "conv": state.conv,
                "kind": state.kind,
                "last_seq": state.last_seq,
                "delivered": state.delivered,
                "read": state.read,
                "unread": state.unread,
                "updated_at": state.updated_at,
            }
            if include_messages:
                recent = await store.fetch_before(state.conv, state.last_seq + 1, include_messages)
                item["messages"] = [message_event(m) for m in recent.messages]
                item["messages_more"] = recent.more
            out.append(item)
        return {"conversations": out, "cursor": encode_cursor(page.version), "more": page.more}

    @app.get("/healthz", summary="Health: 200 when the bridge reaches the broker, else 503")
    async def healthz() -> JSONResponse:
        if broker_connected():
            return JSONResponse({"status": "ok", "broker": "connected", "version": __version__})
        return JSONResponse({"status": "degraded", "broker": "disconnected", "version": __version__}, status_code=503)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def prometheus_metrics() -> Response:
        return Response(metrics_payload(), media_type=CONTENT_TYPE_LATEST)

    return app
