"""MQTT.js, the JavaScript MQTT client browsers and Node apps use, scripted from a test over
ws:// or wss://.

    test ──JSON lines on stdin──▶ node tests/js/mqtt_client.mjs ──MQTT over WebSocket──▶ broker
         ◀─JSON lines on stdout──  (one MQTT.js client)         ◀───────────────────────

    async with MqttJsClient(url=f"ws://127.0.0.1:{port}/mqtt", client_id="a1") as a:
        await a.wait_for("connect")
        assert await a.subscribe("t/1") == [1]
        await a.publish("t/1", "hello")          # returns on PUBACK
        message = await a.next_message()         # Message(topic="t/1", payload="hello", ...)

Every event the client reports (connect, suback, puback, message, error, close) is kept in
``events``; a wait that meets an error or close instead of what it wants fails at once, saying
what the client saw. Leaving the block ends the session and always stops the process.

MQTT.js is pinned by tests/js/package-lock.json; `make js-deps` (part of `make test`) installs it.
Without it a test fails under CI (``CI`` set) and is skipped elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import pytest

JS_DIR = Path(__file__).resolve().parent / "js"
SCRIPT = JS_DIR / "mqtt_client.mjs"
# One event a line; a message's payload is in it, so lines can be long.
LINE_LIMIT = 16 * 1024 * 1024
CLOSE_TIMEOUT_S = 5.0


def node_available() -> bool:
    """Whether node is on PATH and MQTT.js is installed in tests/js/node_modules."""
    return shutil.which("node") is not None and (JS_DIR / "node_modules" / "mqtt" / "package.json").is_file()


def require_mqttjs() -> None:
    """Stop the calling test when node or MQTT.js is missing: a failure under CI, where `make
    test` has installed them, and a skip elsewhere (e.g. pytest run on a fresh clone)."""
    if node_available():
        return
    if shutil.which("node") is None:
        why = "node is not installed (`make test` installs the Debian packages nodejs and npm)"
    else:
        why = f"MQTT.js is not installed in {JS_DIR / 'node_modules'} (`make js-deps` installs it; `make test` runs it)"
    if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
        pytest.fail(f"{why}: the WebSocket interop tests drive MQTT.js", pytrace=False)
    pytest.skip(why)


@dataclass(frozen=True)
class Message:
    """A PUBLISH the client received; the payload decoded as UTF-8."""

    topic: str
    payload: str
    qos: int
    retain: bool


class MqttJsClient:
    """One MQTT.js client (MQTT 3.1.1, no reconnects) in its own node process, whose reports a
    reader task (in the client's TaskGroup) records as they come.

    ``url`` is ws://host:port/path or wss://…; ``ca`` the path of a PEM bundle that a wss://
    server certificate must chain to (Node's own roots otherwise).
    """

    def __init__(
        self,
        *,
        url: str,
        username: str | None = None,
        password: str | None = None,
        client_id: str | None = None,
        ca: Path | str | None = None,
        clean: bool = True,
        keepalive: int = 30,
    ) -> None:
        self.url = url
        self.name = client_id or "mqttjs"
        settings: dict[str, Any] = {"url": url, "clean": clean, "keepalive": keepalive}
        for key, value in (("username", username), ("password", password), ("clientId", client_id)):
            if value is not None:
                settings[key] = value
        if ca is not None:
            settings["ca"] = str(ca)
        self._settings = settings
        self.events: list[dict[str, Any]] = []  # everything reported, in order
        self._unread: list[dict[str, Any]] = []  # reported and not yet taken by a wait
        self._arrived = asyncio.Event()
        self._ended = False  # the process's output has ended
        self._ids = itertools.count()
        self._proc: asyncio.subprocess.Process | None = None
        self._stderr = bytearray()
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> Self:
        require_mqttjs()
        node = shutil.which("node")
        assert node is not None
        async with contextlib.AsyncExitStack() as stack:
            tasks = await stack.enter_async_context(asyncio.TaskGroup())
            self._proc = await asyncio.create_subprocess_exec(
                node,
                str(SCRIPT),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                limit=LINE_LIMIT,
            )
            readers = [
                tasks.create_task(self._read_events(), name=f"mqttjs-{self.name}-events"),
                tasks.create_task(self._read_stderr(), name=f"mqttjs-{self.name}-stderr"),
            ]
            stack.push_async_callback(self._stop, readers)
            # The settings go on stdin, not argv: a password on a command line is public.
            await self._send(self._settings)
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """End the session (a DISCONNECT if still connected) and stop the process: killed if it
        has not exited within a few seconds. Safe to call again."""
        await self._stack.aclose()

    @property
    def returncode(self) -> int | None:
        """The node process's exit status; None while it runs."""
        return None if self._proc is None else self._proc.returncode

    # --- commands --------------------------------------------------------------------------------

    async def subscribe(self, topic: str | list[str], *, qos: int = 1, timeout: float = 10.0) -> list[int]:
        """SUBSCRIBE; the granted QoS per topic from the SUBACK (128: refused)."""
        reply = await self._call({"cmd": "subscribe", "topic": topic, "qos": qos}, "suback", timeout)
        return [int(g) for g in reply["granted"]]

    async def unsubscribe(self, topic: str | list[str], *, timeout: float = 10.0) -> None:
        await self._call({"cmd": "unsubscribe", "topic": topic}, "unsuback", timeout)

    async def publish(
        self, topic: str, payload: str, *, qos: int = 1, retain: bool = False, timeout: float = 10.0
    ) -> None:
        """PUBLISH; returns once acknowledged (PUBACK at QoS 1, PUBCOMP at 2; written, at 0)."""
        acked = ("sent", "puback", "pubcomp")[qos]
        command = {"cmd": "publish", "topic": topic, "payload": payload, "qos": qos, "retain": retain}
        await self._call(command, acked, timeout)

    async def next_message(self, *, timeout: float = 10.0) -> Message:
        """The oldest received message not yet taken."""
        event = await self.wait_for("message", timeout=timeout)
        return Message(topic=event["topic"], payload=event["payload"], qos=event["qos"], retain=event["retain"])

    async def end(self, *, timeout: float = 10.0) -> int:
        """DISCONNECT and close; the exit status of the node process (0 for a clean end)."""
        await self._send({"cmd": "end"})
        return await self.wait_exit(timeout=timeout)

    async def wait_exit(self, *, timeout: float = 10.0) -> int:
        """The exit status of the node process once it has exited: 0 after `end`, 1 when the
        connection was refused or lost, 2 for a command it did not understand."""
        assert self._proc is not None, "not started"
        try:
            async with asyncio.timeout(timeout):
                return await self._proc.wait()
        except TimeoutError:
            raise AssertionError(self._describe(f"still running after {timeout}s")) from None

    # --- events ----------------------------------------------------------------------------------

    def messages_nowait(self) -> list[Message]:
        """The received messages not yet taken, taken now."""
        taken = [e for e in self._unread if e["event"] == "message"]
        self._unread = [e for e in self._unread if e["event"] != "message"]
        return [Message(topic=e["topic"], payload=e["payload"], qos=e["qos"], retain=e["retain"]) for e in taken]

    async def wait_for(self, event: str, *, timeout: float = 10.0, **fields: Any) -> dict[str, Any]:
        """The oldest unread event of this kind (with these field values); takes it from the
        unread ones. Fails at once when an error or close comes first, or the process ends."""
        wanted = {"event": event, **fields}
        try:
            async with asyncio.timeout(timeout):
                while True:
                    for i, seen in enumerate(self._unread):
                        if all(seen.get(k) == v for k, v in wanted.items()):
                            return self._unread.pop(i)
                    for seen in self._unread:
                        if seen["event"] in ("error", "close"):
                            raise AssertionError(self._describe(f"wanted {wanted}, got {seen}"))
                    if self._ended:
                        raise AssertionError(self._describe(f"wanted {wanted}; node exited ({self.returncode})"))
                    self._arrived.clear()
                    await self._arrived.wait()
        except TimeoutError:
            raise AssertionError(self._describe(f"wanted {wanted}, not seen in {timeout}s")) from None

    async def _read_events(self) -> None:
        assert self._proc is not None
        assert self._proc.stdout is not None
        try:
            async for line in self._proc.stdout:
                try:
                    event = json.loads(line)
                except ValueError:
                    event = {"event": "<not json>", "line": line.decode(errors="replace")}
                self.events.append(event)
                self._unread.append(event)
                self._arrived.set()
        finally:
            self._ended = True
            self._arrived.set()

    async def _read_stderr(self) -> None:
        assert self._proc is not None
        assert self._proc.stderr is not None
        while chunk := await self._proc.stderr.read(65536):
            self._stderr += chunk

    async def _call(self, command: dict[str, Any], reply: str, timeout: float) -> dict[str, Any]:
        call_id = next(self._ids)
        await self._send({**command, "id": call_id})
        return await self.wait_for(reply, timeout=timeout, id=call_id)

    async def _send(self, command: dict[str, Any]) -> None:
        assert self._proc is not None, "not started"
        assert self._proc.stdin is not None
        if self._proc.returncode is not None or self._proc.stdin.is_closing():
            raise AssertionError(self._describe(f"cannot send {command.get('cmd')}: node has exited"))
        self._proc.stdin.write(json.dumps(command).encode() + b"\n")
        await self._proc.stdin.drain()

    async def _stop(self, readers: list[asyncio.Task[None]]) -> None:
        proc = self._proc
        assert proc is not None
        try:
            if proc.returncode is None:
                with contextlib.suppress(ConnectionError, AssertionError):
                    await self._send({"cmd": "end"})
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(CLOSE_TIMEOUT_S):
                        await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
            if proc.stdin is not None:
                proc.stdin.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await proc.wait()
            # The readers end with the output; should a pipe stay open, they are cancelled.
            await asyncio.wait(readers, timeout=CLOSE_TIMEOUT_S)
            for reader in readers:
                reader.cancel()

    def _describe(self, what: str) -> str:
        stderr = self._stderr[-3000:].decode(errors="replace")
        events = "\n  ".join(json.dumps(e) for e in self.events[-15:])
        return f"MQTT.js {self.name} ({self.url}): {what}\nlast events:\n  {events}\nstderr:\n{stderr}"
