"""Files only the server can read: the data directory 0700, every database (with its WAL and
shared-memory files) and the secret 0600, whatever the umask of whoever starts `mqchat serve`."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import repo_env, serve_in


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _usual_umask() -> None:
    os.umask(0o022)  # the usual umask: files world-readable unless we say not


@pytest.fixture
def served_home(tmp_path: Path) -> Iterator[tuple[Path, int, int]]:
    home = tmp_path / "home"
    home.mkdir()
    with serve_in(home, tmp_path / "serve.log", preexec_fn=_usual_umask) as (_, mqtt_port, http_port):
        yield home, mqtt_port, http_port


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
    with serve_in(home, log, preexec_fn=_usual_umask):
        pass
    assert "has mode 755" in log.read_text()
    assert _mode(home / "data") == 0o755, "reported, not changed behind the operator's back"
