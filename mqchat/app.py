"""Wiring: the one place that puts broker, bridge, store and HTTP API together, one process at a time.

::

    mqchat serve ──▶ mqchat.supervisor ──spawn/restart──▶ mqchat.child.run_child(broker | bridge | node)

    [broker]  run_broker: presence registry + store (membership answers) ──▶ amqtt + plugins  :mqtt_port

    [bridge]  run_bridge (--adapter mqtt): presence (Redis registry or PresenceMirror) ─▶ storage
              ─▶ push dispatcher ─▶ MqttPublisher ─▶ receipts + Pipeline ─▶ MqttClientAdapter
              ─▶ HTTP API (uvicorn)                                                         :http_port

    [node]    run_node (--adapter inbroker): presence registry ─▶ storage ─▶ push dispatcher
              ─▶ RequestQueue ─▶ broker (inbound hook: RequestQueue.submit) ─▶ BrokerPublisher
              ─▶ receipts + Pipeline ─▶ InBrokerAdapter ─▶ HTTP API

Each arrow is "built before": a part receives what it uses through its constructor, so the
publisher exists before the pipeline whose receipts it carries, and nothing is bound late.
Parts close in the reverse order (the HTTP API first, the stores and presence last). A device's
request in a node goes: broker reader ─▶ ``RequestQueue.submit`` ─▶ ``InBrokerAdapter`` (a job
per request) ─▶ ``Pipeline.handle`` ─▶ ``BrokerPublisher.publish`` ─▶ the broker's routing.

The MQTT-client adapter runs beside any broker (here in its own process, so both cores work);
the in-broker adapter saves the MQTT hop between broker and bridge. A child process runs until
a signal or until one of its workers dies (``mqchat.child``; the supervisor restarts it).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import uvicorn

from bridge.accounts import AccountDeletions
from bridge.http import PresenceLookup, create_app
from bridge.http.edge import HeaderTimeoutProtocol
from bridge.http.webapp import DevTokens, MqttWebSocket, is_loopback_host
from bridge.inbroker_adapter import BrokerPublisher, InBrokerAdapter, RequestQueue
from bridge.media.collector import MediaCollector
from bridge.media.service import MediaService
from bridge.mqtt_adapter import MqttClientAdapter, MqttPublisher
from bridge.outgoing import Outgoing
from bridge.pipeline import Pipeline, RequestLimits
from bridge.presence import PresenceMirror
from bridge.ratelimit import RateLimit
from bridge.receipts import Publish, ReceiptCoalescer
from broker.limits import BrokerLimits
from broker.membership import MembershipCache
from broker.serve import Listeners, serve_broker
from broker.server import InboundHook, MqchatBroker
from mqchat.config import Config
from mqchat.errors import ConfigError
from mqchat.internal_topics import LOGOUT_TOPIC, MEMBERSHIP_TOPIC
from mqchat.service import Service
from mqchat.tasks import STOP_BOUND_S
from mqchat.tls import ServerTls, TlsWatcher, server_tls
from mqchat.tokens import TokenVerifier, admin_credential, hooks_credential, service_password, verifier_for
from push.apns import ApnsProvider
from push.base import PushConfigError, PushProvider
from push.dispatcher import ConnectedDevices, PushDispatcher
from push.fcm import FcmProvider
from push.log import LogProvider
from storage import open_storage
from storage.base import MessageStore, Storage
from storage.objects import open_object_store
from storage.presence import MemoryPresence, PresenceRegistry, Routed
from storage.records import UserSettings
from storage.revocations import Revocations

logger = logging.getLogger(__name__)


def local_host(host: str) -> str:
    """Where a process on this machine reaches a server bound to host."""
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


# --- HTTP ------------------------------------------------------------------------------------


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: our process owns signals."""

    def capture_signals(self) -> Any:
        return nullcontext()


def bind_tcp(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A TCP socket bound the way our servers bind (SO_REUSEADDR: a port in TIME_WAIT is free);
    raises OSError when the address cannot be used. reuse_port: processes that all bind the port
    share its connections (SO_REUSEPORT; the kernel spreads them)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


class HttpServer(Service):
    """uvicorn serving ``app`` on a socket bound here: a service whose one worker is the server.
    Entered, it listens (``port``); ``aclose()`` asks it to stop and waits for its graceful end
    (bounded), closing the socket last."""

    name = "HTTP API"

    def __init__(
        self,
        *,
        app: Any,
        host: str,
        port: int,
        max_connections: int = 1000,
        header_timeout_s: float = 10.0,
        reuse_port: bool = False,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__()
        self._reuse_port = reuse_port
        self.kind = "https" if tls is not None else "http"
        protocol = type("_Protocol", (HeaderTimeoutProtocol,), {"header_timeout_s": header_timeout_s})
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="warning",
            lifespan="off",
            access_log=False,
            http=protocol,
            limit_concurrency=max_connections,
            timeout_keep_alive=5,
        )
        config.load()
        config.ssl = tls  # the process's shared context (mqchat.tls), reloaded in place
        self._server = _Server(config)
        self._host = host
        self._port = port
        self._sock: socket.socket | None = None
        self._serving: asyncio.Task[None] | None = None
        self.port = 0

    async def _start(self) -> None:
        # Bound here, not by uvicorn: a failure is an OSError of ours (uvicorn would log it and
        # call sys.exit inside its task).
        self._sock = bind_tcp(self._host, self._port, reuse_port=self._reuse_port)
        self._serving = self.start_worker(self._server.serve(sockets=[self._sock]), name="http-server")
        while not self._server.started:
            if self._serving.done():
                raise RuntimeError("the HTTP server stopped during start-up (its error is logged above)")
            await asyncio.sleep(0.01)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        logger.info("HTTP API listening on %s://%s:%d", self.kind, self._host, self.port)

    async def _stopping(self) -> None:
        self._server.should_exit = True
        if self._serving is not None:
            await asyncio.wait([self._serving], timeout=STOP_BOUND_S)

    async def _stopped(self) -> None:
        if self._sock is not None:
            self._sock.close()


# --- the web chat ----------------------------------------------------------------------------

WEB_APP_DIR = Path(__file__).resolve().parent.parent / "clients" / "js" / "app" / "dist"
"""The web chat's build, committed to the repository (``make app`` rebuilds and checks it)."""


def built_web_app(directory: Path = WEB_APP_DIR) -> Path | None:
    """The web chat's directory when it holds a build (its index.html), else None: not served."""
    return directory if (directory / "index.html").is_file() else None


def mqtt_websocket(config: Config, bound: dict[str, int] | None = None) -> MqttWebSocket:
    """Where the web chat reaches MQTT: this node's WebSocket listeners, by the ports the broker
    bound (``bound``) or else the configured ones (an ephemeral 0 is not known here: None);
    none beside an external broker."""
    if config.bridge.broker:
        return MqttWebSocket()
    ports = config.network.listener_ports()
    if bound is not None:
        ports = {kind: bound.get(kind) if port is not None else None for kind, port in ports.items()}
    return MqttWebSocket(ws_port=ports["ws"] or None, wss_port=ports["wss"] or None, path=config.network.ws_path)


def dev_sign_in_open(config: Config) -> bool:
    """Dev mode, where the web chat's dev sign-in mints tokens for anyone: the server runs on the
    secret it generated in its data dir (no configured secret, key or JWKS), listens on a
    loopback host only (127.0.0.0/8, ::1, localhost), and without TLS. Anything that looks like
    production keeps it closed."""
    net = config.network
    return config.auth.dev_secret and is_loopback_host(net.host) and not net.tls_cert


def dev_tokens(config: Config) -> DevTokens | None:
    """The dev sign-in in dev mode (see dev_sign_in_open), else None (it answers 404)."""
    if not dev_sign_in_open(config):
        return None
    auth = config.auth
    return DevTokens(secret=auth.jwt_secret, issuer=auth.jwt_issuer, audience=auth.jwt_audience)


# --- presence --------------------------------------------------------------------------------


def presence_registry(config: Config) -> PresenceRegistry:
    """The configured registry: in memory (one process) or Redis (shared by every process)."""
    settings = config.presence
    if not settings.redis_url:
        return MemoryPresence(grace_s=settings.grace_s)
    try:
        from storage.redis_presence import RedisPresence, redis_target
    except ImportError:
        raise ConfigError("--redis-url needs redis-py: pip install 'mqchat[redis]'") from None
    logger.info("presence shared through Redis at %s", redis_target(settings.redis_url))
    # This process's name in the registry: the node id, and an incarnation of its own, so that a
    # node restarted after a crash is not taken for the one whose devices are still registered.
    incarnation = f"{config.network.node}/{secrets.token_hex(4)}"
    return RedisPresence(settings.redis_url, grace_s=settings.grace_s, ttl_s=settings.ttl_s, node=incarnation)


# --- push ------------------------------------------------------------------------------------


@asynccontextmanager
async def push_providers(config: Config) -> AsyncIterator[dict[str, PushProvider]]:
    """The configured providers, started; a platform without settings only logs its pushes. A
    provider that cannot work is reported once, loudly, and its platform is left out."""
    settings = config.push
    chosen: dict[str, PushProvider] = {}
    try:
        if settings.apns_configured:
            chosen["apns"] = ApnsProvider(
                key_file=settings.apns_key_file or None,
                key_id=settings.apns_key_id,
                team_id=settings.apns_team_id,
                topic=settings.apns_topic,
                use_sandbox=True if settings.apns_sandbox else None,  # else per token, as registered
                host=settings.apns_host or None,
                sandbox_host=settings.apns_host or None,
                port=settings.apns_port,
                ca_file=settings.apns_ca_file or None,
            )
        else:
            chosen["apns"] = LogProvider("apns")
    except PushConfigError as exc:
        logger.error("PUSH MISCONFIGURED: APNs disabled: %s", exc)
    try:
        if settings.fcm_credentials:
            chosen["fcm"] = FcmProvider(
                service_account_file=settings.fcm_credentials,
                project_id=settings.fcm_project_id or None,
                endpoint=settings.fcm_endpoint,
            )
        else:
            chosen["fcm"] = LogProvider("fcm")
    except PushConfigError as exc:
        logger.error("PUSH MISCONFIGURED: FCM disabled: %s", exc)
    started: dict[str, PushProvider] = {}
    try:
        for platform, provider in chosen.items():
            try:
                await provider.start()
                started[platform] = provider
            except PushConfigError as exc:
                logger.error("PUSH MISCONFIGURED: %s disabled: %s", platform, exc)
                await provider.aclose()
        logger.info("push: %s", ", ".join(f"{p} via {type(v).__name__}" for p, v in started.items()) or "off")
        yield started
    finally:
        for provider in started.values():
            with contextlib.suppress(Exception):
                await provider.aclose()


# --- the parts of a bridge -------------------------------------------------------------------


class Adapter(Protocol):
    def is_connected(self) -> bool: ...

    def dead_workers(self) -> list[str]: ...

    async def publish(self, outgoing: list[Outgoing]) -> None: ...


class HasWorkers(Protocol):
    def dead_workers(self) -> list[str]: ...


def dead_workers_of(*parts: HasWorkers) -> Callable[[], list[str]]:
    """One answer for /healthz and the watchdog: the dead workers of every part."""
    return lambda: [name for part in parts for name in part.dead_workers()]


@dataclass(frozen=True, slots=True)
class BridgeHandle:
    http_port: int
    adapter: Adapter
    store: MessageStore
    # Every part's dead workers, the HTTP server's included: the watchdog's answer (/healthz
    # answers for the parts behind the API).
    dead_workers: Callable[[], list[str]]
    mqtt_port: int = 0  # set when the broker runs in the same process (in-broker adapter)
    ports: dict[str, int] = dataclasses.field(default_factory=dict)  # every listener's bound port, by kind
    tls: ServerTls | None = None  # the process's TLS (SIGHUP reloads it)


@asynccontextmanager
async def push_dispatcher(
    config: Config, storage: Storage, connected_devices: ConnectedDevices
) -> AsyncIterator[PushDispatcher]:
    """The configured providers, started, and the dispatcher that feeds them."""
    async with (
        push_providers(config) as providers,
        PushDispatcher(
            states=storage.messages,
            groups=storage.messages,
            push_store=storage.push,
            connected_devices=connected_devices,
            providers=providers,
            window_s=config.push.window_s,
            max_per_s=config.push.max_per_s,
        ) as dispatcher,
    ):
        yield dispatcher


@asynccontextmanager
async def media_parts(config: Config, storage: Storage) -> AsyncIterator[tuple[MediaService, MediaCollector]]:
    """The configured object store, the media service over it and the store's media index, and
    the collector of expired uploads and unsent files."""
    if config.media.backend == "local" and not config.media.directory and config.storage.backend != "sqlite":
        logger.warning(
            "media are kept in this node's own directory (%s) while the store is shared: every node of a "
            "fleet must see the same files (media_backend = s3, or media_dir on a shared mount)",
            config.storage.data_dir / "media",
        )
    async with open_object_store(config.media, config.storage.data_dir) as objects:
        media = MediaService(
            index=storage.messages,
            objects=objects,
            groups=storage.messages,
            config=config.media,
            scratch=config.storage.data_dir / "media-spool",
        )
        async with MediaCollector(media=media, index=storage.messages) as collector:
            yield media, collector


@asynccontextmanager
async def bridge_pipeline(
    config: Config, storage: Storage, dispatcher: PushDispatcher, publish: Publish, media: MediaService
) -> AsyncIterator[Pipeline]:
    """The pipeline, with its receipt coalescer publishing through ``publish``; open windows
    flush when the block ends."""
    bridge = config.bridge
    async with ReceiptCoalescer(publish=publish, window_s=bridge.receipt_window_s) as receipts:
        yield Pipeline(
            log=storage.messages,
            states=storage.messages,
            groups=storage.messages,
            receipts=receipts,
            max_envelope_bytes=bridge.max_envelope_bytes,
            on_stored=dispatcher.notify,
            limits=RequestLimits(
                device_sends=RateLimit(bridge.send_rate, bridge.send_burst),
                user_sends=RateLimit(bridge.user_send_rate, bridge.user_send_burst),
                device_receipts=RateLimit(bridge.receipt_rate, bridge.receipt_burst),
            ),
            media=media,
        )


def serve_api(
    config: Config,
    storage: Storage,
    adapter: Adapter,
    presence: PresenceLookup,
    dead_workers: Callable[[], list[str]],
    tls: ServerTls | None = None,
    *,
    verifier: TokenVerifier,
    revocations: Revocations,
    connected: Callable[[str], Awaitable[frozenset[str]]],
    media: MediaService,
    web_app_dir: Path | None = None,
    websocket: MqttWebSocket | None = None,
) -> ApiParts:
    """The HTTP API over the store, publishing through the adapter: a server (a service: enter it
    to serve; ``port`` is the port bound) per open listener, plain HTTP and HTTPS. Tokens are
    checked by verifier, which the caller runs (see verifier_for). ``web_app_dir``: the web chat
    served under /app (None: not served), connecting to ``websocket`` (default: the configured
    listeners); the dev sign-in opens in dev mode only (see dev_tokens)."""
    app = create_app(
        presence=presence,
        push_store=storage.push,
        store=storage.messages,
        verifier=verifier,
        history_max_limit=config.bridge.history_max_limit,
        max_group_members=config.bridge.max_group_members,
        broker_connected=adapter.is_connected,
        dead_workers=dead_workers,
        http_limit=RateLimit(config.bridge.http_rate, config.bridge.http_burst),
        max_body_bytes=config.bridge.http_max_body_bytes,
        default_settings=UserSettings(who_may_add=config.bridge.default_who_may_add),
        publish=adapter.publish,
        node=config.network.node,
        hooks_credential=hooks_credential(config.auth.jwt_secret),
        admin_credential=admin_credential(config.auth.jwt_secret),
        revocations=revocations,
        connected_devices=connected,
        media=media,
        web_app_dir=web_app_dir,
        mqtt_websocket=websocket or mqtt_websocket(config),
        dev_tokens=dev_tokens(config),
    )
    net = config.network
    ports = net.listener_ports()
    servers = []
    for kind in ("http", "https"):
        port = ports[kind]
        if port is None:
            continue
        servers.append(
            HttpServer(
                app=app,
                host=net.host,
                port=port,
                max_connections=config.bridge.http_max_connections,
                header_timeout_s=config.bridge.http_header_timeout_s,
                # The bridge workers beside an external broker all serve the one HTTP port.
                reuse_port=bool(config.bridge.broker) and config.bridge.workers > 1,
                tls=tls.context if kind == "https" and tls is not None else None,
            )
        )
    return ApiParts(deletions=app.state.api.deletions, servers=servers)


@dataclass(frozen=True, slots=True)
class ApiParts:
    """What serves the HTTP API: the account deletions it starts (and resumes), and a server per
    open listener."""

    deletions: AccountDeletions
    servers: list[HttpServer]


async def enter_tls(stack: contextlib.AsyncExitStack, config: Config) -> tuple[ServerTls | None, list[HasWorkers]]:
    """The process's TLS context (None without a certificate), reloaded while the stack is open,
    and the watcher that reloads it (for /healthz and the watchdog)."""
    net = config.network
    tls = server_tls(net.tls_cert, net.tls_key, net.tls_client_ca)
    if tls is None:
        return None, []
    return tls, [await stack.enter_async_context(TlsWatcher(tls))]


async def enter_api(stack: contextlib.AsyncExitStack, parts: ApiParts) -> tuple[list[Service], dict[str, int]]:
    """Start the API's parts; the services started and the servers' bound ports by kind (http, https)."""
    await stack.enter_async_context(parts.deletions)
    for server in parts.servers:
        await stack.enter_async_context(server)
    return [parts.deletions, *parts.servers], {server.kind: server.port for server in parts.servers}


# --- one process -----------------------------------------------------------------------------


@asynccontextmanager
async def run_bridge(
    config: Config,
    *,
    mqtt_host: str,
    mqtt_port: int,
    instance: int = 0,
    web_app_dir: Path | None = WEB_APP_DIR,
) -> AsyncIterator[BridgeHandle]:
    """The bridge beside a broker: storage + push + pipeline + MQTT-client adapter + HTTP API
    (with the web chat of ``web_app_dir`` when it holds a build). Presence comes from the shared
    registry (Redis) or, without one, from the broker's retained states (``PresenceMirror``).
    Beside an external broker (``config.bridge.broker``), this is worker ``instance`` of
    several, on a shared subscription."""
    async with contextlib.AsyncExitStack() as stack:
        tls, watchers = await enter_tls(stack, config)
        verifier = await stack.enter_async_context(verifier_for(config.auth))
        parts: list[HasWorkers] = [verifier]
        mirror: PresenceMirror | None = None
        if config.presence.redis_url:
            registry = await stack.enter_async_context(presence_registry(config))
            parts.append(registry)
            lookup: PresenceLookup = registry.lookup
            devices: Callable[[str], Awaitable[frozenset[str]]] = registry.devices
        else:
            mirror = PresenceMirror()
            lookup, devices = mirror.lookup, mirror.devices
        storage = await stack.enter_async_context(open_storage(config.storage))
        dispatcher = await stack.enter_async_context(push_dispatcher(config, storage, devices))
        media, collector = await stack.enter_async_context(media_parts(config, storage))
        publisher = MqttPublisher()
        pipeline = await stack.enter_async_context(
            bridge_pipeline(config, storage, dispatcher, publisher.publish, media)
        )
        adapter = await stack.enter_async_context(
            MqttClientAdapter(
                pipeline=pipeline,
                publisher=publisher,
                host=mqtt_host,
                port=mqtt_port,
                service_password=service_password(config.auth.jwt_secret),
                max_inflight=config.bridge.max_inflight,
                on_presence=mirror.update if mirror is not None else None,
                instance=instance,
                node=config.network.node,
                shared=bool(config.bridge.broker),
            )
        )
        dead = dead_workers_of(storage, dispatcher, adapter, collector, *parts, *watchers)
        api = serve_api(
            config,
            storage,
            adapter,
            lookup,
            dead,
            tls,
            verifier=verifier,
            revocations=Revocations(accounts=storage.messages),
            connected=devices,
            media=media,
            web_app_dir=built_web_app(web_app_dir) if web_app_dir is not None else None,
        )
        http, ports = await enter_api(stack, api)
        yield BridgeHandle(
            http_port=ports.get("http", 0),
            adapter=adapter,
            store=storage.messages,
            dead_workers=dead_workers_of(storage, dispatcher, adapter, collector, *parts, *watchers, *http),
            ports=ports,
            tls=tls,
        )


@dataclass(frozen=True, slots=True)
class BrokerHandle:
    broker: MqchatBroker
    mqtt_port: int
    store: MessageStore
    # The broker's dead workers, its store's and its presence registry's: the watchdog's answer.
    dead_workers: Callable[[], list[str]]
    ports: dict[str, int] = dataclasses.field(default_factory=dict)  # every listener's bound port, by kind
    tls: ServerTls | None = None  # the process's TLS (SIGHUP reloads it)


def relay_target(topic: str) -> tuple[bool, str | None]:
    """Whether other nodes' devices may want a publish on topic, and whose: a user's (their
    ``u/{user}/in``) or everyone's (None: channel posts, membership changes). A device's own
    topic carries answers to that device, which is on this node; presence transitions reach
    every node's broker through the registry itself."""
    parts = topic.split("/")
    if len(parts) == 3 and parts[0] == "u" and parts[2] == "in":
        return True, parts[1]
    if parts[0] == "c" or topic in (MEMBERSHIP_TOPIC, LOGOUT_TOPIC):
        return True, None
    return False, None


def cluster_relay(config: Config, presence: PresenceRegistry) -> Callable[[list[Outgoing]], None] | None:
    """What relays a node's publishes to the devices on other nodes: with Redis, and a store the
    nodes share (nodes each on their own SQLite file number the same conversation apart: their
    events must not meet)."""
    if not config.presence.redis_url or config.storage.backend == "sqlite":
        return None

    def relay(outgoing: list[Outgoing]) -> None:
        routed: list[Routed] = []
        for out in outgoing:
            wanted, user = relay_target(out.topic)
            if wanted:
                routed.append((user, (out.topic, out.payload, out.qos)))
        presence.relay(routed)

    return relay


def broker_listeners(config: Config) -> Listeners:
    """Where the broker listens, by the configuration."""
    net = config.network
    ports = net.listener_ports()
    return Listeners(
        host=net.host, mqtt=ports["mqtt"], mqtts=ports["mqtts"], ws=ports["ws"], wss=ports["wss"], ws_path=net.ws_path
    )


def broker_ports(config: Config, broker: MqchatBroker) -> dict[str, int]:
    """The broker's bound ports by kind (mqtt, mqtts, ws, wss)."""
    names = broker_listeners(config).names()
    return {kind: broker.listener_port(name) or 0 for kind, name in names.items()}


def broker_limits(config: Config) -> BrokerLimits:
    """The broker's bounds that the configuration sets (the rest keep their defaults)."""
    return BrokerLimits(
        listen_backlog=config.network.mqtt_backlog,
        max_connections=config.network.mqtt_max_connections,
        connects_per_ip_per_s=config.network.mqtt_connect_rate,
    )


def configured_broker(
    config: Config,
    *,
    tls: ServerTls | None,
    verifier: TokenVerifier,
    presence: PresenceRegistry,
    store: MessageStore,
    revocations: Revocations,
    inbound_hook: InboundHook | None = None,
    device_topics: bool = False,
) -> AbstractAsyncContextManager[MqchatBroker]:
    """The broker as the configuration says (listeners, TLS, limits, token grace), its ACL
    answered from store."""
    return serve_broker(
        listeners=broker_listeners(config),
        tls=tls.context if tls is not None else None,
        secret=config.auth.jwt_secret,
        verifier=verifier,
        limits=broker_limits(config),
        inbound_hook=inbound_hook,
        presence=presence,
        membership=MembershipCache(groups=store, privacy=store),
        device_topics=device_topics,
        revocations=revocations,
        token_grace_s=config.auth.token_grace_s,
    )


@asynccontextmanager
async def run_broker(config: Config) -> AsyncIterator[BrokerHandle]:
    """The broker alone; it reads the store only for its ACL (membership and privacy answers)."""
    async with contextlib.AsyncExitStack() as stack:
        tls, watchers = await enter_tls(stack, config)
        verifier = await stack.enter_async_context(verifier_for(config.auth))
        storage = await stack.enter_async_context(open_storage(config.storage, push=False))
        presence = await stack.enter_async_context(presence_registry(config))
        broker = await stack.enter_async_context(
            configured_broker(
                config,
                tls=tls,
                verifier=verifier,
                presence=presence,
                store=storage.messages,
                revocations=Revocations(accounts=storage.messages),
                device_topics=not config.presence.redis_url,  # the bridge's only view of devices then
            )
        )
        # Events other nodes relay for this broker's devices (a node running broker and bridge in
        # one process relays its own; see run_node), until the broker stops.
        presence.relay_to(lambda event: broker.internal_message_broadcast(*event))
        try:
            yield BrokerHandle(
                broker=broker,
                mqtt_port=broker.bound_port,
                store=storage.messages,
                dead_workers=dead_workers_of(storage, presence, broker, verifier, *watchers),
                ports=broker_ports(config, broker),
                tls=tls,
            )
        finally:
            presence.relay_to(None)


@asynccontextmanager
async def run_node(config: Config, *, web_app_dir: Path | None = WEB_APP_DIR) -> AsyncIterator[BridgeHandle]:
    """Broker and bridge in one process: the in-broker adapter, no MQTT hop between them. The
    broker hands each device's request to the ``RequestQueue``; its ``BrokerPublisher`` carries
    replies and receipts back; the ``InBrokerAdapter`` joins the two through the pipeline. The
    HTTP API serves the web chat of ``web_app_dir`` when it holds a build."""
    async with contextlib.AsyncExitStack() as stack:
        tls, watchers = await enter_tls(stack, config)
        verifier = await stack.enter_async_context(verifier_for(config.auth))
        presence = await stack.enter_async_context(presence_registry(config))
        storage = await stack.enter_async_context(open_storage(config.storage))
        dispatcher = await stack.enter_async_context(push_dispatcher(config, storage, presence.devices))
        queue = RequestQueue()
        revocations = Revocations(accounts=storage.messages)  # the broker's and the API's
        broker = await stack.enter_async_context(
            configured_broker(
                config,
                tls=tls,
                verifier=verifier,
                presence=presence,
                store=storage.messages,
                revocations=revocations,
                inbound_hook=queue.submit,
            )
        )
        publisher = BrokerPublisher(route=broker.internal_message_broadcast, relay=cluster_relay(config, presence))
        presence.relay_to(lambda event: broker.internal_message_broadcast(*event))
        stack.callback(presence.relay_to, None)  # before the broker stops
        media, collector = await stack.enter_async_context(media_parts(config, storage))
        pipeline = await stack.enter_async_context(
            bridge_pipeline(config, storage, dispatcher, publisher.publish, media)
        )
        adapter = await stack.enter_async_context(
            InBrokerAdapter(
                pipeline=pipeline, requests=queue, publisher=publisher, max_inflight=config.bridge.max_inflight
            )
        )
        dead = dead_workers_of(storage, dispatcher, adapter, collector, presence, broker, verifier, *watchers)
        http, ports = await enter_api(
            stack,
            serve_api(
                config,
                storage,
                adapter,
                presence.lookup,
                dead,
                tls,
                verifier=verifier,
                revocations=revocations,
                connected=presence.devices,
                media=media,
                web_app_dir=built_web_app(web_app_dir) if web_app_dir is not None else None,
                websocket=mqtt_websocket(config, broker_ports(config, broker)),
            ),
        )
        yield BridgeHandle(
            http_port=ports.get("http", 0),
            adapter=adapter,
            store=storage.messages,
            dead_workers=dead_workers_of(
                storage, dispatcher, adapter, collector, presence, broker, verifier, *watchers, *http
            ),
            mqtt_port=broker.bound_port,
            ports=ports | broker_ports(config, broker),
            tls=tls,
        )
