"""The HTTP side of catching up: sync and history pages, with timeouts and retries.

::

    sync(since)              GET /v1/conversations?since=&limit=&include_messages=  ─► SyncPage
    messages_after(conv, n)  GET /v1/conversations/{conv}/messages?after=n&limit=   ─► MessagesPage

Every call is bounded by ``timeout`` seconds. Transport failures, timeouts and 429/5xx answers
are retried with the same full-jitter backoff as MQTT reconnects; any other answer raises
:class:`clients.errors.HistoryFailed` with the server's stable ``error`` code (``bad_cursor``,
``not_member``, ``unauthorized`` …). The bearer token is the device's MQTT token.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

from clients._transfer import error_of
from clients.errors import HistoryFailed
from clients.events import Message, parse_envelope

logger = logging.getLogger(__name__)

_RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_HISTORY_LIMIT = 500  # the server's default cap; an operator may set a lower one
_HISTORY_LIMIT_FALLBACK = 100  # the server's default page size, always accepted


@dataclass(frozen=True, slots=True)
class ConversationSummary:
    """One conversation of a sync page: the user's state there and its newest messages."""

    conv: str
    kind: str
    last_seq: int
    delivered: int
    read: int
    unread: int
    updated_at: int
    messages: tuple[Message, ...] = ()  # ascending
    messages_more: bool = False


@dataclass(frozen=True, slots=True)
class SyncPage:
    conversations: tuple[ConversationSummary, ...]
    cursor: str
    more: bool


@dataclass(frozen=True, slots=True)
class MessagesPage:
    conv: str
    messages: tuple[Message, ...]  # ascending
    more: bool
    last_seq: int


def _int(obj: dict[str, Any], key: str, default: int | None = None) -> int:
    value = obj.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise HistoryFailed("bad_response", f"{key!r} is not an integer")
    return value


def _messages(raw: object) -> tuple[Message, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise HistoryFailed("bad_response", "'messages' is not a list")
    messages = []
    for item in raw:
        msg = parse_envelope(item) if isinstance(item, dict) else None
        if not isinstance(msg, Message):
            raise HistoryFailed("bad_response", "an element of 'messages' is not a msg envelope")
        messages.append(msg)
    return tuple(messages)


def _summary(obj: object) -> ConversationSummary:
    if not isinstance(obj, dict) or not isinstance(obj.get("conv"), str):
        raise HistoryFailed("bad_response", "a conversation without 'conv'")
    return ConversationSummary(
        conv=obj["conv"],
        kind=str(obj.get("kind", "")),
        last_seq=_int(obj, "last_seq"),
        delivered=_int(obj, "delivered", 0),
        read=_int(obj, "read", 0),
        unread=_int(obj, "unread", 0),
        updated_at=_int(obj, "updated_at", 0),
        messages=_messages(obj.get("messages")),
        messages_more=bool(obj.get("messages_more", False)),
    )


@dataclass(frozen=True, slots=True)
class UserPresence:
    """What ``GET /v1/presence`` says of one user."""

    user: str
    state: str  # "online" | "offline"
    last_seen: int | None  # ms since the epoch; None: never seen

    @property
    def online(self) -> bool:
        return self.state == "online"


class HistoryClient:
    """Sync and history calls of one user over an ``httpx.AsyncClient`` the caller owns."""

    def __init__(
        self,
        *,
        http: httpx.AsyncClient,
        token: str,
        timeout: float,
        sleep: Callable[[float], Awaitable[None]],  # the client's injected clock
        backoff: Callable[[int], float],  # retry attempt (0-based) -> seconds
    ) -> None:
        self._http = http
        self._headers = {"Authorization": f"Bearer {token}"}
        self._timeout = timeout
        self._sleep = sleep
        self._backoff = backoff
        self._history_limit = _HISTORY_LIMIT
        self.sync_requests = 0  # GET /v1/conversations requests, retries included
        self.history_requests = 0  # GET …/messages requests, retries included

    async def sync(self, since: str | None, *, limit: int = 100, include_messages: int = 50) -> SyncPage:
        params: dict[str, str | int] = {"limit": limit, "include_messages": include_messages}
        if since is not None:
            params["since"] = since
        body = await self._get("/v1/conversations", params, sync=True)
        raw = body.get("conversations")
        cursor = body.get("cursor")
        if not isinstance(raw, list) or not isinstance(cursor, str):
            raise HistoryFailed("bad_response", "a sync page without 'conversations' or 'cursor'")
        return SyncPage(
            conversations=tuple(_summary(c) for c in raw), cursor=cursor, more=bool(body.get("more", False))
        )

    async def messages_after(self, conv: str, after: int) -> MessagesPage:
        """Messages of ``conv`` with ``seq > after``, ascending, one page of up to 500."""
        path = f"/v1/conversations/{quote(conv, safe=':@')}/messages"
        while True:
            try:
                body = await self._get(path, {"after": after, "limit": self._history_limit})
                break
            except HistoryFailed as exc:
                if exc.code != "bad_request" or self._history_limit == _HISTORY_LIMIT_FALLBACK:
                    raise
                logger.info("the server caps history pages below %d; using %d", _HISTORY_LIMIT, _HISTORY_LIMIT_FALLBACK)
                self._history_limit = _HISTORY_LIMIT_FALLBACK
        return MessagesPage(
            conv=conv,
            messages=_messages(body.get("messages")),
            more=bool(body.get("more", False)),
            last_seq=_int(body, "last_seq", 0),
        )

    async def presence(self, users: Sequence[str]) -> dict[str, UserPresence]:
        """State and last seen of users (yourself, and users you share a conversation with)."""
        body = await self._call("GET", "/v1/presence", params={"users": ",".join(users)})
        found: dict[str, UserPresence] = {}
        for item in body.get("users") or ():
            if isinstance(item, dict) and isinstance(item.get("user"), str):
                last_seen = item.get("last_seen")
                found[item["user"]] = UserPresence(
                    item["user"], str(item.get("state")), last_seen if isinstance(last_seen, int) else None
                )
        return found

    async def put(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """PUT a JSON body (retried like every call); the answer's JSON object."""
        return await self._call("PUT", path, json=body)

    async def _get(self, path: str, params: dict[str, str | int], *, sync: bool = False) -> dict[str, Any]:
        return await self._call("GET", path, params=params, counts="sync" if sync else "history")

    async def _call(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str | int] | None = None,
        json: dict[str, Any] | None = None,
        counts: str = "",
    ) -> dict[str, Any]:
        """One call, retried with backoff on transport errors and retryable statuses; counts
        each attempt as a sync or history request when asked to."""
        attempt = 0
        while True:
            if counts == "sync":
                self.sync_requests += 1
            elif counts == "history":
                self.history_requests += 1
            retry_after: float | None = None
            try:
                async with asyncio.timeout(self._timeout):
                    response = await self._http.request(method, path, params=params, json=json, headers=self._headers)
                    await response.aread()
            except (httpx.TransportError, TimeoutError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code == 200:
                    try:
                        body = response.json()
                    except ValueError:
                        body = None
                    if not isinstance(body, dict):
                        raise HistoryFailed("bad_response", f"{method} {path}: the answer is not a JSON object")
                    return body
                code, message = error_of(response)
                if response.status_code not in _RETRYABLE_STATUS:
                    raise HistoryFailed(code, f"{method} {path}: {response.status_code} {message}")
                problem = f"{response.status_code} {code}"
                header = response.headers.get("retry-after", "")
                retry_after = float(header) if header.isdigit() else None
            delay = self._backoff(attempt)
            if retry_after is not None:
                delay = max(delay, retry_after)  # the server said when (429 Retry-After)
            attempt += 1
            logger.warning("%s %s failed (%s); retrying in %.1f s", method, path, problem, delay)
            await self._sleep(delay)
