"""Files only the server can read: the data directory 0700, every database (with its WAL and
shared-memory files) and the secret 0600, whatever the umask of whoever starts `mqchat serve`."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from mqchat.app import free_port
from tests.helpers import repo_env


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _serve(home: Path, log: Path) -> Iterator[tuple[int, int]]:
    mqtt_port, http_port = free_port(), free_port()
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mqchat", "serve", "--mqtt-port", str(mqtt_port), "--http-port", str(http_port)],
            cwd=home,
            env=repo_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: os.umask(0o022),  # the usual umask: files world-readable unless we say not
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{http_port}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        yield mqtt_port, http_port
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.fixture
def served_home(tmp_path: Path) -> Iterator[tuple[Path, int, int]]:
    home = tmp_path / "home"
    home.mkdir()
    for ports in _serve(home, tmp_path / "serve.log"):
        yield home, *ports


def test_data_files_are_readable_by_the_server_only(served_home: tuple[Path, int, int]) -> None:
    home, mqtt_port, _ = served_home
    done = subprocess.run(
        [sys.executable, "-m", "mqchat", "send", "--user", "alice", "--device", "a1", "--to", "bob", "--body", "hi",
         "--mqtt-port", str(mqtt_port)],
        cwd=home, env=repo_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    data = home / "data"
    assert _mode(data) == 0o700
    files = ["jwt_secret", "mqchat.sqlite3", "mqchat.sqlite3-wal", "mqchat.sqlite3-shm", "push.sqlite3"]
    for name in files:
        assert (data / name).exists(), name
        assert _mode(data / name) == 0o600, f"{name}: {_mode(data / name):03o}"


def test_an_existing_data_dir_others_can_read_is_reported(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "data").mkdir(parents=True)
    (home / "data").chmod(0o755)
    log = tmp_path / "serve.log"
    for _ in _serve(home, log):
        pass
    assert "has mode 755" in log.read_text()
    assert _mode(home / "data") == 0o755, "reported, not changed behind the operator's back"
