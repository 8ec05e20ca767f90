"""Wiring: the one place that puts broker, bridge, store and HTTP API together.

::

    mqchat serve ──▶ Supervisor ──spawn/restart──▶ [broker]  amqtt + plugins        :mqtt_port
                         (--adapter mqtt)  └──────▶ [bridge]  MQTT-client adapter ──▶ Pipeline ──▶ SQLite
                                                              HTTP API (uvicorn)      :http_port

                         (--adapter inbroker) ────▶ [node]    broker ──inbound hook──▶ Pipeline ──▶ SQLite
                                                              HTTP API

The MQTT-client adapter runs beside any broker (here in its own process, so both cores work);
the in-broker adapter saves the MQTT hop between broker and bridge. The supervisor restarts a
crashed child (logged) and stops them cleanly on Ctrl-C / SIGTERM. Children get their settings
as ``MQCHAT_*`` environment variables and write Prometheus samples to a shared directory, so
``/metrics`` covers every process.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import uvicorn

from bridge.http import PresenceLookup, create_app
from bridge.http_edge import HeaderTimeoutProtocol
from bridge.inbroker_adapter import InBrokerAdapter
from bridge.mqtt_adapter import MqttClientAdapter
from bridge.outgoing import Outgoing
from bridge.pipeline import Pipeline, RequestLimits
from bridge.presence import PresenceMirror
from bridge.ratelimit import RateLimit
from bridge.receipts import ReceiptCoalescer
from broker.membership import MembershipCache
from broker.server import MqchatBroker, serve_broker, tune_gc
from mqchat.config import Config, config_to_env
from mqchat.errors import ConfigError, MqchatError
from mqchat.tokens import TokenVerifier, service_password
from push.dispatcher import ConnectedDevices, PushDispatcher
from push.providers import ApnsProvider, FcmProvider, LogProvider, PushConfigError, PushProvider
from storage.base import MessageStore, UserSettings
from storage.files import private_dir
from storage.presence import MemoryPresence, PresenceRegistry
from storage.push_store import SqlitePushStore
from storage.sqlite import SqliteMessageStore

logger = logging.getLogger(__name__)


def children_for(config: Config) -> tuple[str, ...]:
    """The processes `serve` runs: broker and bridge apart (MQTT-client adapter) or one node."""
    return ("node",) if config.bridge.adapter == "inbroker" else ("broker", "bridge")


RESTART_BACKOFF_MAX_S = 10.0
STOP_GRACE_S = 10.0
# A child that cannot start for a reason a restart would not mend (bad settings, a port in use)
# exits with this code (sysexits' EX_CONFIG), and the supervisor stops instead of restarting it.
EXIT_CANNOT_START = 78
EXIT_WORKER_DIED = 70  # sysexits' EX_SOFTWARE: restarted like any crash
WATCHDOG_EVERY_S = 1.0
WATCHDOG_GRACE_S = 2.0


BIND_ERRNOS = (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES)


def _not_a_bind_failure(record: logging.LogRecord) -> bool:
    """amqtt logs a failed start with a traceback; an address that cannot be bound is reported
    by run_child in one line instead."""
    exc = record.exc_info[1] if record.exc_info else None
    return not (isinstance(exc, OSError) and exc.errno in BIND_ERRNOS)


def setup_logging(level: str, process: str) -> None:
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s %(levelname)-7s [{process}] %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    # amqtt logs every connection at INFO; transitions logs every state change.
    for noisy in ("amqtt", "transitions", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    logging.getLogger("amqtt.broker").addFilter(_not_a_bind_failure)


def local_host(host: str) -> str:
    """Where a process on this machine reaches a server bound to host."""
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


# --- HTTP ------------------------------------------------------------------------------------


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: our process owns signals."""

    def capture_signals(self) -> Any:
        return nullcontext()


@dataclass(frozen=True, slots=True)
class HttpHandle:
    port: int


def bind_tcp(host: str, port: int) -> socket.socket:
    """A TCP socket bound the way our servers bind (SO_REUSEADDR: a port in TIME_WAIT is free);
    raises OSError when the address cannot be used."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


@asynccontextmanager
async def serve_http(
    app: Any, *, host: str, port: int, max_connections: int = 1000, header_timeout_s: float = 10.0
) -> AsyncIterator[HttpHandle]:
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
    server = _Server(config)
    # Bound here, not by uvicorn: a failure is an OSError of ours (uvicorn would log it and call
    # sys.exit inside its task).
    sock = bind_tcp(host, port)
    task = asyncio.create_task(server.serve(sockets=[sock]), name="http-server")
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("HTTP server stopped during start-up")
            await asyncio.sleep(0.01)
        bound = server.servers[0].sockets[0].getsockname()[1]
        logger.info("HTTP API listening on http://%s:%d", host, bound)
        yield HttpHandle(port=bound)
    finally:
        server.should_exit = True
        try:
            await task
        finally:
            sock.close()


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
    return RedisPresence(settings.redis_url, grace_s=settings.grace_s, ttl_s=settings.ttl_s)


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


# --- bridge ----------------------------------------------------------------------------------


class Adapter(Protocol):
    def is_connected(self) -> bool: ...

    def dead_workers(self) -> list[str]: ...

    async def publish(self, outgoing: list[Outgoing]) -> None: ...


class _LateAdapter:
    """Stands for the adapter in what must exist before it (the pipeline's receipt coalescer)."""

    def __init__(self) -> None:
        self.target: Adapter | None = None

    async def publish(self, outgoing: list[Outgoing]) -> None:
        if self.target is not None:
            await self.target.publish(outgoing)


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
    dead_workers: Callable[[], list[str]]
    mqtt_port: int = 0  # set when the broker runs in the same process (in-broker adapter)


@dataclass(frozen=True, slots=True)
class _Core:
    store: SqliteMessageStore
    pipeline: Pipeline
    late: _LateAdapter
    push_store: SqlitePushStore
    dispatcher: PushDispatcher


@asynccontextmanager
async def _bridge_core(config: Config, connected_devices: ConnectedDevices) -> AsyncIterator[_Core]:
    """Store, push (store, providers, dispatcher), receipts and the pipeline."""
    async with contextlib.AsyncExitStack() as stack:
        store = await SqliteMessageStore.open(config.storage.sqlite_path)
        stack.push_async_callback(store.aclose)
        push_store = await SqlitePushStore.open(config.storage.data_dir / "push.sqlite3")
        stack.push_async_callback(push_store.aclose)
        providers = await stack.enter_async_context(push_providers(config))
        dispatcher = await stack.enter_async_context(
            PushDispatcher(
                store=store,
                push_store=push_store,
                connected_devices=connected_devices,
                providers=providers,
                window_s=config.push.window_s,
                max_per_s=config.push.max_per_s,
            )
        )
        late = _LateAdapter()
        receipts = await stack.enter_async_context(
            ReceiptCoalescer(publish=late.publish, window_s=config.bridge.receipt_window_s)
        )
        bridge = config.bridge
        pipeline = Pipeline(
            store=store,
            receipts=receipts,
            max_envelope_bytes=bridge.max_envelope_bytes,
            on_stored=dispatcher.notify,
            limits=RequestLimits(
                device_sends=RateLimit(bridge.send_rate, bridge.send_burst),
                user_sends=RateLimit(bridge.user_send_rate, bridge.user_send_burst),
                device_receipts=RateLimit(bridge.receipt_rate, bridge.receipt_burst),
            ),
        )
        yield _Core(store, pipeline, late, push_store, dispatcher)


@asynccontextmanager
async def _serve_api(
    config: Config,
    core: _Core,
    adapter: Adapter,
    presence: PresenceLookup,
    dead_workers: Callable[[], list[str]],
) -> AsyncIterator[HttpHandle]:
    store = core.store
    app = create_app(
        presence=presence,
        push_store=core.push_store,
        store=store,
        verifier=TokenVerifier(secret=config.auth.jwt_secret),
        history_max_limit=config.bridge.history_max_limit,
        max_group_members=config.bridge.max_group_members,
        broker_connected=adapter.is_connected,
        dead_workers=dead_workers,
        http_limit=RateLimit(config.bridge.http_rate, config.bridge.http_burst),
        max_body_bytes=config.bridge.http_max_body_bytes,
        default_settings=UserSettings(who_may_add=config.bridge.default_who_may_add),
        publish=adapter.publish,
    )
    async with serve_http(
        app,
        host=config.network.host,
        port=config.network.http_port,
        max_connections=config.bridge.http_max_connections,
        header_timeout_s=config.bridge.http_header_timeout_s,
    ) as http:
        yield http


@asynccontextmanager
async def run_bridge(config: Config, *, mqtt_host: str, mqtt_port: int) -> AsyncIterator[BridgeHandle]:
    """The bridge beside a broker: store + pipeline + MQTT-client adapter + HTTP API. Presence
    comes from the shared registry (Redis) or, without one, from the broker's retained states."""
    async with contextlib.AsyncExitStack() as stack:
        mirror: PresenceMirror | None = None
        registry: PresenceRegistry | None = None
        if config.presence.redis_url:
            registry = await stack.enter_async_context(presence_registry(config))
            lookup: PresenceLookup = registry.lookup
            devices: ConnectedDevices = registry.devices
        else:
            mirror = PresenceMirror()
            lookup, devices = mirror.lookup, mirror.devices
        core = await stack.enter_async_context(_bridge_core(config, devices))
        adapter = await stack.enter_async_context(
            MqttClientAdapter(
                pipeline=core.pipeline,
                host=mqtt_host,
                port=mqtt_port,
                service_password=service_password(config.auth.jwt_secret),
                max_inflight=config.bridge.max_inflight,
                on_presence=mirror.update if mirror is not None else None,
            )
        )
        parts: list[HasWorkers] = [core.store, core.dispatcher, adapter]
        if registry is not None:
            parts.append(registry)
        dead = dead_workers_of(*parts)
        http = await stack.enter_async_context(_serve_api(config, core, adapter, lookup, dead))
        core.late.target = adapter
        yield BridgeHandle(http_port=http.port, adapter=adapter, store=core.store, dead_workers=dead)


@asynccontextmanager
async def run_broker(config: Config) -> AsyncIterator[MqchatBroker]:
    """The broker alone; it reads the store only for its ACL's membership answers."""
    async with (
        await SqliteMessageStore.open(config.storage.sqlite_path) as store,
        presence_registry(config) as presence,
        serve_broker(
            host=config.network.host,
            port=config.network.mqtt_port,
            secret=config.auth.jwt_secret,
            presence=presence,
            membership=MembershipCache(store),
            device_topics=not config.presence.redis_url,  # the bridge's only view of devices then
        ) as broker,
    ):
        yield broker


@asynccontextmanager
async def run_node(config: Config) -> AsyncIterator[BridgeHandle]:
    """Broker and bridge in one process: the in-broker adapter, no MQTT hop between them."""
    async with presence_registry(config) as presence, _bridge_core(config, presence.devices) as core:
        store = core.store
        # The adapter publishes through the broker, and the broker feeds the adapter.
        broker_box: list[MqchatBroker] = []

        async def publish(topic: str, payload: bytes, qos: int) -> None:
            await broker_box[0].internal_message_broadcast(topic, payload, qos)

        async with (
            InBrokerAdapter(
                pipeline=core.pipeline, publish=publish, max_inflight=config.bridge.max_inflight
            ) as adapter,
            serve_broker(
                host=config.network.host,
                port=config.network.mqtt_port,
                secret=config.auth.jwt_secret,
                inbound_hook=adapter.submit,
                presence=presence,
                membership=MembershipCache(store),
            ) as broker,
        ):
            broker_box.append(broker)
            core.late.target = adapter
            dead = dead_workers_of(core.store, core.dispatcher, adapter, presence, broker)
            async with _serve_api(config, core, adapter, presence.lookup, dead) as http:
                yield BridgeHandle(
                    http_port=http.port, adapter=adapter, store=store, dead_workers=dead, mqtt_port=broker.bound_port
                )


# --- child processes -------------------------------------------------------------------------


def _run_until_signalled(body: Callable[[], Awaitable[None]]) -> None:
    async def main() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await body()

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())


def ensure_data_dir(config: Config) -> None:
    """Create the data dir (0700) if needed; raise ConfigError, naming it, when it cannot be used."""
    data_dir = config.storage.data_dir
    try:
        private_dir(data_dir)
    except OSError as exc:
        raise ConfigError(f"cannot use data_dir {data_dir}: {exc.strerror or exc}") from None
    if not os.access(data_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot use data_dir {data_dir}: not writable by this user")


def ensure_ports_free(config: Config) -> None:
    """Raise ConfigError, naming the setting, when a port `serve` listens on is taken or the
    address cannot be used (checked the way the servers bind: SO_REUSEADDR, so a port in
    TIME_WAIT is fine)."""
    net = config.network
    for key, port in (("mqtt_port", net.mqtt_port), ("http_port", net.http_port)):
        if port == 0:
            continue
        try:
            bind_tcp(net.host, port).close()
        except OSError as exc:
            raise ConfigError(_bind_failure(key, net.host, port, exc)) from None


def _bind_failure(key: str, host: str, port: int, exc: OSError) -> str:
    flag = "--" + key.replace("_", "-")
    if exc.errno == errno.EADDRINUSE:
        return f"port {port} on {host} is already in use (by another mqchat serve or MQTT broker?); use {flag} PORT"
    return f"cannot listen on {host}:{port} ({key}): {exc.strerror or exc}"


def cannot_start_reason(exc: BaseException) -> str | None:
    """Why a child cannot start, if a restart would not help: a configuration error or an address
    that cannot be bound, found anywhere in exc's groups, causes and contexts."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ConfigError | PushConfigError):
            return str(e)
        if isinstance(e, OSError) and e.errno in BIND_ERRNOS:
            return f"cannot listen: {e.strerror or e}"
        if isinstance(e, BaseExceptionGroup):
            todo.extend(e.exceptions)
        todo.extend(x for x in (e.__cause__, e.__context__) if x is not None)
    return None


class WorkerDied(MqchatError):
    """A background worker of this process ended; the process exits so the supervisor restarts it."""


async def watch_workers(
    dead_workers: Callable[[], list[str]], *, every_s: float = WATCHDOG_EVERY_S, grace_s: float = WATCHDOG_GRACE_S
) -> None:
    """Run until a worker dies, then (after grace_s, while /healthz answers 503 for probes and
    load balancers to see) raise WorkerDied. Workers isolate their jobs' failures; one that
    dies anyway is a bug, and a fresh process is the way back to a known state."""
    while True:
        await asyncio.sleep(every_s)
        dead = dead_workers()
        if dead:
            logger.error(
                "worker(s) died: %s; /healthz is red; restarting this process in %.0f s", ", ".join(dead), grace_s
            )
            await asyncio.sleep(grace_s)
            raise WorkerDied(", ".join(dead))


def run_child(which: str, config: Config) -> int:
    """Entry point of a child process (``python -m mqchat _child broker|bridge|node``). Returns
    its exit code: 0 when stopped by a signal, EXIT_CANNOT_START with one line on stderr when it
    cannot start for a reason that a restart would not mend; anything else is raised."""
    setup_logging(config.log_level, which)
    started: list[bool] = []  # set once the process serves: a later failure is a crash, restarted
    try:
        _run_child(which, config, started)
    except WorkerDied:
        return EXIT_WORKER_DIED
    except Exception as exc:
        reason = None if started else cannot_start_reason(exc)
        if reason is None:
            raise
        print(f"mqchat: {reason}", file=sys.stderr, flush=True)
        return EXIT_CANNOT_START
    return 0


def _run_child(which: str, config: Config, started: list[bool]) -> None:
    if which != "bridge":
        tune_gc()

    async def node_body() -> None:
        async with run_node(config) as node:
            started.append(True)
            await watch_workers(node.dead_workers)

    async def broker_body() -> None:
        async with run_broker(config) as broker:
            started.append(True)
            await watch_workers(broker.dead_workers)

    async def bridge_body() -> None:
        host, port = local_host(config.network.host), config.network.mqtt_port
        async with run_bridge(config, mqtt_host=host, mqtt_port=port) as bridge:
            started.append(True)
            await watch_workers(bridge.dead_workers)

    _run_until_signalled({"broker": broker_body, "bridge": bridge_body, "node": node_body}[which])


# --- supervisor ------------------------------------------------------------------------------


def child_env(config: Config, metrics_dir: Path | None) -> dict[str, str]:
    """Settings for a child; with metrics_dir, Prometheus samples are shared across children."""
    env = {k: v for k, v in os.environ.items() if k not in ("MQCHAT_CONFIG", "PROMETHEUS_MULTIPROC_DIR")}
    env.update(config_to_env(config))
    if metrics_dir is not None:
        env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    return env


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to send SIGTERM when the supervisor dies."""
    if sys.platform == "linux":
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


class Supervisor:
    """Runs the broker and bridge processes; restarts either when it dies."""

    def __init__(self, *, config: Config) -> None:
        self._config = config
        self._run_dir = config.storage.data_dir / "run"
        self._metrics_dir = self._run_dir / "metrics"
        self._procs: dict[str, asyncio.subprocess.Process] = {}
        self._children = children_for(config)
        self._stopping = False
        self._failed = False

    async def _spawn(self, which: str) -> asyncio.subprocess.Process:
        # Own process group: a terminal's Ctrl-C reaches only the supervisor, which stops the
        # children in order; the parent-death signal stops them if the supervisor is killed.
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "mqchat",
            "_child",
            which,
            # One child serves its own metrics; several share them through files (which costs a
            # pid check on every sample update).
            env=child_env(self._config, self._metrics_dir if len(self._children) > 1 else None),
            process_group=0,
            preexec_fn=_die_with_parent,
        )
        (self._run_dir / f"{which}.pid").write_text(f"{proc.pid}\n")
        self._procs[which] = proc
        logger.info("started %s (pid %d)", which, proc.pid)
        return proc

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT (0), or until a child cannot start (1)."""
        shutil.rmtree(self._metrics_dir, ignore_errors=True)
        self._metrics_dir.mkdir(parents=True, exist_ok=True)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            # The bridge retries until the broker listens; no need to wait here.
            for which in self._children:
                await self._spawn(which)
            async with asyncio.TaskGroup() as tg:
                watchers = [tg.create_task(self._watch(name, stop), name=f"watch-{name}") for name in self._children]
                await stop.wait()
                self._stopping = True
                if not self._failed:
                    logger.info("stopping")
                await self._stop_children()
                for w in watchers:
                    w.cancel()
        finally:
            await self._stop_children()
            for which in self._children:
                with contextlib.suppress(FileNotFoundError):
                    (self._run_dir / f"{which}.pid").unlink()
        return 1 if self._failed else 0

    async def _watch(self, which: str, stop: asyncio.Event) -> None:
        failures = 0
        first_start = True
        while not self._stopping:
            proc = self._procs[which]
            started = time.monotonic()
            code = await proc.wait()
            self._mark_dead(proc.pid)
            if self._stopping:
                return
            if code == EXIT_CANNOT_START and first_start:
                # It said why on stderr; restarting would not mend it. After a crash, though, a
                # restart that cannot bind yet (the dead process's sockets are still closing) is
                # retried with backoff like any other failure.
                self._failed = True
                stop.set()
                return
            first_start = False
            failures = 1 if time.monotonic() - started > 30 else failures + 1
            delay = min(RESTART_BACKOFF_MAX_S, 0.25 * 2 ** (failures - 1))
            logger.error("%s (pid %d) exited with code %s; restarting in %.2fs", which, proc.pid, code, delay)
            await asyncio.sleep(delay)
            if not self._stopping:
                await self._spawn(which)

    def _mark_dead(self, pid: int) -> None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, str(self._metrics_dir))  # type: ignore[no-untyped-call]

    async def _stop_children(self) -> None:
        # The bridge first, so it finishes in-flight requests while the broker still runs.
        for which in reversed(self._children):
            proc = self._procs.get(which)
            if proc is None or proc.returncode is not None:
                continue
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                async with asyncio.timeout(STOP_GRACE_S):
                    await proc.wait()
            except TimeoutError:
                logger.warning("%s did not stop in %.0fs; killing it", which, STOP_GRACE_S)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()


def free_port(host: str = "127.0.0.1") -> int:
    """An unused TCP port (for tests and benchmarks)."""
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port
