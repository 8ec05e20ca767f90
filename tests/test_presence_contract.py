"""The presence registry's contract, the same for every backend (storage/presence.py).

``both`` tests run against ``MemoryPresence`` and ``RedisPresence`` (a real redis-server); tests
marked ``redis_only`` need several registries sharing one backend (several processes), which
only Redis offers. Transitions reach listeners asynchronously with Redis, so tests wait for what
must happen (bounded polls) and prove that something did not happen with a barrier: a marker
user's transition, made after, is heard after it (pub/sub keeps order).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from storage.presence import OFFLINE, ONLINE, MemoryPresence, Presence, PresenceRegistry
from storage.redis_presence import RedisPresence, redis_target
from tests.redis_server import RedisServer, redis_server, redis_url  # noqa: F401

GRACE = 0.3
SWEEP = 0.05
TTL = 0.6
WAIT = 5.0  # bound on waiting for what must happen
TOLERANCE = 0.02  # clock granularity (ms timestamps) when comparing arrival times
QUIET = GRACE + 4 * SWEEP  # long enough for a wrongly due offline to have been made

both = pytest.mark.parametrize("backend", ["memory", "redis"], indirect=True)
redis_only = pytest.mark.parametrize("backend", ["redis"], indirect=True)

_markers = itertools.count()


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Recorder:
    """A listener keeping every transition it hears with its arrival time."""

    def __init__(self, registry: PresenceRegistry) -> None:
        self.events: list[tuple[float, Presence]] = []
        registry.listen(self)

    def __call__(self, presence: Presence) -> None:
        self.events.append((time.monotonic(), presence))

    def of(self, user: str) -> list[Presence]:
        return [p for _, p in self.events if p.user == user]

    def states(self, user: str) -> list[str]:
        return [p.state for p in self.of(user)]

    async def wait_for(self, user: str, state: str, count: int = 1) -> tuple[float, Presence]:
        """The count-th transition of user to state: (arrival time, presence)."""
        deadline = time.monotonic() + WAIT
        while True:
            seen = [(t, p) for t, p in self.events if p.user == user and p.state == state]
            if len(seen) >= count:
                return seen[count - 1]
            if time.monotonic() > deadline:
                raise AssertionError(f"{user} never went {state} ({count}x); heard {self.of(user)}")
            await asyncio.sleep(0.005)


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(0.01)


async def settle(registry: PresenceRegistry, *recorders: Recorder) -> None:
    """Barrier: every transition made before this call has reached every recorder."""
    marker = f"~marker-{next(_markers)}"
    await registry.connected(marker, "m", "m")
    for recorder in recorders:
        await recorder.wait_for(marker, ONLINE)


@dataclass
class Backend:
    name: str
    url: str | None = None
    made: list[PresenceRegistry] = field(default_factory=list)

    async def make(self, **options: Any) -> PresenceRegistry:
        """A started registry; with Redis every one made in a test shares the same server."""
        options.setdefault("grace_s", GRACE)
        options.setdefault("sweep_interval_s", SWEEP)
        registry: PresenceRegistry
        if self.name == "memory":
            assert not self.made, "in-memory registries share nothing: one per test (use redis_only)"
            options.pop("ttl_s", None)
            registry = MemoryPresence(**options)
        else:
            assert self.url is not None
            registry = RedisPresence(self.url, **options)
        await registry.start()
        self.made.append(registry)
        return registry

    async def make_redis(self, **options: Any) -> RedisPresence:
        registry = await self.make(**options)
        assert isinstance(registry, RedisPresence)
        return registry


@pytest.fixture
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    name: str = request.param
    url = request.getfixturevalue("redis_url") if name == "redis" else None
    made = Backend(name, url)
    try:
        yield made
    finally:
        for registry in made.made:
            await registry.aclose()


# --- both backends ------------------------------------------------------------------------------


@both
async def test_connect_makes_one_online_transition(backend: Backend) -> None:
    registry = await backend.make()
    heard = Recorder(registry)
    before = now_ms()
    await registry.connected("alice", "phone", "c1")
    after = now_ms()
    _, online = await heard.wait_for("alice", ONLINE)
    assert online.online
    assert online.last_seen is not None
    assert before <= online.last_seen <= after
    assert await registry.lookup(["alice"]) == {"alice": online}
    await settle(registry, heard)
    assert heard.of("alice") == [online]


@both
async def test_second_device_makes_no_transition(backend: Backend) -> None:
    registry = await backend.make()
    heard = Recorder(registry)
    await registry.connected("alice", "phone", "c1")
    _, online = await heard.wait_for("alice", ONLINE)
    await registry.connected("alice", "laptop", "c2")
    await settle(registry, heard)
    assert heard.of("alice") == [online]
    assert (await registry.lookup(["alice"]))["alice"] == online


@both
async def test_one_of_two_devices_leaving_keeps_the_user_online(backend: Backend) -> None:
    registry = await backend.make()
    heard = Recorder(registry)
    await registry.connected("alice", "phone", "c1")
    await registry.connected("alice", "laptop", "c2")
    await registry.disconnected("alice", "phone", "c1")
    await asyncio.sleep(QUIET)
    await settle(registry, heard)
    assert heard.states("alice") == [ONLINE]
    assert (await registry.lookup(["alice"]))["alice"].online
    assert await registry.devices("alice") == {"laptop"}


@both
async def test_last_device_gone_means_offline_after_the_grace_window(backend: Backend) -> None:
    registry = await backend.make()
    heard = Recorder(registry)
    await registry.connected("alice", "phone", "c1")
    _, online = await heard.wait_for("alice", ONLINE)
    left = time.monotonic()
    before = now_ms()
    await registry.disconnected("alice", "phone", "c1")
    after = now_ms()
    # within the grace window the user is still online, though no device is connected
    assert (await registry.lookup(["alice"]))["alice"] == online
    assert await registry.devices("alice") == frozenset()
    arrived, offline = await heard.wait_for("alice", OFFLINE)
    assert arrived - left >= GRACE - TOLERANCE
    assert offline.last_seen is not None
    assert before <= offline.last_seen <= after  # when the last device left, not when the window ended
    assert await registry.lookup(["alice"]) == {"alice": offline}
    await settle(registry, heard)
    assert heard.of("alice") == [online, offline]


@both
async def test_reconnect_within_the_grace_window_never_shows_offline(backend: Backend) -> None:
    registry = await backend.make()
    heard = Recorder(registry)
    await registry.connected("alice", "phone", "c1")
    _, online = await heard.wait_for("alice", ONLINE)
    await registry.disconnected("alice", "phone", "c1")
    await asyncio.sleep(GRACE / 3)
    await registry.connected("alice", "phone", "c2")
    await asyncio.sleep(QUIET)
    await settle(registry, heard)
    assert heard.of("alice") == [online]
    assert (await registry.lookup(["alice"]))["alice"] == online  # still online since the first connect
    assert await registry.devices("alice") == {"phone"}


@both
async def test_stale_disconnect_of_an_older_connection_changes_nothing(backend: Backend) -> None:
    registry = await backend.make()
    heard = Recorder(registry)
    await registry.connected("alice", "phone", "c1")
    await registry.connected("alice", "phone", "c2")  # the device reconnected (takeover)
    await registry.disconnected("alice", "phone", "c1")  # the old connection's late goodbye
    assert await registry.devices("alice") == {"phone"}
    await asyncio.sleep(QUIET)
    await settle(registry, heard)
    assert heard.states("alice") == [ONLINE]
    assert (await registry.lookup(["alice"]))["alice"].online
    await registry.disconnected("alice", "phone", "c2")
    await heard.wait_for("alice", OFFLINE)


@both
async def test_lookup_of_users_never_seen(backend: Backend) -> None:
    registry = await backend.make()
    assert await registry.lookup([]) == {}
    assert await registry.lookup(["nobody", "nobody", "ghost"]) == {
        "nobody": Presence("nobody", OFFLINE, None),
        "ghost": Presence("ghost", OFFLINE, None),
    }
    await registry.connected("alice", "phone", "c1")
    found = await registry.lookup(iter(["alice", "nobody"]))
    assert found["alice"].online
    assert found["nobody"] == Presence("nobody", OFFLINE, None)


@both
async def test_devices(backend: Backend) -> None:
    registry = await backend.make()
    assert await registry.devices("alice") == frozenset()
    await registry.connected("alice", "phone", "c1")
    await registry.connected("alice", "laptop", "c2")
    await registry.connected("bob", "phone", "c3")
    assert await registry.devices("alice") == {"phone", "laptop"}
    assert await registry.devices("bob") == {"phone"}
    await registry.disconnected("alice", "laptop", "c2")
    assert await registry.devices("alice") == {"phone"}
    await registry.disconnected("alice", "phone", "c1")
    assert await registry.devices("alice") == frozenset()


@both
async def test_back_online_after_going_offline(backend: Backend) -> None:
    registry = await backend.make()
    heard = Recorder(registry)
    await registry.connected("alice", "phone", "c1")
    await registry.disconnected("alice", "phone", "c1")
    _, offline = await heard.wait_for("alice", OFFLINE)
    before = now_ms()
    await registry.connected("alice", "phone", "c2")
    _, again = await heard.wait_for("alice", ONLINE, count=2)
    assert again.last_seen is not None
    assert again.last_seen >= before
    assert await registry.lookup(["alice"]) == {"alice": again}
    assert heard.states("alice") == [ONLINE, OFFLINE, ONLINE]
    assert offline.last_seen is not None


@both
async def test_names_with_separators_and_unicode(backend: Backend) -> None:
    registry = await backend.make()
    heard = Recorder(registry)
    users = ["a:b", "a", "ü|\n\"x'", "12:"]
    for user in users:
        await registry.connected(user, "d:1|x", "c|1")
    assert await registry.devices("a") == {"d:1|x"}
    for user in users:
        await registry.disconnected(user, "d:1|x", "c|1")
    for user in users:
        await heard.wait_for(user, OFFLINE)
    await settle(registry, heard)
    assert {user: heard.states(user) for user in users} == {user: [ONLINE, OFFLINE] for user in users}


@both
async def test_many_users_each_get_exactly_their_transitions(backend: Backend) -> None:
    registry = await backend.make()
    heard = Recorder(registry)
    users = [f"u{i}" for i in range(60)]
    await asyncio.gather(*(registry.connected(u, "phone", "c1") for u in users))
    await asyncio.gather(*(registry.disconnected(u, "phone", "c1") for u in users))
    for user in users:
        await heard.wait_for(user, OFFLINE)
    await settle(registry, heard)
    assert all(heard.states(u) == [ONLINE, OFFLINE] for u in users)
    assert all(not p.online for p in (await registry.lookup(users)).values())


# --- several processes: Redis only --------------------------------------------------------------


@redis_only
async def test_two_registries_hear_every_transition_once_and_agree(backend: Backend) -> None:
    a = await backend.make()
    b = await backend.make()
    heard_a, heard_b = Recorder(a), Recorder(b)
    await a.connected("alice", "phone", "c1")
    await b.connected("bob", "phone", "c2")
    await b.connected("alice", "laptop", "c3")  # alice on both processes: no new transition
    assert await a.devices("alice") == await b.devices("alice") == {"phone", "laptop"}
    await a.disconnected("alice", "phone", "c1")
    await b.disconnected("alice", "laptop", "c3")
    await b.disconnected("bob", "phone", "c2")
    for heard in (heard_a, heard_b):
        await heard.wait_for("alice", OFFLINE)
        await heard.wait_for("bob", OFFLINE)
    await settle(a, heard_a, heard_b)
    await settle(b, heard_a, heard_b)
    for user in ("alice", "bob"):
        assert heard_a.of(user) == heard_b.of(user)
        assert heard_a.states(user) == [ONLINE, OFFLINE]
    assert await a.lookup(["alice", "bob", "nobody"]) == await b.lookup(["alice", "bob", "nobody"])


@redis_only
async def test_device_moving_to_another_process(backend: Backend) -> None:
    a = await backend.make_redis(ttl_s=TTL)
    b = await backend.make()
    heard = Recorder(b)
    await a.connected("alice", "phone", "c1")
    await b.connected("alice", "phone", "c2")  # reconnected through the other process
    await a.disconnected("alice", "phone", "c1")  # late goodbye of the old connection
    assert await b.devices("alice") == {"phone"}
    await a.abandon()  # and the old process dies: the device is not its own any more
    await asyncio.sleep(TTL + QUIET)
    await settle(b, heard)
    assert heard.states("alice") == [ONLINE]
    assert await b.devices("alice") == {"phone"}


@redis_only
async def test_devices_of_a_crashed_process_go_offline_after_its_ttl(backend: Backend) -> None:
    a = await backend.make_redis(ttl_s=TTL)
    b = await backend.make()
    heard = Recorder(b)
    await a.connected("alice", "phone", "c1")
    await a.connected("bob", "phone", "c2")
    await a.connected("carol", "phone", "c3")
    await b.connected("carol", "laptop", "c4")  # carol keeps a device on a live process
    for user in ("alice", "bob", "carol"):
        await heard.wait_for(user, ONLINE)
    crashed = time.monotonic()
    before = now_ms()
    await a.abandon()
    assert (await b.lookup(["alice"]))["alice"].online  # not before its TTL ends
    arrived, offline = await heard.wait_for("alice", OFFLINE)
    await heard.wait_for("bob", OFFLINE)
    # refreshed every ttl/3, the liveness key outlives the crash by about 2/3 ttl at least (looser
    # bound here: a loaded machine can delay a refresh)
    assert arrived - crashed >= TTL / 3 - TOLERANCE
    assert offline.last_seen is not None
    assert offline.last_seen >= before
    await asyncio.sleep(QUIET)
    await settle(b, heard)
    assert heard.states("alice") == heard.states("bob") == [ONLINE, OFFLINE]
    assert heard.states("carol") == [ONLINE]
    assert await b.devices("carol") == {"laptop"}
    assert await b.devices("alice") == frozenset()


@redis_only
async def test_devices_of_a_dead_process_are_not_listed_even_before_reaping(backend: Backend) -> None:
    a = await backend.make_redis(ttl_s=TTL)
    b = await backend.make(sweep_interval_s=60)  # b sweeps once, at start, then not in this test
    heard = Recorder(b)
    await a.connected("alice", "phone", "c1")
    await a.abandon()

    async def gone() -> bool:
        return await b.devices("alice") == frozenset()

    await eventually(gone, "the dead process's devices are no longer listed")
    assert (await b.lookup(["alice"]))["alice"].online  # nobody has swept yet
    await b.sweep()
    await heard.wait_for("alice", OFFLINE)


@redis_only
async def test_a_node_id_reused_after_a_crash_releases_the_old_devices(backend: Backend) -> None:
    first = await backend.make_redis(node="broker-1")
    await first.connected("alice", "phone", "c1")
    await first.abandon()
    again = await backend.make_redis(node="broker-1")  # restarted within the old TTL
    heard = Recorder(again)
    assert await again.devices("alice") == frozenset()
    await heard.wait_for("alice", OFFLINE)  # after the grace window, as a disconnect


@redis_only
async def test_exactly_one_offline_transition_with_several_sweepers(backend: Backend) -> None:
    registries = [await backend.make(sweep_interval_s=0.005) for _ in range(3)]
    doomed = await backend.make_redis(ttl_s=TTL, sweep_interval_s=0.005)
    heard = [Recorder(r) for r in registries]
    left = [f"left{i}" for i in range(40)]
    crashed = [f"crashed{i}" for i in range(40)]
    for i, user in enumerate(left):
        await registries[i % 3].connected(user, "phone", "c1")
    for user in crashed:
        await doomed.connected(user, "phone", "c1")
    await asyncio.gather(*(registries[i % 3].disconnected(u, "phone", "c1") for i, u in enumerate(left)))
    await doomed.abandon()
    for recorder in heard:
        for user in left + crashed:
            await recorder.wait_for(user, OFFLINE)
    await asyncio.sleep(QUIET)
    for registry in registries:
        await settle(registry, *heard)
    for recorder in heard:
        assert all(recorder.states(u) == [ONLINE, OFFLINE] for u in left + crashed)


@redis_only
async def test_graceful_close_sends_devices_offline_after_the_grace_window(backend: Backend) -> None:
    a = await backend.make()
    b = await backend.make()
    heard = Recorder(b)
    await a.connected("alice", "phone", "c1")
    await heard.wait_for("alice", ONLINE)
    closed = time.monotonic()
    before = now_ms()
    await a.aclose()
    after = now_ms()
    assert (await b.lookup(["alice"]))["alice"].online
    assert await b.devices("alice") == frozenset()
    arrived, offline = await heard.wait_for("alice", OFFLINE)
    assert arrived - closed >= GRACE - TOLERANCE
    assert offline.last_seen is not None
    assert before <= offline.last_seen <= after


async def test_redis_only_restart_of_redis_is_survived(redis_server: RedisServer) -> None:  # noqa: F811
    """Redis comes back empty: live processes register their devices again and listen again."""
    options: dict[str, Any] = {"grace_s": GRACE, "sweep_interval_s": SWEEP, "ttl_s": TTL}
    a = RedisPresence(redis_server.url, **options)
    b = RedisPresence(redis_server.url, **options)
    async with a, b:
        heard_a, heard_b = Recorder(a), Recorder(b)
        await a.connected("alice", "phone", "c1")
        await heard_b.wait_for("alice", ONLINE)
        redis_server.stop()
        await asyncio.sleep(0.2)
        redis_server.start()  # same port, every key gone

        async def alice_back() -> bool:
            return (await b.lookup(["alice"]))["alice"].online and await b.devices("alice") == {"phone"}

        await eventually(alice_back, "the live process has registered its devices again")

        async def listening_again() -> bool:
            marker = f"~marker-{next(_markers)}"
            await b.connected(marker, "m", "m")
            await asyncio.sleep(0.05)
            return bool(heard_a.of(marker) and heard_b.of(marker))

        await eventually(listening_again, "both processes hear transitions again")
        await b.connected("bob", "phone", "c2")
        await b.disconnected("bob", "phone", "c2")
        for heard in (heard_a, heard_b):
            await heard.wait_for("bob", OFFLINE)
            assert heard.states("bob") == [ONLINE, OFFLINE]


def test_logged_redis_target_hides_credentials() -> None:
    assert redis_target("redis://user:s3cret@cache.internal:6380/2") == "cache.internal:6380"
    assert redis_target("rediss://:s3cret@cache.internal/0") == "cache.internal:6379"
    assert redis_target("unix:///run/redis.sock?password=s3cret") == "unix:/run/redis.sock"
