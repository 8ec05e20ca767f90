"""The bridge's HTTP API (ASGI, FastAPI): history and catch-up, health, metrics.

Every ``/v1`` call takes ``Authorization: Bearer <access token>`` (the same JWT as MQTT).
Errors are JSON: ``{"error": <stable code>, "message": <reason>}`` with a 4xx/5xx status.
"""

import asyncio
import base64
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from bridge.http_edge import Authenticate, BodyLimit
from bridge.outgoing import Outgoing
from bridge.pipeline import UNLIMITED, message_event, require_member
from bridge.ratelimit import RateLimit, RateLimiter
from mqchat import __version__
from mqchat.clock import SYSTEM_CLOCK, Clock
from mqchat.errors import ErrorCode, RequestError, StorageError
from mqchat.ids import ID_PATTERN, is_valid_id, new_group_id, parse_conv
from mqchat.protocol import MEMBERSHIP_TOPIC, channel_topic, encode, user_in_topic
from mqchat.tokens import Identity, TokenVerifier
from storage import privacy
from storage.base import DEFAULT_SETTINGS, Group, GroupMember, MessageStore, UserSettings
from storage.presence import Presence
from storage.push_store import DeviceToken, SqlitePushStore

PresenceLookup = Callable[[list[str]], Awaitable[dict[str, Presence]]]
MAX_PRESENCE_USERS = 200

logger = logging.getLogger(__name__)

_STATUS = {
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.BAD_CONV: 400,
    ErrorCode.BAD_CURSOR: 400,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.UNSUPPORTED: 400,
    ErrorCode.NOT_MEMBER: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.INTERNAL: 500,
    ErrorCode.UNAVAILABLE: 503,
}


# Path parameters: their patterns are documented (OpenAPI) and checked by the routes themselves,
# which answer bad_conv / bad_request (400) with the protocol's own codes.
CONV_PATTERN = f"^(dm:{ID_PATTERN}:{ID_PATTERN}|g:[0-9A-HJKMNP-TV-Z]{{26}})$"
ConvPath = Annotated[
    str, Path(description="dm:{a}:{b} (a, b sorted) or g:{ulid}", json_schema_extra={"pattern": CONV_PATTERN})
]
IdPath = Annotated[str, Path(description="a user or device id", json_schema_extra={"pattern": f"^{ID_PATTERN}$"})]


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


# One call adds at most this many members: the store writes them in one transaction and the
# server announces them at once, so an unbounded call would hold everyone else's writes behind it.
MAX_MEMBERS_PER_CALL = 1000


class GroupIn(BaseModel):
    model_config = ConfigDict(strict=True)  # 0 is not false, "1" is not true: what the schema says

    name: str = Field(min_length=1, max_length=200)
    members: list[Annotated[str, Field(pattern=f"^{ID_PATTERN}$")]] = Field(
        default_factory=list, max_length=MAX_MEMBERS_PER_CALL, description="at most 1,000; add more in further calls"
    )
    kind: str = Field(default="group", pattern="^(group|channel)$")


class MembersIn(BaseModel):
    model_config = ConfigDict(strict=True)  # 0 is not false, "1" is not true: what the schema says

    members: list[Annotated[str, Field(pattern=f"^{ID_PATTERN}$")]] = Field(
        min_length=1, max_length=MAX_MEMBERS_PER_CALL, description="at most 1,000; add more in further calls"
    )


class GroupMemberOut(BaseModel):
    user: str
    role: str
    joined_seq: int = Field(description="the first seq this member can read")


class GroupOut(BaseModel):
    conv: str
    name: str
    kind: str
    creator: str
    created_at: int
    members: list[GroupMemberOut]


class PresenceOut(BaseModel):
    user: str
    state: str = Field(description="online | offline")
    last_seen: int | None = Field(description="ms since the epoch: online since, or last seen; null: never seen")


class PresencePage(BaseModel):
    users: list[PresenceOut]


class PushTokenIn(BaseModel):
    model_config = ConfigDict(strict=True)  # 0 is not false, "1" is not true: what the schema says

    platform: str = Field(pattern="^(apns|fcm)$")
    token: str = Field(min_length=1, max_length=4096, pattern=r"^[\x21-\x7e]+$")
    topic: str | None = Field(
        default=None, max_length=255, description="APNs: the app's bundle id, if not the server's"
    )
    sandbox: bool = Field(default=False, description="APNs: a development build (Apple's sandbox)")


class PushTokenOut(BaseModel):
    device: str
    platform: str
    sandbox: bool


class SettingsIn(BaseModel):
    model_config = ConfigDict(strict=True)  # 0 is not false, "1" is not true: what the schema says

    muted: bool | None = Field(default=None, description="yours: no alert for this conversation (badge still updates)")
    e2e: bool | None = Field(
        default=None, description="the conversation's: bodies are ciphertext, pushes carry no text (groups: admins)"
    )


class PrivacyIn(BaseModel):
    model_config = ConfigDict(strict=True)

    who_may_add_me: str | None = Field(
        default=None,
        pattern="^(everyone|contacts|nobody)$",
        description="who may add you to a group or channel: everyone; contacts (users you share a conversation "
        "with); nobody",
    )
    presence: str | None = Field(
        default=None, pattern="^(contacts|nobody)$", description="who sees you online: contacts; nobody"
    )


class PrivacyOut(BaseModel):
    who_may_add_me: str
    presence: str


class SettingsOut(BaseModel):
    conv: str
    muted: bool
    e2e: bool


async def _no_publish(outgoing: list[Outgoing]) -> None:
    return None


def create_app(
    *,
    store: MessageStore,
    verifier: TokenVerifier,
    history_max_limit: int = 500,
    max_group_members: int = 1000,
    broker_connected: Callable[[], bool] = lambda: True,
    dead_workers: Callable[[], list[str]] = list,
    http_limit: RateLimit = UNLIMITED,
    max_body_bytes: int = 1024 * 1024,
    default_settings: UserSettings = DEFAULT_SETTINGS,
    publish: Callable[[list[Outgoing]], Awaitable[None]] = _no_publish,
    presence: PresenceLookup | None = None,
    push_store: SqlitePushStore | None = None,
    clock: Clock = SYSTEM_CLOCK,
) -> FastAPI:
    """Build the ASGI app over the given store and token verifier.

    ``broker_connected`` tells /healthz whether the bridge currently reaches the broker, and
    ``dead_workers`` which background workers have died (any: /healthz answers 503);
    ``publish`` sends events (membership changes) to devices through the adapter;
    ``presence`` answers ``GET /v1/presence`` (None: 503); ``http_limit`` is each user's budget of
    authenticated calls (over it: 429 with ``Retry-After``); ``max_body_bytes`` the largest request
    body (413 beyond). Both, and authentication, are checked before a body is read (bridge.http_edge).
    """
    app = FastAPI(
        title="mqchat",
        version=__version__,
        description="HTTP API of mqchat: history and catch-up. The MQTT side is in docs/protocol.md.",
    )
    error_responses: dict[int | str, dict[str, Any]] = {
        s: {"model": ErrorBody} for s in (400, 401, 403, 404, 413, 429, 503)
    }

    @app.exception_handler(RequestError)
    async def on_request_error(_: Request, exc: RequestError) -> JSONResponse:
        return _error(exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return _error(ErrorCode.BAD_REQUEST, f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: ErrorCode.NOT_FOUND, 401: ErrorCode.UNAUTHORIZED, 403: ErrorCode.FORBIDDEN}.get(
            exc.status_code, ErrorCode.BAD_REQUEST
        )
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # RFC 9110: Allow lists every method of the resource (Starlette names only the first
            # route's, and PUT and DELETE of one path are two routes here).
            path = request.scope["path"]
            routes = [r for r in app.routes if isinstance(r, APIRoute) and r.path_regex.match(path)]
            methods = {m for r in routes for m in (r.methods or ())}
            headers["Allow"] = ", ".join(sorted(methods))
        return JSONResponse(
            {"error": str(code), "message": str(exc.detail)}, status_code=exc.status_code, headers=headers
        )

    @app.exception_handler(StorageError)
    async def on_storage_error(_: Request, exc: StorageError) -> JSONResponse:
        logger.error("storage failed during an HTTP request: %s", exc)
        return _error(ErrorCode.UNAVAILABLE, "storage unavailable; retry")

    async def identity(request: Request) -> Identity:
        """The caller, authenticated (and their rate budget taken) by the Authenticate middleware
        before the body was read."""
        who = getattr(request.state, "identity", None)
        if not isinstance(who, Identity):
            raise RequestError(ErrorCode.UNAUTHORIZED, "missing bearer token")
        return who

    Caller = Annotated[Identity, Depends(identity)]

    @app.get(
        "/v1/conversations/{conv}/messages",
        response_model=MessagesPage,
        response_model_exclude_none=True,
        responses=error_responses,
        summary="Catch-up (after=SEQ, ascending) or scrollback (before=SEQ)",
    )
    async def messages(
        conv: ConvPath,
        who: Caller,
        after: Annotated[int | None, Query(ge=0, lt=2**63)] = None,
        before: Annotated[int | None, Query(ge=1, lt=2**63)] = None,
        limit: Annotated[int, Query(ge=1, le=history_max_limit)] = 100,
    ) -> dict[str, Any]:
        parsed = parse_conv(conv)
        if parsed is None:
            raise RequestError(ErrorCode.BAD_CONV, "not a conversation id")
        first = 1  # a group member reads from the seq they joined at
        if parsed.kind == "group":
            first = (await membership(conv, who)).joined_seq
        else:
            await require_member(store, who.user, parsed)
        if after is not None and before is not None:
            raise RequestError(ErrorCode.BAD_REQUEST, "give after or before, not both")
        if before is not None:
            page = await store.fetch_before(parsed.id, before, limit)
            visible = [m for m in page.messages if m.seq >= first]
            more = page.more and len(visible) == len(page.messages)
        else:
            page = await store.fetch_after(parsed.id, max(after or 0, first - 1), limit)
            visible, more = list(page.messages), page.more
        last_seq = await store.last_seq(parsed.id)
        return {
            "conv": parsed.id,
            "messages": [message_event(m) for m in visible],
            "more": more,
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
        who: Caller,
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
                first = 1
                if state.kind != "dm":
                    standing = await store.membership(conv=state.conv, user=who.user)
                    member = standing.member if standing is not None else None
                    first = member.joined_seq if member is not None else state.last_seq + 1
                recent = await store.fetch_before(state.conv, state.last_seq + 1, include_messages)
                visible = [m for m in recent.messages if m.seq >= first]
                item["messages"] = [message_event(m) for m in visible]
                item["messages_more"] = recent.more and len(visible) == len(recent.messages)
            out.append(item)
        return {"conversations": out, "cursor": encode_cursor(page.version), "more": page.more}

    def group_out(group: Group) -> dict[str, Any]:
        return {
            "conv": group.conv,
            "name": group.name,
            "kind": group.kind,
            "creator": group.creator,
            "created_at": group.created_at,
            "members": [{"user": m.user, "role": m.role, "joined_seq": m.joined_seq} for m in group.members],
        }

    async def announce(
        group: Group,
        event: str,
        users: list[str],
        by: str,
        *,
        added: Sequence[str] = (),
        removed: Sequence[str] = (),
    ) -> None:
        """A `conv` event to every member of a group; for a channel, once on its topic and to the
        users it names (so a new member learns to subscribe and a removed one to stop). Then the
        membership change to the broker, which drops its cached answers and a removed member's
        channel subscription."""
        payload = encode(
            {"type": "conv", "conv": group.conv, "kind": group.kind, "event": event, "users": users, "by": by}
        )
        change = {"conv": group.conv, "kind": group.kind, "added": list(added), "removed": list(removed)}
        out = [Outgoing(MEMBERSHIP_TOPIC, encode(change))]  # first: the broker's ACL before the news
        if group.kind == "channel":
            out.append(Outgoing(channel_topic(group.conv), payload))
            out += [Outgoing(user_in_topic(u), payload) for u in dict.fromkeys((*users, by))]
        else:
            out += [Outgoing(user_in_topic(u), payload) for u in dict.fromkeys((*group.users, *removed))]
        await publish(out)

    def require_broker() -> None:
        """A membership change must reach the broker (its ACL drops a removed member's
        subscriptions); while it cannot, refuse before changing anything."""
        if not broker_connected():
            raise RequestError(ErrorCode.UNAVAILABLE, "the server is reconnecting to its broker; retry")

    def group_id(conv: str) -> str | None:
        """The id of group or channel conv; None for a 1:1 conversation (bad_conv if not an id)."""
        parsed = parse_conv(conv)
        if parsed is None:
            raise RequestError(ErrorCode.BAD_CONV, "not a conversation id")
        return parsed.id if parsed.kind == "group" else None

    def as_member(found: object, member: GroupMember | None) -> GroupMember:
        if found is None:
            raise RequestError(ErrorCode.NOT_FOUND, "no such group")
        if member is None:
            raise RequestError(ErrorCode.NOT_MEMBER, "you are not a member of this group")
        return member

    async def membership(conv: str, who: Identity) -> GroupMember:
        """The caller's membership of group or channel conv, without loading its member list."""
        gid = group_id(conv)
        standing = await store.membership(conv=gid, user=who.user) if gid is not None else None
        return as_member(standing, standing.member if standing is not None else None)

    async def member_group(conv: str, who: Identity) -> tuple[Group, GroupMember]:
        """The group named by conv and the caller's membership in it (bad_conv / not_found / not_member)."""
        gid = group_id(conv)
        group = await store.group(gid) if gid is not None else None
        member = as_member(group, group.member(who.user) if group is not None else None)
        assert group is not None  # as_member raised otherwise
        return group, member

    async def admin_group(conv: str, who: Identity) -> Group:
        group, member = await member_group(conv, who)
        if member.role != "admin":
            raise RequestError(ErrorCode.FORBIDDEN, "only the group's admins may do this")
        return group

    async def require_consent(adder: str, users: list[str]) -> None:
        refusing = await privacy.refusing_to_be_added(store, adder, users, default=default_settings)
        if refusing:
            names = ", ".join(refusing[:5]) + (f" and {len(refusing) - 5} more" if len(refusing) > 5 else "")
            raise RequestError(ErrorCode.FORBIDDEN, f"{names} may not be added by you (their privacy settings)")

    @app.post("/v1/groups", status_code=201, response_model=GroupOut, responses=error_responses, summary="New group")
    async def create_group(body: GroupIn, who: Caller) -> dict[str, Any]:
        members = tuple(dict.fromkeys((who.user, *body.members)))
        if body.kind == "group" and len(members) > max_group_members:
            raise RequestError(ErrorCode.TOO_LARGE, f"a group has at most {max_group_members} members")
        await require_consent(who.user, list(members))
        group = await store.create_group(
            conv=new_group_id(), name=body.name, kind=body.kind, creator=who.user, members=members, ts=clock.time_ms()
        )
        await announce(group, "created", list(group.users), who.user, added=list(group.users))
        return group_out(group)

    @app.get("/v1/groups/{conv}", response_model=GroupOut, responses=error_responses, summary="A group you are in")
    async def get_group(conv: ConvPath, who: Caller) -> dict[str, Any]:
        group, _ = await member_group(conv, who)
        return group_out(group)

    @app.post("/v1/groups/{conv}/members", response_model=GroupOut, responses=error_responses, summary="Add members")
    async def add_members(conv: ConvPath, body: MembersIn, who: Caller) -> dict[str, Any]:
        group = await admin_group(conv, who)
        require_broker()
        new = [u for u in dict.fromkeys(body.members) if group.member(u) is None]
        if group.kind == "group" and len(group.members) + len(new) > max_group_members:
            raise RequestError(ErrorCode.TOO_LARGE, f"a group has at most {max_group_members} members")
        await require_consent(who.user, new)
        group = await store.add_members(conv=group.conv, users=tuple(new), ts=clock.time_ms())
        if new:
            await announce(group, "members_added", new, who.user, added=new)
        return group_out(group)

    @app.delete(
        "/v1/groups/{conv}/members/{user}",
        response_model=GroupOut,
        responses=error_responses,
        summary="Remove a member (admins), or leave (yourself)",
    )
    async def remove_member(conv: ConvPath, user: IdPath, who: Caller) -> dict[str, Any]:
        if user == who.user:
            group, _ = await member_group(conv, who)
        else:
            group = await admin_group(conv, who)
        if group.member(user) is None:
            raise RequestError(ErrorCode.NOT_FOUND, "no such member")
        require_broker()
        group = await store.remove_member(conv=group.conv, user=user)
        await announce(group, "members_removed", [user], who.user, removed=[user])
        return group_out(group)

    @app.post("/v1/groups/{conv}/admins/{user}", response_model=GroupOut, responses=error_responses, summary="Promote")
    async def promote(conv: ConvPath, user: IdPath, who: Caller) -> dict[str, Any]:
        group = await admin_group(conv, who)
        if group.member(user) is None:
            raise RequestError(ErrorCode.NOT_FOUND, "no such member")
        group = await store.set_role(conv=group.conv, user=user, role="admin")
        await announce(group, "admin_added", [user], who.user)
        return group_out(group)

    @app.get(
        "/v1/presence",
        response_model=PresencePage,
        responses=error_responses,
        summary="Online state and last seen of users you share a conversation with (and yourself)",
    )
    async def get_presence(
        who: Caller,
        users: Annotated[
            str,
            Query(
                min_length=1,
                max_length=65 * MAX_PRESENCE_USERS - 1,
                pattern=f"^{ID_PATTERN}(,{ID_PATTERN}){{0,{MAX_PRESENCE_USERS - 1}}}$",
                description="a,b,c (at most 200)",
            ),
        ],
    ) -> dict[str, Any]:
        wanted = list(dict.fromkeys(u for u in users.split(",") if u))
        if not wanted or len(wanted) > MAX_PRESENCE_USERS or not all(is_valid_id(u) for u in wanted):
            raise RequestError(ErrorCode.BAD_REQUEST, f"users: 1 to {MAX_PRESENCE_USERS} user ids, comma-separated")
        others = [u for u in wanted if u != who.user]
        visible = await asyncio.gather(*(privacy.sees_presence(store, who.user, u) for u in others))
        hidden = [u for u, ok in zip(others, visible, strict=True) if not ok]
        if hidden:
            raise RequestError(
                ErrorCode.FORBIDDEN,
                f"the presence of {', '.join(hidden[:5])} is private (you share no conversation, or they hide it)",
            )
        if presence is None:
            raise RequestError(ErrorCode.UNAVAILABLE, "presence is not available on this server")
        found = await presence(wanted)
        return {"users": [{"user": u, **found[u].envelope()} for u in wanted]}

    def pushes() -> SqlitePushStore:
        if push_store is None:
            raise RequestError(ErrorCode.UNAVAILABLE, "push is not available on this server")
        return push_store

    @app.put(
        "/v1/devices/{device}/push",
        response_model=PushTokenOut,
        responses=error_responses,
        summary="Register this device's APNs/FCM token (a token moves with its latest registration)",
    )
    async def put_push_token(device: IdPath, body: PushTokenIn, who: Caller) -> dict[str, Any]:
        if device != who.device:
            raise RequestError(ErrorCode.FORBIDDEN, "register the push token of your own device (the token's device)")
        await pushes().put_token(
            DeviceToken(who.user, device, body.platform, body.token, body.topic, body.sandbox, clock.time_ms())
        )
        return {"device": device, "platform": body.platform, "sandbox": body.sandbox}

    @app.delete(
        "/v1/devices/{device}/push", status_code=204, responses=error_responses, summary="Stop pushing to this device"
    )
    async def delete_push_token(device: IdPath, who: Caller) -> Response:
        if device != who.device:
            raise RequestError(ErrorCode.FORBIDDEN, "remove the push token of your own device")
        if not await pushes().delete_device_token(who.user, device):
            raise RequestError(ErrorCode.NOT_FOUND, "no push token for this device")
        return Response(status_code=204)

    @app.get("/v1/me/settings", response_model=PrivacyOut, responses=error_responses, summary="Your privacy settings")
    async def get_my_settings(who: Caller) -> dict[str, Any]:
        settings = (await store.user_settings([who.user])).get(who.user, default_settings)
        return {"who_may_add_me": settings.who_may_add, "presence": settings.presence}

    @app.put(
        "/v1/me/settings",
        response_model=PrivacyOut,
        responses=error_responses,
        summary="Who may add you to groups and channels; who sees you online",
    )
    async def put_my_settings(body: PrivacyIn, who: Caller) -> dict[str, Any]:
        current = (await store.user_settings([who.user])).get(who.user, default_settings)
        settings = UserSettings(
            who_may_add=body.who_may_add_me or current.who_may_add, presence=body.presence or current.presence
        )
        if settings.presence != current.presence:
            require_broker()
        await store.set_user_settings(who.user, settings)
        if settings.presence != current.presence:
            # The broker's ACL forgets its answers about this user and checks every presence
            # subscription to them again (a hidden user's followers stop hearing of them at once).
            change = {"conv": "", "kind": "settings", "added": [], "removed": [who.user]}
            await publish([Outgoing(MEMBERSHIP_TOPIC, encode(change))])
        return {"who_may_add_me": settings.who_may_add, "presence": settings.presence}

    @app.put(
        "/v1/conversations/{conv}/settings",
        response_model=SettingsOut,
        responses=error_responses,
        summary="Mute a conversation (yours) or mark it end-to-end encrypted (everyone's)",
    )
    async def put_settings(conv: ConvPath, body: SettingsIn, who: Caller) -> dict[str, Any]:
        parsed = parse_conv(conv)
        if parsed is None:
            raise RequestError(ErrorCode.BAD_CONV, "not a conversation id")
        store_ = pushes()
        if parsed.kind == "group":
            member = await membership(conv, who)
            if body.e2e is not None and member.role != "admin":
                raise RequestError(ErrorCode.FORBIDDEN, "only the group's admins may change its encryption flag")
        else:
            await require_member(store, who.user, parsed)
        if body.muted is not None:
            await store_.set_muted(who.user, parsed.id, body.muted)
        if body.e2e is not None:
            await store_.set_e2e(parsed.id, body.e2e)
        muted, e2e = await store_.settings(who.user, parsed.id)
        return {"conv": parsed.id, "muted": muted, "e2e": e2e}

    @app.get("/healthz", summary="Health: 200 when the bridge reaches the broker and every worker runs, else 503")
    async def healthz() -> JSONResponse:
        dead = dead_workers()
        if dead:
            body = {"status": "unhealthy", "dead_workers": dead, "version": __version__}
            return JSONResponse(body, status_code=503)
        if broker_connected():
            return JSONResponse({"status": "ok", "broker": "connected", "version": __version__})
        return JSONResponse({"status": "degraded", "broker": "disconnected", "version": __version__}, status_code=503)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def prometheus_metrics() -> Response:
        return Response(metrics_payload(), media_type=CONTENT_TYPE_LATEST)

    def openapi() -> dict[str, Any]:
        """FastAPI's document, less the 422 answers it adds to every route: this server answers
        a bad request with 400 and an ErrorBody (see on_validation_error), never with 422."""
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            for operations in document.get("paths", {}).values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            schemas = document.get("components", {}).get("schemas", {})
            for unused in ("HTTPValidationError", "ValidationError"):
                schemas.pop(unused, None)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    # Outermost last: Authenticate runs first, then BodyLimit, then the routes.
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(Authenticate, verifier=verifier, limiter=RateLimiter(http_limit, clock=clock))
    return app
