"""A real redis-server for tests: a free port on 127.0.0.1, no persistence, stopped afterwards.

Test modules take the fixture with ``from tests.redis_server import redis_url  # noqa: F401``;
each test gets a fresh, empty server (it starts in a few milliseconds). The ``redis_server``
fixture (imported the same way) hands over the ``RedisServer`` itself, e.g. to stop and restart
Redis on the same port under a running client.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mqchat.ports import free_port
from tests.helpers import installed

START_TIMEOUT_S = 10.0


def redis_server_binary() -> str:
    return installed(
        "redis-server",
        why="the Redis presence tests run against a real one",
        places=("/usr/bin/redis-server", "/usr/sbin/redis-server"),
    )


def _pong(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server process; ``stop`` then ``start`` brings it back on the same port, empty."""

    def __init__(self, directory: Path) -> None:
        self.binary = redis_server_binary()
        self.directory = directory
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._log = directory / "redis.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start on self.port (a free one, mqchat.ports, the first time; retried if it was taken)."""
        assert self.process is None, "already running"
        for _attempt in range(5):
            port = self.port or free_port()
            if self._launch(port):
                self.port = port
                return
            if self.port:
                break  # a restart must keep its port
        log = self._log.read_text(errors="replace")[-2000:] if self._log.exists() else ""
        raise RuntimeError(f"redis-server did not answer PING within {START_TIMEOUT_S}s:\n{log}")

    def _launch(self, port: int) -> bool:
        args = [
            self.binary,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--unixsocket", "",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.directory),
            "--logfile", str(self._log),
            "--daemonize", "no",
            "--protected-mode", "yes",
        ]  # fmt: skip
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break  # exited: most likely the port was taken meanwhile
            if _pong(port):
                return True
            time.sleep(0.01)
        self.stop()
        return False

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.kill()  # nothing to save (no persistence), and a clean shutdown takes ~100 ms
        process.wait(timeout=10)


@contextlib.contextmanager
def running_redis() -> Iterator[RedisServer]:
    with tempfile.TemporaryDirectory(prefix="mqchat-redis-") as directory:
        server = RedisServer(Path(directory))
        server.start()
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A running, empty redis-server for this test."""
    with running_redis() as server:
        yield server


@pytest.fixture
def redis_url() -> Iterator[str]:
    """The URL of a running, empty redis-server for this test (self-contained, so that importing
    this one fixture is enough)."""
    with running_redis() as server:
        yield server.url
