"""Two `mqchat serve` processes sharing one real redis-server agree on presence, and a killed
server's devices go offline on their own."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from pathlib import Path
from typing import Any

from clients.testing.loadgen import Creds, connect
from tests.conftest import Served, start_served, stop_served
from tests.helpers import connect_device, unique, wait_until
from tests.redis_server import redis_url  # noqa: F401


async def presence(served: Served, asker: str, user: str) -> dict[str, Any]:
    async with served.http(asker) as http:
        r = await http.get("/v1/presence", params={"users": user})
    assert r.status_code == 200, r.text
    found: dict[str, Any] = r.json()["users"][0]
    return found


async def until(served: Served, asker: str, user: str, state: str, timeout: float = 15.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        found = await presence(served, asker, user)
        if found["state"] == state:
            return found
        assert time.monotonic() < deadline, f"{user} never became {state} on port {served.http_port}: {found}"
        await asyncio.sleep(0.1)


async def test_two_servers_sharing_redis_agree_on_presence(tmp_path: Path, redis_url: str) -> None:  # noqa: F811
    secret = secrets.token_urlsafe(32)
    env = {"MQCHAT_REDIS_URL": redis_url, "MQCHAT_PRESENCE_GRACE": "0.5s", "MQCHAT_PRESENCE_TTL": "2s"}
    # One of each shape: a single node (in-broker bridge) and broker + bridge processes.
    a = start_served(tmp_path / "a", secret, tmp_path / "a.log", adapter="inbroker", env=env)
    b = start_served(tmp_path / "b", secret, tmp_path / "b.log", adapter="mqtt", env=env)
    try:
        await a.wait_healthy()
        await b.wait_healthy()
        alice, bob = unique("alice"), unique("bob")
        async with b.http(bob) as http:  # bob and alice share a group on server b
            assert (await http.post("/v1/groups", json={"name": "g", "members": [alice]})).status_code == 201
        states: list[dict[str, Any]] = []
        watcher = await connect(
            "127.0.0.1",
            b.mqtt_port,
            Creds("bob-watch", bob, b.token(bob, "bob-watch")),
            on_message=lambda topic, payload, qos: states.append(json.loads(payload)),
        )
        try:
            assert await watcher.subscribe([(f"p/{alice}", 1)]) == [1]
            # Alice connects to server a: server b's broker, bridge and subscribers all hear it.
            async with connect_device(a.mqtt_port, alice, "alice-phone", a.token(alice, "alice-phone")):
                on_a = await until(a, alice, alice, "online")
                on_b = await until(b, bob, alice, "online")
                assert on_a == on_b
                await wait_until(lambda: any(s["state"] == "online" for s in states))
            off_a = await until(a, alice, alice, "offline")
            off_b = await until(b, bob, alice, "offline")
            assert off_a == off_b
            assert off_b["last_seen"] >= on_b["last_seen"]
            await wait_until(lambda: states[-1] == {"state": "offline", "last_seen": off_b["last_seen"]})

            # Server a dies with alice connected (no disconnect is ever reported): her device goes
            # offline on its own once a's liveness expires, as server b sees it.
            phone = await connect("127.0.0.1", a.mqtt_port, Creds("alice-phone", alice, a.token(alice, "alice-phone")))
            await until(b, bob, alice, "online")
            killed = time.monotonic()
            await a.kill9("node")
            phone.disconnect()
            gone = await until(b, bob, alice, "offline", timeout=20)
            assert time.monotonic() - killed >= 0.5
            await wait_until(lambda: states[-1] == {"state": "offline", "last_seen": gone["last_seen"]})
            assert (await presence(a, alice, alice)) == gone, "the restarted server a agrees"
        finally:
            watcher.disconnect()
            await watcher.wait_closed()
    finally:
        stop_served(a)
        stop_served(b)
