"""Per-device and per-user rate limits: beyond the budget a `rate_limited` error (HTTP 429 with
Retry-After) and nothing stored; a legitimate user beside a flooding one is served as before."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

import pytest

from bridge.pipeline import Pipeline, RequestLimits
from bridge.ratelimit import RateLimit, RateLimiter
from clients import ChatClient
from mqchat.clock import Clock
from mqchat.config import StorageConfig
from mqchat.ids import dm_conv
from storage import open_storage
from tests.conftest import make_config, open_stack
from tests.helpers import connect_device, send_env, unique

FLOOD = 300


class FakeClock(Clock):
    def __init__(self) -> None:
        self.now = 100.0

    def monotonic(self) -> float:
        return self.now


def test_a_bucket_allows_its_burst_then_its_rate_and_says_when() -> None:
    clock = FakeClock()
    limiter = RateLimiter(RateLimit(rate=2, burst=3), clock=clock)
    assert [limiter.take("d") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("d") == pytest.approx(0.5)
    assert limiter.take("other") == 0.0, "buckets are per key"
    clock.now += 0.5
    assert limiter.take("d") == 0.0
    clock.now += 100
    assert [limiter.take("d") for _ in range(4)][-1] > 0, "refills up to the burst, not beyond"


def test_a_limiter_forgets_idle_keys_to_stay_bounded() -> None:
    clock = FakeClock()
    limiter = RateLimiter(RateLimit(rate=1, burst=5), max_keys=100, clock=clock)
    for i in range(1000):
        limiter.take(i)
        clock.now += 0.01
    assert len(limiter) <= 100


async def test_a_flooding_device_is_limited_and_a_legitimate_user_is_served(tmp_path: Path) -> None:
    config = make_config(tmp_path, send_rate=5, send_burst=20)
    async with open_stack(config, "inbroker") as stack:
        flooder, victim, friend = unique("flood"), unique("victim"), unique("friend")
        flood_conv, legit_conv = dm_conv(flooder, victim), dm_conv(victim, friend)
        async with (
            connect_device(stack.mqtt_port, flooder, "f", stack.token(flooder, "f")) as bad,
            connect_device(stack.mqtt_port, victim, "v", stack.token(victim, "v")) as good,
        ):
            flood = [send_env(flood_conv, f"spam {i}") for i in range(FLOOD)]
            latencies: list[float] = []

            async def legit() -> None:
                for i in range(20):
                    probe = send_env(legit_conv, f"hello {i}")
                    started = time.perf_counter()
                    await good.send(probe)
                    await good.wait_for(lambda e, p=probe: e["type"] == "ack" and e["id"] == p["id"])
                    latencies.append(time.perf_counter() - started)

            async def spam() -> None:
                for envelope in flood:
                    await bad.send(envelope)

            started = time.monotonic()
            await asyncio.gather(spam(), legit())
            replies = await bad.wait_for(lambda e: e["type"] in ("ack", "error"), count=len(flood), timeout=30)
            elapsed = time.monotonic() - started
        acked = [r for r in replies if r["type"] == "ack"]
        limited = [r for r in replies if r["type"] == "error"]
        assert {r["code"] for r in limited} == {"rate_limited"}
        assert all(r["retry_after_ms"] > 0 and r["id"] and r["conv"] == flood_conv for r in limited)
        # The burst, then at most the rate over the time it took (plus one token in flight).
        assert 20 <= len(acked) <= 20 + 5 * elapsed + 1, (len(acked), elapsed)
        assert await stack.store.last_seq(flood_conv) == len(acked), "nothing stored for a refused send"
        assert len(latencies) == 20
        print(
            f"flood: {len(acked)} acked, {len(limited)} rate_limited; the other user's 20 sends: "
            f"median {statistics.median(latencies) * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms"
        )


async def test_receipts_are_limited_per_device(tmp_path: Path) -> None:
    async with open_stack(make_config(tmp_path, receipt_rate=0.1, receipt_burst=5), "inbroker") as stack:
        alice, bob = unique("alice"), unique("bob")
        conv = dm_conv(alice, bob)
        async with connect_device(stack.mqtt_port, alice, "a", stack.token(alice, "a")) as dev:
            await dev.send(send_env(conv))
            await dev.wait_for(lambda e: e["type"] == "ack")
            for _ in range(12):
                await dev.send({"type": "read", "conv": conv, "seq": 1})
            errors = await dev.wait_for(lambda e: e["type"] == "error", count=6)
        assert {e["code"] for e in errors} == {"rate_limited"}


async def test_http_calls_over_the_budget_get_429_with_retry_after(tmp_path: Path) -> None:
    async with open_stack(make_config(tmp_path, http_rate=0.1, http_burst=5), "inbroker") as stack:
        greedy, other = unique("greedy"), unique("other")
        async with stack.http(greedy) as http, stack.http(other) as polite:
            answers = [await http.get("/v1/conversations") for _ in range(8)]
            assert [a.status_code for a in answers[:5]] == [200] * 5
            refused = answers[-1]
            assert refused.status_code == 429
            assert refused.json()["error"] == "rate_limited"
            assert int(refused.headers["retry-after"]) >= 1
            assert (await polite.get("/v1/conversations")).status_code == 200, "budgets are per user"


async def test_the_sdk_keeps_a_rate_limited_send_and_delivers_it_later(tmp_path: Path) -> None:
    async with open_stack(make_config(tmp_path, send_rate=20, send_burst=5), "inbroker") as stack:
        alice, bob = unique("alice"), unique("bob")
        conv = dm_conv(alice, bob)
        client = ChatClient(
            host="127.0.0.1",
            port=stack.mqtt_port,
            user=alice,
            device="a",
            token=stack.token(alice, "a"),
            resend_after=0.2,
        )
        async with client:
            ids = [await client.send(conv, f"m{i}") for i in range(15)]
            async with asyncio.timeout(20):
                acks = [await client.wait_acked(i) for i in ids]
            assert client.statistics().rate_limited > 0
        assert [a.seq for a in acks] == list(range(1, 16)), "stored in the order sent, none overtaking"
        assert await stack.store.last_seq(conv) == 15


async def test_sends_behind_a_refused_one_are_never_stored_ahead_of_it(tmp_path: Path) -> None:
    """However late a device's later sends arrive (a slow link), none is stored before the send
    that was refused: after the hold, only the refused one is accepted first."""
    clock = FakeClock()
    async with open_storage(StorageConfig(data_dir=tmp_path), push=False) as storage:
        store = storage.messages
        limits = RequestLimits(device_sends=RateLimit(rate=10, burst=1))
        pipeline = Pipeline(log=store, states=store, groups=store, limits=limits, clock=clock)
        conv = dm_conv("alice", "bob")

        async def send(id: str) -> dict[str, Any]:
            out = await pipeline.handle("alice", "a", json.dumps(send_env(conv, id, id=id)).encode())
            reply: dict[str, Any] = json.loads(out[0].payload)
            return reply

        assert (await send("m1"))["type"] == "ack"
        assert (await send("m2"))["code"] == "rate_limited"  # the hold starts: m2 must come first
        assert (await send("m3"))["code"] == "rate_limited"
        clock.now += 5  # the hold's time is over, tokens are back; m3 arrives late, m2 not yet
        assert (await send("m3"))["code"] == "rate_limited"
        assert (await send("m2"))["seq"] == 2
        clock.now += 1
        assert (await send("m3"))["seq"] == 3
