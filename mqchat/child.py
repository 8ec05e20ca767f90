"""One child process of ``mqchat serve``: its logging, the checks before it starts, the watchdog
that ends it when a worker dies, and the exit codes the supervisor reads.

::

    mqchat.supervisor ──spawn──▶ python -m mqchat _child broker|bridge|node ──▶ run_child
        run_child ──▶ the process's parts (mqchat.app: run_broker | run_bridge | run_node)
                  └─▶ watch_workers: a dead worker ─▶ WorkerDied ─▶ exit EXIT_WORKER_DIED (restarted)
        cannot start (bad config, a port in use, the store unreachable) ─▶ one line on stderr, exit EXIT_CANNOT_START
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from typing import Any

from broker.serve import tune_gc
from mqchat.app import HasWorkers, bind_tcp, local_host, run_bridge, run_broker, run_node
from mqchat.config import Config, broker_host_port
from mqchat.errors import ConfigError, MqchatError, StorageUnavailable
from mqchat.supervisor import EXIT_CANNOT_START, EXIT_WORKER_DIED, WORKER_PREFIX
from mqchat.tls import ServerTls
from storage.files import private_dir

logger = logging.getLogger(__name__)

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
    # websockets logs frames at DEBUG, a CONNECT's password and message bodies included: never.
    logging.getLogger("websockets").setLevel(max(logging.INFO, logging.getLogger().level))
    logging.getLogger("amqtt.broker").addFilter(_not_a_bind_failure)


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
    ports: list[tuple[str, int | None]] = [(f"{kind}_port", port) for kind, port in net.listener_ports().items()]
    if config.bridge.broker:  # beside an external broker, there is no MQTT listener of ours
        ports = [(key, port) for key, port in ports if key in ("http_port", "https_port")]
    for key, port in ports:
        if not port:
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
    """Why a child cannot start, if a restart would not help: a configuration error, a store that
    cannot be reached, or an address that cannot be bound, found anywhere in exc's groups, causes
    and contexts. (After a first start, the supervisor restarts a child that exits so.)"""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ConfigError | StorageUnavailable):  # PushConfigError included; a store not there
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
    _run_until_signalled(_serve_child(which, config, started))


def _open_child(which: str, config: Config) -> AbstractAsyncContextManager[HasWorkers]:
    """What child process ``which`` runs."""
    if which == "node":
        return run_node(config)
    if which == "broker":
        return run_broker(config)
    if which.startswith(WORKER_PREFIX):  # a bridge worker beside an external broker
        host, port = broker_host_port(config.bridge.broker)
        return run_bridge(config, mqtt_host=host, mqtt_port=port, instance=int(which.removeprefix(WORKER_PREFIX)))
    return run_bridge(config, mqtt_host=local_host(config.network.host), mqtt_port=config.network.mqtt_port)


async def _serve_child(which: str, config: Config, started: list[bool]) -> None:
    """Run child ``which`` until a worker dies (WorkerDied) or the task is cancelled."""
    async with _open_child(which, config) as running:
        started.append(True)
        tls = getattr(running, "tls", None)
        if isinstance(tls, ServerTls):  # SIGHUP: load the certificate files again now
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, functools.partial(_reload_tls, tls))
        await watch_workers(running.dead_workers)


def _reload_tls(tls: ServerTls) -> None:
    logger.info("SIGHUP: reloading the TLS certificate")
    tls.reload_if_changed(force=True)


def _run_until_signalled(body: Coroutine[Any, Any, None]) -> None:
    """Run ``body`` in a new event loop (uvloop when installed) until it ends or SIGTERM/SIGINT
    cancels it."""

    async def main() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        loop.add_signal_handler(signal.SIGHUP, lambda: None)  # a reload (see _serve_child), never a stop
        with contextlib.suppress(asyncio.CancelledError):
            await body

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())
