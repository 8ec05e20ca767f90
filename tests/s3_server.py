"""A real S3 API for tests: moto's standalone server in its own process, on a free port of
127.0.0.1, once per session; each test gets a bucket of its own.

Test modules take the fixtures with ``from tests.s3_server import s3_bucket, s3_server  # noqa:
F401`` (``s3_bucket`` needs ``s3_server`` beside it): ``s3_bucket`` is an ``S3Bucket`` (endpoint,
region, credentials and the name of a fresh, empty bucket), ``s3_server`` the ``S3Server``
itself, e.g. to make more buckets. Moto keeps everything in memory and checks no signature, but speaks S3's wire
protocol: multipart uploads (with S3's 5 MiB minimum part), ranges, presigned URLs.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from mqchat.ports import free_port

START_TIMEOUT_S = 30.0
REGION = "us-east-1"
ACCESS_KEY = "test"
SECRET_KEY = "test"


def _answers(port: int) -> bool:
    try:
        with httpx.Client(trust_env=False, timeout=1.0) as client:
            return client.get(f"http://127.0.0.1:{port}/moto-api/").status_code == 200
    except httpx.HTTPError:
        return False


@dataclass(frozen=True, slots=True)
class S3Bucket:
    endpoint: str
    region: str
    access_key: str
    secret_key: str
    bucket: str


class S3Server:
    """One moto server process (S3 and the rest of AWS, in memory)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._log = directory / "moto.log"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start on a free port (mqchat.ports; another one if it was taken meanwhile)."""
        assert self.process is None, "already running"
        for _attempt in range(3):
            port = free_port()
            if self._launch(port):
                self.port = port
                return
        log = self._log.read_text(errors="replace")[-2000:] if self._log.exists() else ""
        raise RuntimeError(f"the moto server did not answer within {START_TIMEOUT_S}s:\n{log}")

    def _launch(self, port: int) -> bool:
        args = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
        with self._log.open("ab") as log:
            self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break  # exited: most likely the port was taken meanwhile
            if _answers(port):
                return True
            time.sleep(0.05)
        self.stop()
        return False

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
        process.wait(timeout=10)

    def new_bucket(self) -> S3Bucket:
        """A bucket no test used, created (moto takes an unsigned CreateBucket)."""
        name = f"mqchat-{uuid.uuid4().hex[:16]}"
        with httpx.Client(trust_env=False, timeout=10.0) as client:
            client.put(f"{self.endpoint}/{name}").raise_for_status()
        return S3Bucket(self.endpoint, REGION, ACCESS_KEY, SECRET_KEY, name)


@contextlib.contextmanager
def running_s3() -> Iterator[S3Server]:
    with tempfile.TemporaryDirectory(prefix="mqchat-s3-") as directory:
        server = S3Server(Path(directory))
        server.start()
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """The session's moto server."""
    with running_s3() as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> S3Bucket:
    """A fresh, empty bucket on the session's moto server, for this test."""
    return s3_server.new_bucket()
