"""The TypeScript SDK (clients/js/sdk) end to end under Node, against a real ``mqchat serve`` with its
WebSocket listener, started here:

    pytest ── python -m mqchat serve --ws-port P3 … ──► MQTT (WebSocket), HTTP on 127.0.0.1
           └─ node --test clients/js/sdk/test/e2e/*.test.mjs   (MQCHAT_E2E_WS_URL, _HTTP_URL, _SECRET)
                 two clients, receipts, typing, presence, a group, a file, a cut connection with 50
                 messages sent meanwhile (each arrives once, in seq order), a persistent outbox

`make js-sdk` (part of `make test`) installs the SDK's packages from its lockfile, builds it and runs
its unit tests; without the build this test fails under CI (``CI`` set) and is skipped elsewhere.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mqchat.bench.processes import wait_healthy
from mqchat.ports import free_port
from tests.helpers import repo_env

SDK = Path(__file__).resolve().parent.parent / "clients" / "js" / "sdk"
NODE_TIMEOUT_S = 240


def require_sdk_build() -> str:
    """The path of node, once the SDK is installed and built; else a failure under CI, a skip elsewhere."""
    node = shutil.which("node")
    missing = None
    if node is None:
        missing = "node is not installed (`make test` installs the Debian packages nodejs and npm)"
    elif not (SDK / "node_modules" / "mqtt" / "package.json").is_file():
        missing = f"the SDK's packages are not installed in {SDK / 'node_modules'} (`make js-sdk` does it)"
    elif not (SDK / "dist" / "index.js").is_file():
        missing = f"the SDK is not built in {SDK / 'dist'} (`make js-sdk` does it)"
    if missing is None:
        assert node is not None
        return node
    if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
        pytest.fail(f"{missing}: the TypeScript SDK's end-to-end tests need it", pytrace=False)
    pytest.skip(missing)


@dataclass(frozen=True)
class Server:
    ws_url: str
    http_url: str
    secret: str
    log: Path


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    """``mqchat serve`` with a WebSocket listener on free ports and a fresh data dir; stopped with
    SIGTERM (then killed) on the way out."""
    mqtt_port, http_port, ws_port = free_port(), free_port(), free_port()
    secret = secrets.token_hex(32)
    log = tmp_path / "serve.log"
    command = [
        *(sys.executable, "-m", "mqchat", "serve", "--data-dir", str(tmp_path / "data")),
        *("--mqtt-port", str(mqtt_port), "--http-port", str(http_port), "--ws-port", str(ws_port)),
        *("--jwt-secret", secret),
    ]
    with log.open("w") as out:
        proc = subprocess.Popen(command, cwd=tmp_path, env=repo_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        assert wait_healthy(proc, http_port, limit_s=60), f"mqchat serve did not become healthy:\n{log.read_text()}"
        yield Server(f"ws://127.0.0.1:{ws_port}/mqtt", f"http://127.0.0.1:{http_port}", secret, log)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.mark.timeout(NODE_TIMEOUT_S + 90)
def test_the_typescript_sdk_end_to_end(server: Server) -> None:
    node = require_sdk_build()
    tests = sorted(str(p.relative_to(SDK)) for p in (SDK / "test" / "e2e").glob("*.test.mjs"))
    assert tests, "no end-to-end tests in clients/js/sdk/test/e2e"
    env = {
        **repo_env(),
        "MQCHAT_E2E_WS_URL": server.ws_url,
        "MQCHAT_E2E_HTTP_URL": server.http_url,
        "MQCHAT_E2E_SECRET": server.secret,
    }
    done = subprocess.run(
        [node, "--test", "--test-concurrency=1", "--test-reporter=spec", *tests],
        cwd=SDK,
        env=env,
        capture_output=True,
        text=True,
        timeout=NODE_TIMEOUT_S,
        check=False,
    )
    report = f"{done.stdout}\n{done.stderr}"
    assert done.returncode == 0, f"{report}\nserver log (tail):\n{server.log.read_text()[-4000:]}"
    assert "ℹ fail 0" in done.stdout, report
