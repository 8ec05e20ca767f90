"""Bridge workers behind a real Mosquitto: `mqchat bridge --workers 3` on the Cassandra test node,
Mosquitto configured by `mqchat deploy mosquitto` (passwords, pattern ACLs). The workers share the
devices' requests through a shared subscription; one is killed -9 mid-run, and nothing is lost
or stored twice, and each device's messages keep its order (the SDK sends one at a time)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import re
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from clients import ChatClient, Message
from clients.testing.loadgen import Creds, connect
from mqchat.bench.harness import MOSQUITTO
from mqchat.config import StorageConfig
from mqchat.ids import dm_conv
from mqchat.ports import free_port
from mqchat.tokens import SERVICE_USERNAME, issue_token, service_password
from tests.cassandra_store import cassandra_storage_config  # noqa: F401
from tests.conftest import Served, stop_served
from tests.helpers import repo_env, running_mosquitto, unique

SENDERS = 4
MESSAGES_EACH = 60
WORKERS = 3


@dataclass
class Deployment:
    secret: str
    mosquitto_port: int
    mosquitto_log: Path
    devices: dict[tuple[str, str], str]  # (user, device) -> its token, its Mosquitto password too

    def token(self, user: str, device: str) -> str:
        return self.devices[(user, device)]


@contextlib.contextmanager
def mosquitto(tmp_path: Path, devices: list[tuple[str, str]]) -> Iterator[Deployment]:
    """Mosquitto with the configuration `mqchat deploy mosquitto` writes, each device's token its password."""
    if not Path(MOSQUITTO).is_file():
        pytest.fail("mosquitto is not installed (`make test` installs the Debian package)", pytrace=False)
    secret = secrets.token_urlsafe(32)
    tokens = {(u, d): issue_token(secret=secret, user=u, device=d, ttl_s=3600) for u, d in devices}
    users = {u: t for (u, _d), t in tokens.items()}  # one device per user here
    port = free_port()
    conf = tmp_path / "mosquitto"
    listed = tmp_path / "users"
    listed.write_text("".join(f"{u}={t}\n" for u, t in users.items()))
    listed.chmod(0o600)
    # As root, Mosquitto would switch to its own account, which cannot enter pytest's tmp_path.
    account = pwd.getpwuid(os.geteuid()).pw_name
    options = ["--dir", str(conf), "--port", str(port), "--run-as", account, "--users", str(listed)]
    written = subprocess.run(
        [sys.executable, "-m", "mqchat", "deploy", "mosquitto", *options],
        env=repo_env() | {"MQCHAT_JWT_SECRET": secret},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert written.returncode == 0, written.stderr
    log = tmp_path / "mosquitto.log"
    with running_mosquitto(MOSQUITTO, conf / "mosquitto.conf", log):
        yield Deployment(secret, port, log, tokens)


def start_bridge(deployment: Deployment, tmp_path: Path, store_url: str) -> Served:
    http_port = free_port()
    data_dir = tmp_path / "bridge"
    log_path = tmp_path / "bridge.log"
    cmd = [sys.executable, "-m", "mqchat", "bridge", "--data-dir", str(data_dir), "--http-port", str(http_port)]
    cmd += ["--broker", f"127.0.0.1:{deployment.mosquitto_port}", "--workers", str(WORKERS)]
    env = repo_env() | {"MQCHAT_JWT_SECRET": deployment.secret, "MQCHAT_STORE": store_url}
    with log_path.open("ab") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    return Served(proc, data_dir, deployment.mosquitto_port, http_port, deployment.secret, log_path)


async def workers_connected(deployment: Deployment, count: int, *, timeout: float = 60) -> None:
    """Until Mosquitto has seen count bridge workers connect (each id once at least): their ids
    are $mqchat-bridge-{node id}-{number}."""
    deadline = time.monotonic() + timeout
    while True:
        log = deployment.mosquitto_log.read_text(errors="replace")
        if all(re.search(rf"as \$mqchat-bridge-\S+-{i} ", log) for i in range(count)):
            return
        assert time.monotonic() < deadline, log[-3000:]
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def phone(deployment: Deployment, bridge: Served, user: str, device: str) -> AsyncIterator[ChatClient]:
    async with ChatClient(
        host="127.0.0.1",
        port=deployment.mosquitto_port,
        user=user,
        device=device,
        token=deployment.token(user, device),
        resend_after=1.0,
        http_url=f"http://127.0.0.1:{bridge.http_port}",
        gap_grace_s=0.3,
        one_at_a_time=True,
    ) as client:
        yield client


async def test_three_workers_one_killed_mid_run_lose_nothing_and_store_nothing_twice(
    cassandra_storage_config: StorageConfig,  # noqa: F811
    tmp_path: Path,
) -> None:
    senders = [(unique("s"), unique("phone")) for _ in range(SENDERS)]
    recipients = [(unique("r"), unique("phone")) for _ in range(SENDERS)]
    with mosquitto(tmp_path, senders + recipients) as deployment:
        bridge = start_bridge(deployment, tmp_path, cassandra_storage_config.url)
        try:
            await bridge.wait_healthy()
            await workers_connected(deployment, WORKERS)
            async with contextlib.AsyncExitStack() as stack:
                inbox: dict[str, list[int]] = {}
                readers = []
                for user, device in recipients:
                    client = await stack.enter_async_context(phone(deployment, bridge, user, device))
                    inbox[user] = []

                    async def read(client: ChatClient = client, user: str = user) -> None:
                        async for event in client.events():
                            if isinstance(event, Message):
                                inbox[user].append(event.seq)

                    readers.append(asyncio.create_task(read()))
                phones = [await stack.enter_async_context(phone(deployment, bridge, u, d)) for u, d in senders]
                sent: dict[str, list[str]] = {u: [] for u, _ in senders}
                for k in range(MESSAGES_EACH):
                    for (user, _d), client, (peer, _p) in zip(senders, phones, recipients, strict=True):
                        sent[user].append(await client.send(dm_conv(user, peer), f"{user} #{k}"))
                    if k == MESSAGES_EACH // 3:
                        waiting = sum(c.statistics().pending for c in phones)
                        assert waiting > 0, "sends still in flight when the worker dies"
                        await bridge.kill9("worker-1")  # the supervisor starts it again
                    await asyncio.sleep(0.05)
                for (user, _d), client in zip(senders, phones, strict=True):
                    for id in sent[user]:
                        await client.wait_acked(id, timeout=60)
                # Every message stored once, each sender's in the order it sent them.
                for (user, _d), (peer, _p) in zip(senders, recipients, strict=True):
                    async with bridge.http(peer) as http:
                        page = (
                            await http.get(f"/v1/conversations/{dm_conv(user, peer)}/messages", params={"limit": 500})
                        ).json()
                    assert [m["seq"] for m in page["messages"]] == list(range(1, MESSAGES_EACH + 1))
                    assert [m["id"] for m in page["messages"]] == sent[user], "stored once each, in send order"
                deadline = time.monotonic() + 60
                while any(seqs != list(range(1, MESSAGES_EACH + 1)) for seqs in inbox.values()):
                    assert time.monotonic() < deadline, {u: s[-5:] for u, s in inbox.items()}
                    await asyncio.sleep(0.1)
                for task in readers:
                    task.cancel()
            # Mosquitto's pattern ACLs: a device cannot read another user's topics, nor speak as another device.
            watcher = await connect(
                "127.0.0.1",
                deployment.mosquitto_port,
                Creds("$mqchat-watch", SERVICE_USERNAME, service_password(deployment.secret)),
            )
            seen: list[str] = []
            (sender, device), (peer, _p) = senders[0], recipients[0]
            intruder = await connect(
                "127.0.0.1",
                deployment.mosquitto_port,
                Creds(device, sender, deployment.token(sender, device)),
                on_message=lambda t, p, q: seen.append(t),
            )
            try:
                await intruder.subscribe([(f"u/{peer}/in", 1), (f"u/{sender}/in", 1)])
                watcher.publish(f"u/{peer}/in", b"{}", 1)
                watcher.publish(f"u/{sender}/in", b"{}", 1)
                async with asyncio.timeout(10):
                    while f"u/{sender}/in" not in seen:
                        await asyncio.sleep(0.02)
                # The watcher published to the peer's topic first: had it been let through, it would be here.
                assert f"u/{peer}/in" not in seen, "only its own user's topic reaches the device"
            finally:
                intruder.disconnect()
                watcher.disconnect()
        finally:
            stop_served(bridge)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--broker", "127.0.0.1:1883", "--workers", "2"], "several bridge workers need a store they share"),
        (["--broker", "127.0.0.1"], "is not HOST:PORT"),
        (["--broker", "127.0.0.1:1883", "--workers", "0"], "0 is not a positive whole number"),
        (["--workers", "2"], "needs the broker it serves"),
    ],
)
def test_mqchat_bridge_refuses_what_cannot_work_in_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mqchat", "bridge", "--data-dir", str(tmp_path), "--http-port", "0", *args],
        env=repo_env() | {"MQCHAT_JWT_SECRET": secrets.token_urlsafe(32)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode in (1, 2), done.stderr
    assert message in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr


def test_mqchat_bridge_never_makes_up_a_secret(tmp_path: Path) -> None:
    """Its workers must share the deployment's secret: without one it stops, whatever else is set."""
    done = subprocess.run(
        [sys.executable, "-m", "mqchat", "bridge", "--data-dir", str(tmp_path), "--broker", "127.0.0.1:1883"],
        env=repo_env() | {"MQCHAT_TOKEN": "a-device-token"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "secret" in done.stderr.lower(), done.stderr
    assert not (tmp_path / "jwt_secret").exists()
