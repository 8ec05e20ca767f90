"""Push end to end: messages through the bridge → the dispatcher → the real aioapns and
firebase-admin code → local fake APNs (HTTP/2 + TLS) and FCM servers."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from mqchat.config import PushConfig
from tests.conftest import Stack, both_stores, make_config, open_stack, start_served, stop_served, storage_for
from tests.fakes.apns import ApnsReply, FakeApns
from tests.fakes.fcm import FakeFcm
from tests.helpers import connect_device, send_env, unique

TOPIC = "com.example.chat"
WINDOW_S = 0.6


@pytest.fixture
async def fakes() -> AsyncIterator[tuple[FakeApns, FakeFcm]]:
    async with FakeApns() as apns, FakeFcm() as fcm:
        yield apns, fcm


def push_config(tmp_path: Path, apns: FakeApns, fcm: FakeFcm) -> PushConfig:
    key = tmp_path / "AuthKey.p8"
    key.write_text(apns.key_pem)
    account = tmp_path / "service-account.json"
    account.write_text(json.dumps(fcm.service_account_info()))
    return PushConfig(
        window_s=WINDOW_S,
        apns_key_file=str(key),
        apns_key_id=apns.key_id,
        apns_team_id=apns.team_id,
        apns_topic=TOPIC,
        apns_host="127.0.0.1",
        apns_port=apns.port,
        apns_ca_file=str(apns.ca_file),
        fcm_credentials=str(account),
        fcm_endpoint=fcm.url,
    )


async def register(stack: Stack, user: str, device: str, platform: str, token: str) -> None:
    async with stack.http(user, device) as http:
        r = await http.put(f"/v1/devices/{device}/push", json={"platform": platform, "token": token})
    assert r.status_code == 200, r.text


def suppressed() -> dict[str, float]:
    return {
        reason: REGISTRY.get_sample_value("mqchat_push_suppressed_total", {"reason": reason}) or 0.0
        for reason in ("online", "read", "interrupted", "no_token")
    }


async def send_burst(stack: Stack, user: str, conv: str, n: int, body: str = "hi") -> None:
    device = unique("send")
    async with connect_device(stack.mqtt_port, user, device, stack.token(user, device)) as dev:
        for i in range(n):
            await dev.send(send_env(conv, f"{body} {i}"))
        await dev.wait_for(lambda e: e["type"] == "ack", count=n)


async def settle(apns: FakeApns, fcm: FakeFcm, *, quiet_s: float = WINDOW_S * 2.5) -> None:
    """Wait until no push has arrived for quiet_s (bounded)."""
    deadline = time.monotonic() + 20
    seen = -1
    while time.monotonic() < deadline:
        now = len(apns.requests) + len(fcm.requests)
        if now == seen:
            return
        seen = now
        await asyncio.sleep(quiet_s)


@both_stores
async def test_bursts_pushes_badges_and_suppression(
    tmp_path: Path, fakes: tuple[FakeApns, FakeFcm], request: pytest.FixtureRequest
) -> None:
    apns, fcm = fakes
    # Receipts coalesce for 50 ms here, not 0.5 s: carol's read receipt must come back well
    # inside the 0.6 s push window.
    base = make_config(tmp_path, storage=storage_for(request, tmp_path), receipt_window_s=0.05)
    config = replace(base, push=push_config(tmp_path, apns, fcm))
    alice, bob, carol, dan = unique("alice"), unique("bob"), unique("carol"), unique("dan")
    dm_bob = ":".join(("dm", *sorted((alice, bob))))
    dm_carol = ":".join(("dm", *sorted((alice, carol))))
    dm_dan = ":".join(("dm", *sorted((alice, dan))))
    before = suppressed()
    report: Counter[str] = Counter()
    async with open_stack(config, "inbroker") as stack:
        await register(stack, bob, "bob-iphone", "apns", "tok-bob-iphone")
        await register(stack, bob, "bob-pixel", "fcm", "tok-bob-pixel")
        await register(stack, bob, "bob-ipad", "apns", "tok-bob-ipad")
        await register(stack, carol, "carol-iphone", "apns", "tok-carol-iphone")
        await register(stack, dan, "dan-phone", "fcm", "tok-dan-phone")
        async with connect_device(stack.mqtt_port, bob, "bob-ipad", stack.token(bob, "bob-ipad")) as ipad:
            # 1. A burst of 20 to bob: his two offline devices get one push each; his iPad is online.
            await send_burst(stack, alice, dm_bob, 20)
            report["messages"] += 20
            await ipad.wait_for(lambda e: e["type"] == "msg", count=20)
            await settle(apns, fcm)
        (iphone,) = apns.requests_for("tok-bob-iphone")
        (pixel,) = fcm.requests_for("tok-bob-pixel")
        assert apns.requests_for("tok-bob-ipad") == [], "a connected device gets no push"
        assert iphone.aps["alert"] == {"title": alice, "body": "20 new messages"}
        assert iphone.aps["badge"] == 20
        assert iphone.headers["apns-priority"] == "10", "1:1 is high priority"
        assert iphone.headers["apns-collapse-id"] == dm_bob
        assert iphone.headers["apns-topic"] == TOPIC
        assert pixel.message["notification"] == {"title": alice, "body": "20 new messages"}
        assert pixel.android["priority"] == "high"
        assert pixel.android["collapse_key"] == dm_bob

        # 2. Carol's phone comes online, reads and goes again, all within the window: no push.
        #    Dan's phone comes online within the window and is still there when it closes: no push.
        #    (Carol reads right after her burst, before dan's: only her own round trips must fit in
        #    the window.)
        carol_sent = time.monotonic()
        await send_burst(stack, alice, dm_carol, 3)
        async with connect_device(stack.mqtt_port, carol, "carol-iphone", stack.token(carol, "carol-iphone")) as c:
            await c.send({"type": "read", "conv": dm_carol, "seq": 3})
            await c.wait_for(lambda e: e["type"] == "receipt")
        assert time.monotonic() - carol_sent < WINDOW_S, "the premise: carol read within the window"
        await send_burst(stack, alice, dm_dan, 2)
        report["messages"] += 5
        async with connect_device(stack.mqtt_port, dan, "dan-phone", stack.token(dan, "dan-phone")):
            await asyncio.sleep(WINDOW_S * 2)
        await settle(apns, fcm)
        assert apns.requests_for("tok-carol-iphone") == []
        assert fcm.requests_for("tok-dan-phone") == []

        # 3. Badges: bob now also has a group with 2 unread: 22 in all.
        async with stack.http(alice) as http:
            group = (await http.post("/v1/groups", json={"name": "team", "members": [bob]})).json()["conv"]
        await send_burst(stack, alice, group, 2)
        report["messages"] += 2
        await settle(apns, fcm)
        group_push = apns.requests_for("tok-bob-iphone")[-1]
        assert group_push.aps["badge"] == 22
        assert group_push.aps["alert"]["title"] == "team"
        assert group_push.headers["apns-priority"] == "5", "groups are normal priority"

        # 4. End-to-end encrypted conversation: no text; muted: no alert.
        async with stack.http(bob, "bob-iphone") as http:
            r = await http.put(f"/v1/conversations/{dm_bob}/settings", json={"e2e": True})
            assert r.json() == {"conv": dm_bob, "muted": False, "e2e": True}
        await send_burst(stack, alice, dm_bob, 1, body="secret ciphertext")
        report["messages"] += 1
        await settle(apns, fcm)
        e2e = apns.requests_for("tok-bob-iphone")[-1]
        assert e2e.aps["mutable-content"] == 1
        assert "secret" not in json.dumps(e2e.payload)
        assert "secret" not in json.dumps(fcm.requests_for("tok-bob-pixel")[-1].message)
        async with stack.http(bob, "bob-pixel") as http:
            r = await http.put(f"/v1/conversations/{group}/settings", json={"muted": True})
            assert r.json()["muted"] is True
        await send_burst(stack, alice, group, 1)
        report["messages"] += 1
        await settle(apns, fcm)
        muted = apns.requests_for("tok-bob-iphone")[-1]
        assert "alert" not in muted.aps
        assert muted.aps["badge"] == 24
        assert muted.headers["apns-push-type"] == "background"

    sent = len(apns.requests) + len(fcm.requests)
    report["devices"] = 5
    report["pushes_sent"] = sent
    after = suppressed()
    for reason in ("online", "read"):
        report[f"suppressed_{reason}"] = int(after[reason] - before[reason])
    print(f"push report: {dict(report)}")
    # bob's iPhone and Pixel: one per burst (4 bursts); the iPad: none while it was connected, then
    # one per burst once it had gone (3); carol: none.
    assert Counter(r.token for r in apns.requests) == {"tok-bob-iphone": 4, "tok-bob-ipad": 3}
    assert Counter(r.target for r in fcm.requests) == {"tok-bob-pixel": 4}
    assert report["suppressed_online"] == 20 + 1, "the iPad for each of the 20 messages; dan's phone at the window"
    assert report["suppressed_read"] == 1, "carol's phone: read before the window closed"


@both_stores
async def test_a_restart_mid_window_sends_exactly_one_push(
    tmp_path: Path, fakes: tuple[FakeApns, FakeFcm], request: pytest.FixtureRequest
) -> None:
    apns, fcm = fakes
    config = replace(
        make_config(tmp_path, storage=storage_for(request, tmp_path)),
        push=replace(push_config(tmp_path, apns, fcm), window_s=3.0),
    )
    alice, dave = unique("alice"), unique("dave")
    dm = ":".join(("dm", *sorted((alice, dave))))
    ids = [unique("m") for _ in range(3)]

    async def send(stack: Stack) -> list[int]:
        async with connect_device(stack.mqtt_port, alice, "alice-1", stack.token(alice, "alice-1")) as dev:
            for id in ids:
                await dev.send(send_env(dm, f"about {id}", id=id))
            return [e["seq"] for e in await dev.wait_for(lambda e: e["type"] == "ack", count=3)]

    async with open_stack(config, "inbroker") as stack:
        await register(stack, dave, "dave-phone", "apns", "tok-dave")
        assert await send(stack) == [1, 2, 3]
    assert apns.requests == [], "stopped inside the window"
    async with open_stack(config, "inbroker") as stack:
        # The sender's outbox re-sends the same three after the restart: duplicates, no new push.
        assert await send(stack) == [1, 2, 3]
        deadline = time.monotonic() + 10
        while not apns.requests and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await settle(apns, fcm)
    (push,) = apns.requests
    assert push.aps["alert"]["body"] == "3 new messages"
    assert push.payload["seq"] == "3"


@both_stores
async def test_tokens_rebind_and_invalid_tokens_are_deleted(
    tmp_path: Path, fakes: tuple[FakeApns, FakeFcm], request: pytest.FixtureRequest
) -> None:
    apns, fcm = fakes
    config = replace(
        make_config(tmp_path, storage=storage_for(request, tmp_path)), push=push_config(tmp_path, apns, fcm)
    )
    alice, erin, frank = unique("alice"), unique("erin"), unique("frank")
    async with open_stack(config, "inbroker") as stack:
        # The same physical token registered by erin's old device, then by frank's: only frank is pushed.
        await register(stack, erin, "old-phone", "apns", "tok-shared")
        await register(stack, frank, "new-phone", "apns", "tok-shared")
        await send_burst(stack, alice, ":".join(("dm", *sorted((alice, erin)))), 1)
        await send_burst(stack, alice, ":".join(("dm", *sorted((alice, frank)))), 1)
        await settle(apns, fcm)
        (only,) = apns.requests_for("tok-shared")
        assert only.payload["conv"] == ":".join(("dm", *sorted((alice, frank))))
        # 410 Unregistered → the token is gone; the next burst sends nothing to it.
        apns.script("tok-shared", ApnsReply(410, "Unregistered", timestamp_ms=int(time.time() * 1000) + 1000))
        fcm.script("tok-gone", "UNREGISTERED")
        await register(stack, frank, "tablet", "fcm", "tok-gone")
        await send_burst(stack, alice, ":".join(("dm", *sorted((alice, frank)))), 1)
        await settle(apns, fcm)
        await send_burst(stack, alice, ":".join(("dm", *sorted((alice, frank)))), 1)
        await settle(apns, fcm)
        assert len(apns.requests_for("tok-shared")) == 2
        assert len(fcm.requests_for("tok-gone")) == 1
        async with stack.http(frank, "tablet") as http:
            assert (await http.delete("/v1/devices/tablet/push")).status_code == 404, "already deleted"
            r = await http.put("/v1/devices/someone-else/push", json={"platform": "fcm", "token": "x"})
            assert (r.status_code, r.json()["error"]) == (403, "forbidden")
            r = await http.put("/v1/devices/tablet/push", json={"platform": "webpush", "token": "x"})
            assert (r.status_code, r.json()["error"]) == (400, "bad_request")


async def test_provider_auth_errors_keep_tokens_and_are_reported_once(
    tmp_path: Path, fakes: tuple[FakeApns, FakeFcm], caplog: pytest.LogCaptureFixture
) -> None:
    apns, fcm = fakes
    wrong_team = replace(push_config(tmp_path, apns, fcm), apns_team_id="WRONGTEAM1")
    config = replace(make_config(tmp_path), push=wrong_team)
    alice, gina = unique("alice"), unique("gina")
    dm = ":".join(("dm", *sorted((alice, gina))))
    async with open_stack(config, "inbroker") as stack:
        await register(stack, gina, "gina-phone", "apns", "tok-gina")
        for _ in range(2):
            await send_burst(stack, alice, dm, 1)
            await settle(apns, fcm)
        async with stack.http(gina, "gina-phone") as http:
            r = await http.delete("/v1/devices/gina-phone/push")
            assert r.status_code == 204, "the token is still registered"
    assert [r.status for r in apns.requests_for("tok-gina")] == [403, 403], "sent twice, refused twice"
    reports = [r for r in caplog.records if "PUSH MISCONFIGURED" in r.getMessage()]
    assert len(reports) == 1, "reported once, not per message"
    assert "tok-gina" not in caplog.text, "tokens are never logged"


@both_stores
async def test_kill9_of_the_server_mid_window_sends_exactly_one_push(
    tmp_path: Path, fakes: tuple[FakeApns, FakeFcm], request: pytest.FixtureRequest
) -> None:
    apns, fcm = fakes
    settings = push_config(tmp_path, apns, fcm)
    env = {f"MQCHAT_{key.upper()}": str(getattr(settings, field)) for key, field in _PUSH_ENV.items()}
    env["MQCHAT_PUSH_WINDOW"] = "3s"
    storage = storage_for(request, tmp_path / "data")
    if storage.backend != "sqlite":
        env["MQCHAT_STORE"] = storage.url
    served = start_served(
        tmp_path / "data", secrets.token_urlsafe(32), tmp_path / "serve.log", adapter="inbroker", env=env
    )
    try:
        await served.wait_healthy()
        alice, hal = unique("alice"), unique("hal")
        dm = ":".join(("dm", *sorted((alice, hal))))
        async with served.http(hal) as http:
            http.headers["Authorization"] = f"Bearer {served.token(hal, 'hal-phone')}"
            r = await http.put("/v1/devices/hal-phone/push", json={"platform": "fcm", "token": "tok-hal"})
            assert r.status_code == 200, r.text
        async with connect_device(served.mqtt_port, alice, "alice-1", served.token(alice, "alice-1")) as dev:
            for i in range(4):
                await dev.send(send_env(dm, f"m{i}"))
            await dev.wait_for(lambda e: e["type"] == "ack", count=4)
        await served.kill9("node")  # inside the window: the pending push is only on disk
        deadline = time.monotonic() + 20
        while not fcm.requests and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await settle(apns, fcm)
    finally:
        stop_served(served)
    (push,) = fcm.requests_for("tok-hal")
    assert push.message["notification"]["body"] == "4 new messages"


_PUSH_ENV = {
    "apns_key_file": "apns_key_file",
    "apns_key_id": "apns_key_id",
    "apns_team_id": "apns_team_id",
    "apns_topic": "apns_topic",
    "apns_host": "apns_host",
    "apns_port": "apns_port",
    "apns_ca_file": "apns_ca_file",
    "fcm_credentials": "fcm_credentials",
    "fcm_endpoint": "fcm_endpoint",
}


async def test_broker_and_bridge_apart_push_to_the_away_device_only(
    tmp_path: Path, fakes: tuple[FakeApns, FakeFcm]
) -> None:
    """With --adapter mqtt and no Redis, the bridge learns which devices are connected from the
    broker's retained device lists: bob's laptop is online, his phone is not and gets the push."""
    apns, fcm = fakes
    config = replace(make_config(tmp_path), push=push_config(tmp_path, apns, fcm))
    alice, bob = unique("alice"), unique("bob")
    dm = ":".join(("dm", *sorted((alice, bob))))
    async with open_stack(config, "mqtt") as stack:
        await register(stack, bob, "bob-phone", "apns", "tok-phone")
        await register(stack, bob, "bob-laptop", "fcm", "tok-laptop")
        async with connect_device(stack.mqtt_port, bob, "bob-laptop", stack.token(bob, "bob-laptop")) as laptop:
            await asyncio.sleep(0.3)  # the device list reaches the bridge
            await send_burst(stack, alice, dm, 2)
            await laptop.wait_for(lambda e: e["type"] == "msg", count=2)
            await settle(apns, fcm)
    (push,) = apns.requests_for("tok-phone")
    assert push.aps["alert"]["body"] == "2 new messages"
    assert fcm.requests_for("tok-laptop") == []
