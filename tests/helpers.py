"""Test helpers: raw MQTT devices (aiomqtt, no mqchat SDK), unique ids, bounded waits, `mqchat serve`."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from clients.testing.loadgen import MqttClient
from mqchat.bench.processes import serve_command, wait_healthy
from mqchat.ports import free_port

_counter = itertools.count()


def unique(prefix: str) -> str:
    """A fresh id for this test run (users, devices, client message ids)."""
    return f"{prefix}{next(_counter)}-{uuid.uuid4().hex[:6]}"


@dataclass
class Device:
    """A raw MQTT device: publishes envelopes, records everything it receives."""

    client: aiomqtt.Client
    user: str
    device: str
    received: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def send(self, envelope: dict[str, Any] | bytes, *, topic: str | None = None) -> None:
        payload = envelope if isinstance(envelope, bytes) else json.dumps(envelope).encode()
        await self.client.publish(topic or f"u/{self.user}/{self.device}/out", payload, qos=1)

    def envelopes(self, type_: str | None = None) -> list[dict[str, Any]]:
        return [e for _, e in self.received if type_ is None or e.get("type") == type_]

    async def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], *, count: int = 1, timeout: float = 10.0
    ) -> list[dict[str, Any]]:
        """Wait until count received envelopes match predicate; return them."""
        deadline = time.monotonic() + timeout
        while True:
            found = [e for _, e in self.received if predicate(e)]
            if len(found) >= count:
                return found
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"{self.user}/{self.device}: wanted {count} matching envelopes, got {len(found)}; "
                    f"received: {self.received[-10:]}"
                )
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._arrived.wait()

    async def _reader(self) -> None:
        async for message in self.client.messages:
            payload = message.payload
            assert isinstance(payload, bytes | bytearray)
            try:
                envelope = json.loads(payload)
            except ValueError:
                envelope = {"type": "<not json>", "raw": bytes(payload)}
            self.received.append((message.topic.value, envelope))
            self._arrived.set()


@contextlib.asynccontextmanager
async def connect_device(
    port: int,
    user: str,
    device: str,
    token: str,
    *,
    subscribe: bool = True,
    clean_session: bool = True,
) -> AsyncIterator[Device]:
    """Connect a device with aiomqtt and subscribe to its two in-topics."""
    client = aiomqtt.Client(
        "127.0.0.1",
        port,
        username=user,
        password=token,
        identifier=device,
        clean_session=clean_session,
        keepalive=30,
        timeout=10,
    )
    async with client:
        dev = Device(client=client, user=user, device=device)
        if subscribe:
            await client.subscribe([(f"u/{user}/in", 1), (f"u/{user}/{device}/in", 1)])
        reader = asyncio.create_task(dev._reader())
        try:
            yield dev
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await reader


def send_env(conv: str, body: str = "hello", *, id: str | None = None) -> dict[str, Any]:
    return {"type": "send", "id": id or unique("m"), "conv": conv, "body": body, "kind": "text"}


def repo_env() -> dict[str, str]:
    """Environment for subprocesses: no stray MQCHAT_* settings from the caller."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("MQCHAT_", "PROMETHEUS_"))}


@contextlib.contextmanager
def serve_in(
    home: Path, log: Path, *, preexec_fn: Callable[[], object] | None = None
) -> Iterator[tuple[subprocess.Popen[bytes], int, int]]:
    """`python -m mqchat serve` as `make serve` runs it: in ``home``, with the default data dir
    and the secret it generates there. Yields (process, mqtt port, http port) once ``/healthz``
    answers (within 60 s); stopped with SIGTERM on the way out."""
    mqtt_port, http_port = free_port(), free_port()
    with log.open("w") as out:
        proc = subprocess.Popen(
            serve_command(mqtt_port=mqtt_port, http_port=http_port),
            cwd=home,
            env=repo_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=preexec_fn,
        )
    try:
        assert wait_healthy(proc, http_port, limit_s=60), f"mqchat serve did not become healthy:\n{log.read_text()}"
        yield proc, mqtt_port, http_port
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


async def send_until_acked(
    port: int,
    user: str,
    device: str,
    token: str,
    envelopes: list[dict[str, Any]],
    *,
    resend_after: float = 2.0,
    deadline_s: float = 90.0,
    on_progress: Callable[[int], Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """Behave like a phone's outbox: (re)connect, publish every unacked envelope, re-send
    with the same ids until each is acked. Returns the acks by client id."""
    acks: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + deadline_s
    while len(acks) < len(envelopes):
        if time.monotonic() > deadline:
            raise AssertionError(f"only {len(acks)}/{len(envelopes)} acked in {deadline_s}s")
        try:
            async with connect_device(port, user, device, token) as dev:
                while len(acks) < len(envelopes) and time.monotonic() < deadline:
                    for env in envelopes:
                        if env["id"] not in acks:
                            await dev.send(env)
                    round_end = time.monotonic() + resend_after
                    while time.monotonic() < round_end and len(acks) < len(envelopes):
                        for e in dev.envelopes("ack"):
                            acks.setdefault(e["id"], e)
                        if on_progress is not None:
                            on_progress(len(acks))
                        await asyncio.sleep(0.05)
        except aiomqtt.MqttError:
            await asyncio.sleep(0.3)
    return acks


async def wait_until(predicate: Callable[[], bool], *, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll predicate until it holds; fail after timeout."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not met in {timeout}s"
        await asyncio.sleep(0.02)


class ChannelFeed:
    """The bodies of the ``msg`` events each user's raw client hears on channel conv's topic."""

    def __init__(self, conv: str, users: Iterable[str]) -> None:
        self.topic = f"c/{conv}/in"
        self.received: dict[str, list[str]] = {user: [] for user in users}

    def listener(self, user: str) -> Callable[[str, bytes, int], None]:
        def on_message(topic: str, payload: bytes, qos: int) -> None:
            envelope = json.loads(payload)
            if topic == self.topic and envelope.get("type") == "msg":
                self.received[user].append(envelope["body"])

        return on_message


async def subscribe_until(client: MqttClient, topic: str, granted: int, *, what: str, timeout: float = 10.0) -> None:
    """Subscribe client to topic again until the broker answers granted: a membership change
    made through another node reaches this node's ACL a moment later."""
    deadline = time.monotonic() + timeout
    while await client.subscribe([(topic, 1)]) != [granted]:
        assert time.monotonic() < deadline, f"{what} not seen in {timeout}s"
        await asyncio.sleep(0.05)


def installed(name: str, *, why: str, places: Iterable[str] = ()) -> str:
    """The path of program name (on PATH, else in places); the test fails, saying why it needs
    it, when it is missing: `make test` installs the Debian package of the same name."""
    found = shutil.which(name) or next((p for p in places if Path(p).is_file()), None)
    if found is None:
        pytest.fail(f"{name} is not installed: {why} (`make test` installs the Debian package {name})", pytrace=False)
    return found


@contextlib.contextmanager
def running_mosquitto(binary: str | Path, conf: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Mosquitto with conf, its output in log, once it says it is running (within 10 s);
    terminated on the way out."""
    with log.open("ab") as out:
        proc = subprocess.Popen([str(binary), "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while "running" not in log.read_text(errors="replace"):
            assert proc.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.02)
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=10)
