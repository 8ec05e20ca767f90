"""A cluster for tests: `mqchat serve` nodes as real processes, sharing the test Cassandra node and
a real redis-server, behind a real HAProxy configured by `mqchat deploy haproxy`.

Devices and HTTP clients talk to the balancer only; which node a device landed on is read from
the presence registry in Redis (each node registers its devices under its node id). HAProxy's
own view of the nodes (up or down) is read from its stats socket, which the tests add to the
generated configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
from redis.asyncio import Redis

from mqchat.deploy import NodeAddress, haproxy_config
from mqchat.ports import free_port
from mqchat.tokens import issue_token
from tests.conftest import Served, start_served, stop_served
from tests.helpers import installed

CHECK_INTERVAL_MS = 200
"""HAProxy's health checks: a node is down 2 failed checks after it died, up 2 good ones after."""


def haproxy_binary() -> str:
    return installed(
        "haproxy",
        why="the cluster tests run their nodes behind a real one",
        places=("/usr/sbin/haproxy", "/usr/bin/haproxy"),
    )


class HAProxy:
    """One haproxy process in the foreground, balancing MQTT and HTTP over the given nodes."""

    def __init__(self, nodes: list[NodeAddress], log_path: Path) -> None:
        self.mqtt_port, self.http_port = free_port(), free_port()
        # A unix socket path is short (108 bytes): not under pytest's long tmp_path.
        self._dir = Path(tempfile.mkdtemp(prefix="mqchat-lb-"))
        self.socket_path = self._dir / "stats.sock"
        config = haproxy_config(
            nodes,
            mqtt_bind=f"127.0.0.1:{self.mqtt_port}",
            http_bind=f"127.0.0.1:{self.http_port}",
            check_interval_ms=CHECK_INTERVAL_MS,
        )
        # A second global section adds to the first: the stats socket the tests read.
        config += f"\nglobal\n    stats socket {self.socket_path} mode 600 level admin\n"
        self.config_path = self._dir / "haproxy.cfg"
        self.config_path.write_text(config)
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [haproxy_binary(), "-db", "-f", str(self.config_path)], stdout=log, stderr=subprocess.STDOUT
            )

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(self._dir, ignore_errors=True)

    def statuses(self) -> dict[tuple[str, str], str]:
        """(backend, server) -> "UP" / "DOWN" / …, as HAProxy sees it now."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.socket_path))
            s.sendall(b"show stat\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        text = b"".join(chunks).decode().lstrip("# ")
        return {
            (row["pxname"], row["svname"]): row["status"].split()[0]
            for row in csv.DictReader(io.StringIO(text))
            if row["svname"] not in ("FRONTEND", "BACKEND")
        }

    async def wait_until(self, want: Mapping[str, str], *, timeout: float = 30) -> None:
        """Until every named server has the wanted status in both backends."""
        deadline = time.monotonic() + timeout
        states: dict[tuple[str, str], str] = {}
        while True:
            assert self.process is not None, "not started"
            assert self.process.poll() is None, self.log()
            with contextlib.suppress(OSError):
                states = self.statuses()
                if all(states.get((b, n)) == s for n, s in want.items() for b in ("mqchat_mqtt", "mqchat_http")):
                    return
            assert time.monotonic() < deadline, f"HAProxy never saw {want}; now {states}; log:\n{self.log()}"
            await asyncio.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""


@dataclass
class Cluster:
    nodes: dict[str, Served]  # by node id
    lb: HAProxy
    secret: str
    redis_url: str

    @property
    def mqtt_port(self) -> int:
        return self.lb.mqtt_port

    @property
    def http_port(self) -> int:
        return self.lb.http_port

    def token(self, user: str, device: str) -> str:
        return issue_token(secret=self.secret, user=user, device=device, ttl_s=3600)

    def http(self, user: str | None = None, device: str = "http") -> httpx.AsyncClient:
        """A client of the balancer's HTTP port."""
        headers = {"Authorization": f"Bearer {self.token(user, device)}"} if user else {}
        return httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.lb.http_port}", headers=headers, timeout=10)

    async def node_of(self, user: str, device: str, *, timeout: float = 10) -> str:
        """The node a connected device is on, once its node has registered it."""
        deadline = time.monotonic() + timeout
        async with Redis.from_url(self.redis_url, decode_responses=True) as redis:
            while True:
                value = await redis.hget(f"mqchat:dev:{user}", device)
                if value:  # "{node id}/{incarnation}|{connection}"
                    return str(value).partition("/")[0]
                assert time.monotonic() < deadline, f"{user}/{device} never registered"
                await asyncio.sleep(0.02)

    def kill9(self, name: str) -> None:
        """kill -9 a whole node: its supervisor and the node process under it (no restart)."""
        served = self.nodes[name]
        child = served.pid("node")
        served.proc.send_signal(signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
        served.proc.wait()


@contextlib.asynccontextmanager
async def running_cluster(
    tmp_path: Path, *, store_url: str, redis_url: str, size: int = 3, env: Mapping[str, str] | None = None
) -> AsyncIterator[Cluster]:
    """size nodes (n1, n2, …) behind HAProxy, all healthy and up in the balancer."""
    secret = secrets.token_urlsafe(32)
    nodes: dict[str, Served] = {}
    lb: HAProxy | None = None
    try:
        for i in range(1, size + 1):
            name = f"n{i}"
            node_env = {
                "MQCHAT_STORE": store_url,
                "MQCHAT_REDIS_URL": redis_url,
                "MQCHAT_NODE_ID": name,
                "MQCHAT_PRESENCE_GRACE": "0s",
                **(env or {}),
            }
            nodes[name] = start_served(
                tmp_path / name, secret, tmp_path / f"{name}.log", adapter="inbroker", env=node_env
            )
        await asyncio.gather(*(n.wait_healthy() for n in nodes.values()))
        lb = HAProxy(
            [NodeAddress(name, "127.0.0.1", n.mqtt_port, n.http_port) for name, n in nodes.items()],
            tmp_path / "haproxy.log",
        )
        lb.start()
        await lb.wait_until(dict.fromkeys(nodes, "UP"))
        yield Cluster(nodes, lb, secret, redis_url)
    finally:
        if lb is not None:
            lb.stop()
        for served in nodes.values():
            stop_served(served)
