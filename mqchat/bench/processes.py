"""The processes a scenario runs: brokers, load generators, the lossy proxy and ``mqchat serve``.

::

    run_broker(system)  ──▶ BrokerProc    ours / ours-open / stock (forked, CPU 0) or Mosquitto (exec, CPU 0)
    run_load(fn, kwargs) ─▶ result        clients.testing.loadgen.<fn> in a forked process on CPU 1
    netem_proxy(port)   ──▶ port          clients.testing.netem.LossyProxy in a forked process on CPU 1
    run_serve(adapter)  ──▶ ServeProc     ``python -m mqchat serve`` on CPU 0, with its own data dir and log
                                          (serve_command, wait_healthy: also how the tests start and await it)

Each is bounded: a child that does not report within its limit raises ``BenchError`` and is
stopped on the way out.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from clients.testing import loadgen
from clients.testing.loadgen import Creds
from mqchat.bench.harness import (
    BROKER_CPU,
    HOST,
    LABELS,
    LOAD_CPU,
    MOSQUITTO,
    BenchError,
    child_setup,
    device_creds,
    pin,
    run_async,
    spawn,
    stop_popen,
    stop_process,
)
from mqchat.ports import free_port
from mqchat.tokens import SERVICE_CLIENT_PREFIX, SERVICE_USERNAME, service_password


def _rss(pid: int) -> int:
    import psutil  # type: ignore[import-untyped]

    rss: int = psutil.Process(pid).memory_info().rss
    return rss


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds the process has spent."""
    import psutil

    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


# --- brokers -------------------------------------------------------------------------------------


def _python_broker_child(kind: str, port: int, secret: str, ready: Connection) -> None:
    """Body of a broker process: ours (mqchat plugins), ours-open (no plugins key) or stock."""
    child_setup(BROKER_CPU)

    async def main() -> None:
        import asyncio

        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        listeners = {"default": {"type": "tcp", "bind": f"{HOST}:{port}", "max_connections": 0}}
        if kind == "ours":
            from broker.serve import Listeners, serve_broker, tune_gc
            from storage.presence import MemoryPresence

            tune_gc()

            # As `mqchat serve` runs it: every connect and disconnect also reported to presence.
            async with (
                MemoryPresence() as presence,
                serve_broker(listeners=Listeners(host=HOST, mqtt=port), secret=secret, presence=presence),
            ):
                ready.send(port)
                await stop.wait()
            return
        if kind == "ours-open":
            from broker.server import MqchatBroker

            broker: Any = MqchatBroker({"listeners": listeners})
        else:
            from amqtt.broker import Broker

            broker = Broker({"listeners": listeners})
        await broker.start()
        try:
            ready.send(port)
            await stop.wait()
        finally:
            await broker.shutdown()

    run_async(main())


@dataclass
class BrokerProc:
    """A running broker: what it is, where it listens, and how to stop it."""

    system: str
    port: int
    pid: int
    stop: Callable[[], None]
    secret: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return LABELS[self.system]

    def rss(self) -> int:
        return _rss(self.pid)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def device(self, user: str, device: str) -> Creds:
        """Credentials of a device: a JWT on ours, anonymous elsewhere (same client id)."""
        if self.system == "ours":
            return device_creds(self.secret, user, device, ttl_s=6 * 3600)
        return Creds(device)

    def service(self, name: str) -> Creds:
        """The bridge's credential on ours (may subscribe ``u/+/+/out`` and publish to in topics)."""
        if self.system == "ours":
            return Creds(f"{SERVICE_CLIENT_PREFIX}-{name}", SERVICE_USERNAME, service_password(self.secret))
        return Creds(f"bench-{name}")


def _wait_port(port: int, limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise BenchError(f"nothing listens on port {port} after {limit_s:.0f} s")


@contextlib.contextmanager
def _run_mosquitto(port: int, workdir: Path) -> Iterator[BrokerProc]:
    conf = workdir / f"mosquitto-{port}.conf"
    # Mosquitto drops QoS1 messages beyond 1,000 queued for one slow subscriber by default;
    # amqtt never drops, so the queue limit is lifted for a like-for-like throughput test.
    conf.write_text(f"listener {port} {HOST}\nallow_anonymous true\nmax_queued_messages 0\n")
    log = (workdir / f"mosquitto-{port}.log").open("wb")
    proc = subprocess.Popen(
        [MOSQUITTO, "-c", str(conf)],
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=lambda: pin(BROKER_CPU),
    )

    def stop_mosquitto() -> None:
        stop_popen(proc, grace_s=10)
        log.close()

    try:
        _wait_port(port, 10)
        yield BrokerProc("mosquitto", port, proc.pid, stop_mosquitto)
    finally:
        stop_mosquitto()


@contextlib.contextmanager
def run_broker(system: str, workdir: Path) -> Iterator[BrokerProc]:
    """Start one system's broker pinned to CPU 0 on a free port; stop it on exit."""
    port = free_port()
    if system == "mosquitto":
        with _run_mosquitto(port, workdir) as b:
            yield b
        return
    secret = secrets.token_urlsafe(32)
    p, ready = spawn(_python_broker_child, (system, port, secret), name=f"broker-{system}")

    def stop_python() -> None:
        if p.is_alive():
            stop_process(p, grace_s=15, terminate=True)

    try:
        if not ready.poll(30):
            raise BenchError(f"{LABELS[system]} did not start within 30 s")
        ready.recv()
        assert p.pid is not None
        yield BrokerProc(system, port, p.pid, stop_python, secret=secret)
    except EOFError:
        raise BenchError(f"{LABELS[system]} exited during start-up") from None
    finally:
        stop_python()


# --- load and the lossy proxy ----------------------------------------------------------------------


def _load_child(fn: str, kwargs: dict[str, Any], label: str, conn: Connection) -> None:
    child_setup(LOAD_CPU)
    try:
        result = run_async(getattr(loadgen, fn)(**kwargs, progress=loadgen.stderr_progress(label)))
        conn.send(("ok", result))
    except BaseException as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))


def run_load(fn: str, kwargs: dict[str, Any], *, label: str, limit_s: float) -> Any:
    """Run ``clients.testing.loadgen.<fn>(**kwargs)`` in a fresh process pinned to CPU 1; return its result."""
    p, conn = spawn(_load_child, (fn, kwargs, label), name=f"load-{label}")
    try:
        if not conn.poll(limit_s):
            raise BenchError(f"{label}: no result within {limit_s:.0f} s")
        status, value = conn.recv()
    except EOFError:
        raise BenchError(f"{label}: load process died") from None
    finally:
        stop_process(p)
    if status != "ok":
        raise BenchError(f"{label}: {value}")
    return value


def _netem_child(target_port: int, preset: str, seed: int, ready: Connection) -> None:
    """A lossy proxy (clients.testing.netem) in its own process, pinned with the load generator."""
    child_setup(LOAD_CPU)
    import asyncio

    from clients.testing.netem import PRESETS, LossyProxy

    async def main() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        async with LossyProxy(target_port=target_port, profile=PRESETS[preset], seed=seed) as proxy:
            ready.send(proxy.port)
            await stop.wait()

    run_async(main())


@contextlib.contextmanager
def netem_proxy(target_port: int, preset: str | None) -> Iterator[int]:
    """The port phones should use: the server's own, or a lossy proxy in front of it."""
    if preset is None:
        yield target_port
        return
    p, ready = spawn(_netem_child, (target_port, preset, 1), name="netem")
    try:
        if not ready.poll(15):
            raise BenchError("the lossy proxy did not start")
        yield int(ready.recv())
    finally:
        stop_process(p, terminate=True)


# --- mqchat serve --------------------------------------------------------------------------------


SEND_LIMITS = ("SEND_RATE", "SEND_BURST", "USER_SEND_RATE", "USER_SEND_BURST")


def serve_command(
    *,
    mqtt_port: int,
    http_port: int,
    data_dir: Path | None = None,
    adapter: str | None = None,
    log_level: str | None = None,
) -> list[str]:
    """The command line of ``python -m mqchat serve`` on these ports (the tests start it this way too)."""
    cmd = [sys.executable, "-m", "mqchat", "serve"]
    if data_dir is not None:
        cmd += ["--data-dir", str(data_dir)]
    cmd += ["--mqtt-port", str(mqtt_port), "--http-port", str(http_port)]
    if adapter is not None:
        cmd += ["--adapter", adapter]
    if log_level is not None:
        cmd += ["--log-level", log_level]
    return cmd


def wait_healthy(proc: subprocess.Popen[bytes], http_port: int, limit_s: float = 30.0) -> bool:
    """Whether ``/healthz`` on ``http_port`` answers 200 within ``limit_s`` (False at once if
    ``proc`` exits)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with (
            contextlib.suppress(OSError, http.client.HTTPException),  # refused, reset, cut mid-answer
            urllib.request.urlopen(f"http://{HOST}:{http_port}/healthz", timeout=1) as resp,
        ):
            if resp.status == 200:
                return True
        time.sleep(0.2)
    return False


@dataclass(frozen=True, slots=True, kw_only=True)
class ServeProc:
    """A running ``mqchat serve``: its ports, the JWT secret it trusts, and its log."""

    proc: subprocess.Popen[bytes]
    mqtt_port: int
    http_port: int
    secret: str
    log_path: Path

    def wait_healthy(self, limit_s: float = 30.0) -> bool:
        """Whether ``/healthz`` answers 200 within ``limit_s`` (False at once if the process exits)."""
        return wait_healthy(self.proc, self.http_port, limit_s)

    def exited(self) -> bool:
        return self.proc.poll() is not None

    def pids(self) -> list[int]:
        """The supervisor and the processes it runs now."""
        import psutil

        pids = [self.proc.pid]
        with contextlib.suppress(psutil.Error):
            pids += [c.pid for c in psutil.Process(self.proc.pid).children(recursive=True)]
        return pids

    def device(self, user: str, device: str) -> Creds:
        return device_creds(self.secret, user, device)

    def log_tail(self, lines: int = 8) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


@contextlib.contextmanager
def run_serve(
    adapter: str,
    workdir: Path,
    *,
    limits: bool = False,
    name: str = "",
    store: str | None = None,
    secret: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Iterator[ServeProc]:
    """``mqchat serve`` pinned to the broker's CPU with a fresh secret (or the given one, shared
    by a cluster's nodes); stopped on exit. The pipeline's capacity is measured with few devices
    sending fast, so the send rate limits are lifted unless ``limits``. ``store``: a ``--store``
    URL (default: SQLite in the workdir); ``env``: more ``MQCHAT_*`` settings."""
    secret = secret or secrets.token_urlsafe(32)
    mqtt_port, http_port = free_port(), free_port()
    data_dir = workdir / f"data-{adapter}{name}"
    log_path = workdir / f"serve-{adapter}{name}.log"
    unlimited = {} if limits else {f"MQCHAT_{key}": "1000000000" for key in SEND_LIMITS}
    settings = {"MQCHAT_JWT_SECRET": secret, **unlimited, **({"MQCHAT_STORE": store} if store else {}), **(env or {})}
    child_env = {**os.environ, **settings}
    child_env.pop("MQCHAT_CONFIG", None)
    cmd = serve_command(
        mqtt_port=mqtt_port, http_port=http_port, data_dir=data_dir, adapter=adapter, log_level="WARNING"
    )
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env, preexec_fn=lambda: pin(BROKER_CPU)
        )
    try:
        yield ServeProc(proc=proc, mqtt_port=mqtt_port, http_port=http_port, secret=secret, log_path=log_path)
    finally:
        stop_popen(proc, grace_s=20)


# --- what a cluster runs beside its nodes ------------------------------------------------------


def _binary(name: str, *places: str) -> str:
    import shutil

    found = shutil.which(name) or next((p for p in places if Path(p).is_file()), None)
    if found is None:
        raise BenchError(f"{name} is not installed (Debian: apt-get install {name})")
    return found


@contextlib.contextmanager
def run_redis(workdir: Path) -> Iterator[str]:
    """A redis-server without persistence on a free port, pinned beside the load; yields its URL."""
    binary = _binary("redis-server", "/usr/bin/redis-server", "/usr/sbin/redis-server")
    port = free_port()
    cmd = [binary, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no", "--dir", str(workdir)]
    with (workdir / "redis.log").open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=lambda: pin(LOAD_CPU))
    try:
        _wait_port(port, 10)
        yield f"redis://{HOST}:{port}/0"
    finally:
        stop_popen(proc, grace_s=5)


@contextlib.contextmanager
def run_haproxy(workdir: Path, nodes: list[tuple[str, int, int]]) -> Iterator[tuple[int, int]]:
    """HAProxy configured by ``mqchat deploy haproxy`` for nodes (name, MQTT port, HTTP port);
    yields its MQTT and HTTP ports."""
    from mqchat.deploy import NodeAddress, haproxy_config

    binary = _binary("haproxy", "/usr/sbin/haproxy")
    mqtt_port, http_port = free_port(), free_port()
    config = workdir / "haproxy.cfg"
    config.write_text(
        haproxy_config(
            [NodeAddress(name, HOST, m, h) for name, m, h in nodes],
            mqtt_bind=f"{HOST}:{mqtt_port}",
            http_bind=f"{HOST}:{http_port}",
        )
    )
    with (workdir / "haproxy.log").open("wb") as log:
        proc = subprocess.Popen(
            [binary, "-db", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT, preexec_fn=lambda: pin(LOAD_CPU)
        )
    try:
        _wait_port(mqtt_port, 10)
        yield mqtt_port, http_port
    finally:
        stop_popen(proc, grace_s=5)
