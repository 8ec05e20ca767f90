"""Presence through the real broker: connect/disconnect/keepalive/cut → retained p/{user}, the
grace window, the privacy rule on subscribe and on GET /v1/presence."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from clients.testing.loadgen import Creds, connect
from clients.testing.netem import PERFECT, LossyProxy
from mqchat.config import PresenceConfig
from tests.conftest import Stack, make_config, open_stack
from tests.helpers import connect_device, unique, wait_until
from tests.mqtt_raw import RawClient

GRACE_S = 0.5


@pytest.fixture
async def pstack(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Stack]:
    """A stack with a short grace window; indirect param: (adapter, grace window in seconds)."""
    adapter, grace_s = getattr(request, "param", ("inbroker", GRACE_S))
    async with open_stack(make_config(tmp_path, presence=PresenceConfig(grace_s=grace_s)), adapter) as stack:
        yield stack


class Watcher:
    """A device of `user` following p/{target}; records every state it is sent."""

    def __init__(self) -> None:
        self.states: list[dict[str, Any]] = []

    def on_message(self, topic: str, payload: bytes, qos: int) -> None:
        if topic.startswith("p/"):
            self.states.append(json.loads(payload))

    async def wait_state(self, state: str, *, count: int = 1, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while len([s for s in self.states if s["state"] == state]) < count:
            assert time.monotonic() < deadline, f"no {state!r} presence (#{count}) in {timeout}s; got {self.states}"
            await asyncio.sleep(0.02)
        return [s for s in self.states if s["state"] == state][count - 1]


@contextlib.asynccontextmanager
async def watching(stack: Stack, user: str, target: str) -> AsyncIterator[Watcher]:
    watcher = Watcher()
    device = unique("w")
    client = await connect(
        "127.0.0.1", stack.mqtt_port, Creds(device, user, stack.token(user, device)), on_message=watcher.on_message
    )
    try:
        assert await client.subscribe([(f"p/{target}", 1)]) == [1]
        await watcher.wait_state("offline")  # the retained (or registry's) state: never seen yet
        yield watcher
    finally:
        client.disconnect()
        await client.wait_closed()


async def friends(stack: Stack, *users: str) -> None:
    """Put users in one group: they share a conversation."""
    async with stack.http(users[0]) as http:
        r = await http.post("/v1/groups", json={"name": "friends", "members": list(users[1:])})
        assert r.status_code == 201


async def presence_of(stack: Stack, asker: str, user: str) -> dict[str, Any]:
    async with stack.http(asker) as http:
        r = await http.get("/v1/presence", params={"users": user})
    assert r.status_code == 200, r.text
    (found,) = r.json()["users"]
    assert found["user"] == user
    return dict(found)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@pytest.mark.parametrize("pstack", [("mqtt", GRACE_S), ("inbroker", GRACE_S)], indirect=True)
async def test_online_then_offline_after_the_grace_window_with_last_seen(pstack: Stack) -> None:
    alice, bob = unique("alice"), unique("bob")
    await friends(pstack, alice, bob)
    assert (await presence_of(pstack, bob, alice)) == {"user": alice, "state": "offline", "last_seen": None}
    async with watching(pstack, bob, alice) as watcher:
        before = now_ms()
        async with connect_device(pstack.mqtt_port, alice, "a1", pstack.token(alice, "a1")):
            online = await watcher.wait_state("online")
            assert online["last_seen"] >= before
            await wait_for(lambda: presence_of(pstack, bob, alice), "online")
            left = now_ms()
        assert (await presence_of(pstack, bob, alice))["state"] == "online", "inside the grace window"
        offline = await watcher.wait_state("offline", count=2)
        assert left - 50 <= offline["last_seen"] <= left + 500
        await wait_for(lambda: presence_of(pstack, bob, alice), "offline")
        assert (await presence_of(pstack, bob, alice))["last_seen"] == offline["last_seen"]
    # A late subscriber gets the current state, retained.
    async with watching(pstack, bob, alice) as late:
        assert late.states[-1] == offline


@pytest.mark.parametrize("pstack", [("inbroker", GRACE_S)], indirect=True)
async def test_keepalive_timeout_and_network_cuts_take_a_device_offline(pstack: Stack) -> None:
    alice, bob = unique("alice"), unique("bob")
    await friends(pstack, alice, bob)
    async with watching(pstack, bob, alice) as watcher:
        # A client that stops talking: cut after 1.5 × its keepalive (1 s).
        raw = await asyncio.to_thread(RawClient, pstack.mqtt_port)
        code = await asyncio.to_thread(raw.connect, "a-silent", alice, pstack.token(alice, "a-silent"), keepalive=1)
        assert code == 0
        connected_at = now_ms()
        await watcher.wait_state("online")
        assert await asyncio.to_thread(raw.closed_by_peer, 5.0)
        raw.close()
        offline = await watcher.wait_state("offline", count=2, timeout=5)
        assert offline["last_seen"] - connected_at >= 1400, "gone when the keepalive ran out, not before"

        async with LossyProxy(target_port=pstack.mqtt_port, profile=PERFECT, seed=7) as proxy:
            # A connection reset on the way (both ends see RST).
            device = "a-cut"
            client = await connect("127.0.0.1", proxy.port, Creds(device, alice, pstack.token(alice, device)))
            await watcher.wait_state("online", count=2)
            assert proxy.cut_all() == 1
            await client.wait_closed()
            await watcher.wait_state("offline", count=3, timeout=5)
            # A silent outage (nothing reaches the broker any more): the keepalive finds it.
            device = "a-outage"
            client = await connect(
                "127.0.0.1", proxy.port, Creds(device, alice, pstack.token(alice, device)), keepalive=1
            )
            await watcher.wait_state("online", count=3)
            proxy.pause()
            outage = now_ms()
            offline = await watcher.wait_state("offline", count=4, timeout=8)
            assert offline["last_seen"] - outage >= 1000
            proxy.resume()
            client.disconnect()


@pytest.mark.parametrize("pstack", [("inbroker", 1.5)], indirect=True)
async def test_flapping_within_the_grace_window_never_shows_offline(pstack: Stack) -> None:
    alice, bob = unique("alice"), unique("bob")
    await friends(pstack, alice, bob)
    async with watching(pstack, bob, alice) as watcher:
        for _ in range(5):
            async with connect_device(pstack.mqtt_port, alice, "a1", pstack.token(alice, "a1")):
                await watcher.wait_state("online")
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.3)  # down, shorter than the window
        # A device taking over its own older connection is no disconnect either.
        async with (
            connect_device(pstack.mqtt_port, alice, "a2", pstack.token(alice, "a2"), clean_session=False),
            connect_device(pstack.mqtt_port, alice, "a2", pstack.token(alice, "a2"), clean_session=False),
        ):
            await asyncio.sleep(2.0)  # longer than the window
            assert (await presence_of(pstack, bob, alice))["state"] == "online"
        assert [s["state"] for s in watcher.states] == ["offline", "online"]
        await watcher.wait_state("offline", count=2, timeout=5)


@pytest.mark.parametrize("pstack", [("mqtt", GRACE_S), ("inbroker", GRACE_S)], indirect=True)
async def test_presence_is_private_to_users_sharing_a_conversation(pstack: Stack) -> None:
    alice, bob, carol = unique("alice"), unique("bob"), unique("carol")
    await friends(pstack, alice, bob)
    device = unique("c")
    client = await connect("127.0.0.1", pstack.mqtt_port, Creds(device, carol, pstack.token(carol, device)))
    try:
        assert await client.subscribe([(f"p/{alice}", 1), ("p/+", 1), ("p/#", 1), (f"p/{carol}", 1)]) == [
            0x80,
            0x80,
            0x80,
            1,
        ]
    finally:
        client.disconnect()
        await client.wait_closed()
    async with pstack.http(carol) as http:
        r = await http.get("/v1/presence", params={"users": f"{carol},{alice}"})
        assert (r.status_code, r.json()["error"]) == (403, "forbidden")
        for bad in ("", ",", "not an id!", ",".join(f"u{i}" for i in range(201))):
            r = await http.get("/v1/presence", params={"users": bad})
            assert (r.status_code, r.json()["error"]) == (400, "bad_request"), bad
        r = await http.get("/v1/presence", params={"users": carol})  # oneself: always allowed
        assert r.status_code == 200
        assert r.json()["users"][0]["user"] == carol
    async with pstack.http() as http:
        assert (await http.get("/v1/presence", params={"users": alice})).status_code == 401
    # Once carol shares a conversation with alice, she may follow her.
    await friends(pstack, alice, carol)
    assert (await presence_of(pstack, carol, alice))["state"] == "offline"
    async with watching(pstack, carol, alice):
        pass


async def wait_for(ask: Any, state: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (await ask())["state"] != state:
        assert time.monotonic() < deadline, f"presence never became {state}"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("pstack", [("mqtt", GRACE_S), ("inbroker", GRACE_S)], indirect=True)
async def test_leaving_the_last_shared_group_ends_presence_subscriptions(pstack: Stack) -> None:
    alice, bob = unique("alice"), unique("bob")
    async with pstack.http(alice) as http:
        group = (await http.post("/v1/groups", json={"name": "g", "members": [bob]})).json()["conv"]
    async with watching(pstack, bob, alice) as watcher:
        async with connect_device(pstack.mqtt_port, alice, "a1", pstack.token(alice, "a1")):
            await watcher.wait_state("online")
        await watcher.wait_state("offline", count=2)
        async with pstack.http(bob) as http:
            assert (await http.delete(f"/v1/groups/{group}/members/{bob}")).status_code == 200
            r = await http.get("/v1/presence", params={"users": alice})
            assert r.status_code == 403
        await asyncio.sleep(0.5)  # the broker checks the pair again
        seen = len(watcher.states)
        async with connect_device(pstack.mqtt_port, alice, "a1", pstack.token(alice, "a1")):
            await asyncio.sleep(0.5)
        assert len(watcher.states) == seen, "bob no longer hears alice's presence"


async def test_channel_members_do_not_see_each_others_presence(pstack: Stack) -> None:
    alice, carol = unique("alice"), unique("carol")
    async with pstack.http(alice) as http:
        r = await http.post("/v1/groups", json={"name": "c", "members": [carol], "kind": "channel"})
        assert r.status_code == 201
    async with pstack.http(carol) as http:
        assert (await http.get("/v1/presence", params={"users": alice})).status_code == 403
    device = unique("c")
    client = await connect("127.0.0.1", pstack.mqtt_port, Creds(device, carol, pstack.token(carol, device)))
    try:
        assert await client.subscribe([(f"p/{alice}", 1)]) == [0x80]
    finally:
        client.disconnect()
        await client.wait_closed()


@pytest.mark.parametrize("pstack", [("mqtt", GRACE_S), ("inbroker", GRACE_S)], indirect=True)
async def test_a_user_who_hides_presence_is_seen_by_nobody_at_once(pstack: Stack) -> None:
    alice, bob = unique("alice"), unique("bob")
    await friends(pstack, alice, bob)
    async with watching(pstack, bob, alice) as watcher:
        subscriptions = REGISTRY.get_sample_value("mqchat_broker_subscriptions") or 0.0
        async with pstack.http(alice) as http:
            r = await http.put("/v1/me/settings", json={"presence": "nobody"})
            assert r.json()["presence"] == "nobody"
        # The broker ends bob's existing subscription to p/alice (the gauge drops by one)…
        await wait_until(lambda: (REGISTRY.get_sample_value("mqchat_broker_subscriptions") or 0) < subscriptions)
        seen = len(watcher.states)
        async with connect_device(pstack.mqtt_port, alice, "a1", pstack.token(alice, "a1")):
            await wait_for(lambda: presence_of(pstack, alice, alice), "online")
        assert len(watcher.states) == seen, "bob no longer hears alice's presence"
    # …refuses a new one, and the HTTP API answers 403.
    device = unique("b")
    client = await connect("127.0.0.1", pstack.mqtt_port, Creds(device, bob, pstack.token(bob, device)))
    try:
        assert await client.subscribe([(f"p/{alice}", 1)]) == [0x80]
    finally:
        client.disconnect()
        await client.wait_closed()
    async with pstack.http(bob) as http:
        assert (await http.get("/v1/presence", params={"users": alice})).status_code == 403
    async with pstack.http(alice) as http:
        await http.put("/v1/me/settings", json={"presence": "contacts"})
    assert (await presence_of(pstack, bob, alice))["user"] == alice, "visible again once she says so"
