"""Fixtures: a real amqtt broker and a real bridge on free ports, real SQLite files, and
(for tests marked ``@both_stores``) the same tests again on a real Cassandra node."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_timeout

from bridge.mqtt_adapter import MqttClientAdapter
from mqchat.app import run_bridge, run_broker, run_node
from mqchat.bench.processes import serve_command
from mqchat.config import AuthConfig, BridgeConfig, Config, MediaConfig, NetworkConfig, PresenceConfig, StorageConfig
from mqchat.ports import RANGE_ENV, PortRangeError, configured_range, free_port
from mqchat.tokens import issue_token
from storage.base import MessageStore
from tests.cassandra_store import cassandra_node, cassandra_session, cassandra_storage_config  # noqa: F401
from tests.helpers import repo_env

# --- ports: each pytest-xdist worker picks its servers' ports from a range of its own ---------------

PORT_BLOCK = 4000
PORT_BASE = 10000


def ephemeral_low(path: Path = Path("/proc/sys/net/ipv4/ip_local_port_range")) -> int:
    """The first port of the kernel's ephemeral range (where outgoing connections take theirs)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(path.read_text().split()[0])
    return 32768


def worker_port_range(worker: str, workers: int = 1, given: str = "") -> str | None:
    """This worker's ports: ``gw0`` → ``10000-13999``, ``gw1`` → ``14000-17999``… below the
    ephemeral range (None past its start), or its share of a range ``given`` to the whole run
    (``MQCHAT_PORT_RANGE``), cut in ``workers`` parts. A run without xdist counts as ``gw0``."""
    index = int(worker[2:]) if worker.startswith("gw") and worker[2:].isdecimal() else 0
    if given:
        index %= max(workers, 1)  # a worker xdist started in place of a crashed one (gw2…)
        bounds = configured_range(given)
        assert bounds is not None
        share = (bounds[1] - bounds[0] + 1) // max(workers, 1)
        if share < 1:
            raise PortRangeError(f"{RANGE_ENV}={given}: fewer ports than the {workers} test workers")
        low = bounds[0] + index * share
        return f"{low}-{low + share - 1}"
    low = PORT_BASE + index * PORT_BLOCK
    return f"{low}-{low + PORT_BLOCK - 1}" if low + PORT_BLOCK <= ephemeral_low() else None


def pytest_configure(config: pytest.Config) -> None:
    """The servers the tests start (and the child processes they spawn, which inherit the
    environment) take their ports from this worker's range (``mqchat.ports``), so two workers
    never pick one port, nor does an outgoing connection take it before the server binds it. A
    range set by whoever runs the suite is shared out among the workers."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is None and getattr(config.option, "numprocesses", None):
        return  # xdist's controller runs no test; its workers inherit the environment as it is now
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    if (ports := worker_port_range(worker or "gw0", workers, os.environ.get(RANGE_ENV, ""))) is not None:
        os.environ[RANGE_ENV] = ports


# --- a timeout shows where every asyncio task waits -----------------------------------------------


def _coroutine_chain(task: asyncio.Task[object]) -> list[str]:
    """Where a task waits: each frame of its chain of awaits, outermost first."""
    lines: list[str] = []
    coro: object = task.get_coro()
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None) or getattr(coro, "ag_frame", None)
        if frame is not None:
            code = frame.f_code
            lines.append(f'  File "{code.co_filename}", line {frame.f_lineno}, in {code.co_name}')
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None) or getattr(coro, "ag_await", None)
    return lines


def dump_asyncio_tasks(write: Callable[[str], object]) -> None:
    """Write the await chain of every task of the running loop (called from the timeout's signal
    handler, which runs in the loop's thread)."""
    loop = asyncio._get_running_loop()
    if loop is None:
        return
    tasks = sorted(asyncio.all_tasks(loop), key=lambda t: t.get_name())
    write(f"{len(tasks)} asyncio tasks\n")
    for task in tasks:
        write(f"--- task {task.get_name()} ({'cancelling' if task.cancelling() else 'running'})\n")
        write("\n".join(_coroutine_chain(task)) + "\n")


LAST_RESORT_S = 30.0


@pytest.hookimpl(tryfirst=True)
def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> bool | None:
    """pytest-timeout's signal method, plus the stacks of asyncio tasks (threads alone say
    nothing about a hung coroutine: the loop's thread just sits in select())."""
    if settings.method != "signal" or threading.current_thread() is not threading.main_thread():
        return None  # pytest-timeout's own handling

    last_resort: list[threading.Timer] = []

    def on_timeout(signum: int, frame: object) -> None:
        __tracebackhide__ = True
        terminal = item.config.get_terminal_writer()
        terminal.sep("+", title="Timeout: asyncio tasks")
        dump_asyncio_tasks(terminal.write)
        # The failure below is raised wherever the main thread is; if that is inside an event
        # loop callback, asyncio logs it and carries on, and a spinning loop would then hang the
        # suite for ever. So: if the test has not ended 30 s later, dump every thread and exit.
        timer = threading.Timer(LAST_RESORT_S, pytest_timeout.timeout_timer, (item, settings))
        timer.daemon = True
        timer.start()
        last_resort.append(timer)
        pytest_timeout.timeout_sigalrm(item, settings)

    def cancel() -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        for timer in last_resort:
            timer.cancel()

    item.cancel_timeout = cancel  # type: ignore[attr-defined]  # pytest-timeout's cancel hook reads it
    signal.signal(signal.SIGALRM, on_timeout)
    signal.setitimer(signal.ITIMER_REAL, settings.timeout)
    return True


# --- the store under the stack: SQLite, or (modules marked both_stores) Cassandra as well ----------


@pytest.fixture(params=["sqlite", "cassandra"])
def store_backend(request: pytest.FixtureRequest) -> str:
    """Which backend the stack of a test runs on; a test opts in with ``@both_stores``."""
    return str(request.param)


both_stores = pytest.mark.usefixtures("store_backend")


def storage_for(request: pytest.FixtureRequest, data_dir: Path) -> StorageConfig:
    """The test's StorageConfig: SQLite in data_dir, or the session's Cassandra node (emptied)."""
    if "store_backend" in request.fixturenames and request.getfixturevalue("store_backend") == "cassandra":
        config: StorageConfig = request.getfixturevalue("cassandra_storage_config")
        return dataclasses.replace(config, data_dir=data_dir)
    return StorageConfig(data_dir=data_dir)


def make_config(
    data_dir: Path,
    *,
    secret: str | None = None,
    presence: PresenceConfig | None = None,
    storage: StorageConfig | None = None,
    media: MediaConfig | None = None,
    **bridge: float,
) -> Config:
    return Config(
        network=NetworkConfig(host="127.0.0.1", mqtt_port=0, http_port=0),
        auth=AuthConfig(jwt_secret=secret or secrets.token_urlsafe(32)),
        storage=storage or StorageConfig(data_dir=data_dir),
        bridge=BridgeConfig(**bridge),
        presence=presence or PresenceConfig(),
        media=media or MediaConfig(),
    )


@dataclass
class Stack:
    """An in-process mqchat: the same wiring as `mqchat serve`, in one event loop."""

    config: Config
    mqtt_port: int
    http_port: int
    store: MessageStore

    def token(self, user: str, device: str, ttl_s: int = 3600) -> str:
        return issue_token(secret=self.config.auth.jwt_secret, user=user, device=device, ttl_s=ttl_s)

    def http(self, user: str | None = None, device: str = "http") -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {self.token(user, device)}"} if user else {}
        return httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.http_port}", headers=headers, timeout=10)


@contextlib.asynccontextmanager
async def open_stack(config: Config, adapter: str = "mqtt") -> AsyncIterator[Stack]:
    """Broker + bridge wired as `mqchat serve` does: one node (adapter "inbroker") or the broker
    and the MQTT-client bridge (here in one event loop)."""
    if adapter == "inbroker":
        async with run_node(config) as node:
            yield Stack(config=config, mqtt_port=node.mqtt_port, http_port=node.http_port, store=node.store)
        return
    async with (
        run_broker(config) as broker,
        run_bridge(config, mqtt_host="127.0.0.1", mqtt_port=broker.mqtt_port) as bridge,
    ):
        assert isinstance(bridge.adapter, MqttClientAdapter)
        await bridge.adapter.wait_connected()
        yield Stack(config=config, mqtt_port=broker.mqtt_port, http_port=bridge.http_port, store=bridge.store)


@pytest.fixture
async def stack(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Stack]:
    """`open_stack` with default settings; parametrize indirectly with "inbroker" for the
    in-broker adapter (default: the MQTT-client adapter)."""
    config = make_config(tmp_path, storage=storage_for(request, tmp_path))
    async with open_stack(config, getattr(request, "param", "mqtt")) as stack:
        yield stack


both_adapters = pytest.mark.parametrize("stack", ["mqtt", "inbroker"], indirect=True)


# --- `mqchat serve` as real processes -----------------------------------------------------------


@dataclass
class Served:
    """A running `python -m mqchat serve` (supervisor + broker + bridge processes)."""

    proc: subprocess.Popen[bytes]
    data_dir: Path
    mqtt_port: int
    http_port: int
    secret: str
    log_path: Path

    def token(self, user: str, device: str, ttl_s: int = 3600) -> str:
        return issue_token(secret=self.secret, user=user, device=device, ttl_s=ttl_s)

    def processes(self) -> list[str]:
        """The supervised children: broker and bridge, or the one node."""
        return sorted(p.stem for p in (self.data_dir / "run").glob("*.pid"))

    def pid(self, which: str) -> int:
        return int((self.data_dir / "run" / f"{which}.pid").read_text())

    def http(self, user: str | None = None) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {self.token(user, 'http')}"} if user else {}
        return httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.http_port}", headers=headers, timeout=10)

    async def wait_healthy(self, timeout: float = 60) -> None:
        """Until the bridge answers /healthz with 200 (it reaches the broker)."""
        deadline = time.monotonic() + timeout
        async with self.http() as http:
            while time.monotonic() < deadline:
                assert self.proc.poll() is None, f"mqchat serve exited; log:\n{self.log()}"
                try:
                    if (await http.get("/healthz")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)
        raise AssertionError(f"mqchat serve not healthy in {timeout}s; log:\n{self.log()}")

    async def kill9(self, which: str, timeout: float = 60) -> None:
        """kill -9 one child; wait until the supervisor restarted it and all is healthy again."""
        old = self.pid(which)
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(FileNotFoundError, ValueError):
                if self.pid(which) != old:
                    break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"{which} was not restarted; log:\n{self.log()}")
        await self.wait_healthy(timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]


def start_served(
    data_dir: Path,
    secret: str,
    log_path: Path,
    *,
    adapter: str = "mqtt",
    env: dict[str, str] | None = None,
) -> Served:
    """`python -m mqchat serve` on free ports; env adds MQCHAT_* settings."""

    mqtt_port, http_port = free_port(), free_port()
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            serve_command(mqtt_port=mqtt_port, http_port=http_port, data_dir=data_dir, adapter=adapter),
            env=repo_env() | {"MQCHAT_JWT_SECRET": secret} | (env or {}),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return Served(proc, data_dir, mqtt_port, http_port, secret, log_path)


def stop_served(served: Served) -> int:
    if served.proc.poll() is None:
        served.proc.send_signal(signal.SIGTERM)
        try:
            return served.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            served.proc.kill()
            served.proc.wait()
            raise AssertionError(f"mqchat serve did not stop on SIGTERM; log:\n{served.log()}") from None
    return served.proc.returncode


@pytest.fixture
async def served(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Served]:
    """`mqchat serve` as processes; parametrize indirectly with "inbroker" for the one-node mode."""
    adapter = getattr(request, "param", "mqtt")
    storage = storage_for(request, tmp_path / "data")
    env = {"MQCHAT_STORE": storage.url} if storage.backend != "sqlite" else None
    s = start_served(tmp_path / "data", secrets.token_urlsafe(32), tmp_path / "serve.log", adapter=adapter, env=env)
    try:
        await s.wait_healthy()
        yield s
    finally:
        stop_served(s)
