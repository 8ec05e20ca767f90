"""The app factory: services built over the store's parts, routers included, edge middleware added."""

from collections.abc import Awaitable, Callable, Collection
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from bridge.accounts import AccountDeletions, AccountService, ConnectedDevices
from bridge.broker_hooks import BrokerHooks
from bridge.devices import DeviceService
from bridge.groups import BrokerLink, GroupService, no_publish
from bridge.history import History
from bridge.http import accounts as account_routes
from bridge.http import devices as device_routes
from bridge.http import groups as group_routes
from bridge.http import health as health_routes
from bridge.http import hooks as hook_routes
from bridge.http import media as media_routes
from bridge.http import presence as presence_routes
from bridge.http import settings as settings_routes
from bridge.http.context import ApiContext
from bridge.http.edge import Authenticate, BodyLimit
from bridge.http.errors import install_error_handlers
from bridge.http.sync import sync_router
from bridge.http.webapp import NO_WEBSOCKET, DevTokens, MqttWebSocket, web_app_router
from bridge.media.service import MediaService
from bridge.outgoing import Outgoing
from bridge.ratelimit import UNLIMITED, RateLimit, RateLimiter
from bridge.settings import SettingsService
from bridge.visibility import PresenceLookup, Visibility
from mqchat import __version__
from mqchat.clock import SYSTEM_CLOCK, Clock
from mqchat.tokens import TokenVerifier
from storage.base import MessageStore, PushStore
from storage.records import DEFAULT_SETTINGS, UserSettings
from storage.revocations import Revocations


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
    publish: Callable[[list[Outgoing]], Awaitable[None]] = no_publish,
    presence: PresenceLookup | None = None,
    push_store: PushStore | None = None,
    clock: Clock = SYSTEM_CLOCK,
    node: str = "",
    hooks_credential: str = "",
    admin_credential: str = "",
    revocations: Revocations | None = None,
    connected_devices: ConnectedDevices | None = None,
    media: MediaService | None = None,
    web_app_dir: Path | None = None,
    mqtt_websocket: MqttWebSocket = NO_WEBSOCKET,
    dev_tokens: DevTokens | None = None,
) -> FastAPI:
    """Build the ASGI app over the given stores and token verifier; each service receives the
    parts of the store it uses.

    ``hooks_credential`` is what an external broker presents to the broker hooks ("": they answer
    401 to everyone); ``node`` names this node in /healthz and labels every /metrics sample ("": no label);
    ``broker_connected`` tells /healthz whether the bridge currently reaches the broker, and
    ``dead_workers`` which background workers have died (any: /healthz answers 503);
    ``publish`` sends events (membership changes) to devices through the adapter;
    ``admin_credential`` opens the admin API ("": closed to everyone); ``revocations`` refuses the
    tokens of logged-out devices (default: read from ``store`` for this app alone);
    ``connected_devices`` tells the admin API which devices are connected (default: none known);
    ``media`` serves uploads and downloads (None: the media routes answer 503);
    ``web_app_dir`` holds the built web chat, served under /app (None: /app answers 404), which
    connects to ``mqtt_websocket``; ``dev_tokens`` opens the dev sign-in (None: 404; see
    bridge.http.webapp); ``presence`` answers ``GET /v1/presence`` (None: 503);
    ``http_limit`` is each user's budget of authenticated calls (over it: 429 with
    ``Retry-After``); ``max_body_bytes`` the largest request body (413 beyond). Both, and
    authentication, are checked before a body is read (bridge.http.edge).
    """
    broker = BrokerLink(publish=publish, connected=broker_connected)
    group_service = GroupService(
        groups=store,
        privacy=store,
        broker=broker,
        max_group_members=max_group_members,
        default_settings=default_settings,
        clock=clock,
    )
    revocations = revocations or Revocations(accounts=store)
    accounts = AccountService(
        accounts=store,
        states=store,
        groups=group_service,
        push_store=push_store,
        revocations=revocations,
        broker=broker,
        connected=connected_devices or _none_connected,
        clock=clock,
        media=media,
    )
    app = FastAPI(
        title="mqchat",
        version=__version__,
        description="HTTP API of mqchat: history and catch-up. The MQTT side is in docs/protocol.md.",
    )
    app.state.api = ApiContext(
        history=History(log=store, states=store, groups=store),
        groups=group_service,
        settings=SettingsService(
            groups=store, privacy=store, broker=broker, push_settings=push_store, default_settings=default_settings
        ),
        devices=DeviceService(tokens=push_store, clock=clock),
        visibility=Visibility(groups=store, privacy=store, lookup=presence),
        hooks=BrokerHooks(
            verifier=verifier,
            revocations=revocations,
            hooks_credential=hooks_credential,
            groups=store,
            privacy_settings=store,
        ),
        broker_connected=broker_connected,
        dead_workers=dead_workers,
        node=node,
        accounts=accounts,
        deletions=AccountDeletions(service=accounts, accounts=store),
        admin_credential=admin_credential,
        media=media,
    )
    install_error_handlers(app)
    app.include_router(sync_router(max_limit=history_max_limit))
    for routes in (
        group_routes,
        presence_routes,
        device_routes,
        settings_routes,
        account_routes,
        health_routes,
        hook_routes,
        media_routes,
    ):
        app.include_router(routes.router)
    app.include_router(account_routes.admin)
    app.include_router(web_app_router(web_app_dir, mqtt_websocket, dev_tokens))
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    # Outermost last: Authenticate runs first, then BodyLimit, then the routes.
    # An upload's bytes stream to the object store (their limits are the upload's own).
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes, streamed=("PATCH", media_routes.UPLOAD_PATH))
    app.add_middleware(
        Authenticate, verifier=verifier, limiter=RateLimiter(http_limit, clock=clock), revocations=revocations
    )
    return app


async def _none_connected(user: str) -> Collection[str]:
    return frozenset()


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, less the 422 answers it adds to every route: this server answers
    a bad request with 400 and an ErrorBody (bridge.http.errors), never with 422."""
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
