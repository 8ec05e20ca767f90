"""The lossy-network proxy against a tiny local echo server: pass-through, delay, faults, outage."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from clients.testing.netem import (
    CHAOS,
    FLAKY_3G,
    PERFECT,
    FaultKind,
    LossyProxy,
    NetemProfile,
    fault_plan,
    prefix_length,
)

WAIT = 5.0


@dataclass
class EchoServer:
    """Echoes every byte back; records what each connection received and how it ended."""

    port: int = 0
    received: list[bytearray] = field(default_factory=list)
    endings: list[str] = field(default_factory=list)
    handlers: set[asyncio.Task[None]] = field(default_factory=set)
    writers: set[asyncio.StreamWriter] = field(default_factory=set)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        self.writers.add(writer)
        got = bytearray()
        self.received.append(got)
        ending = "eof"
        try:
            while data := await reader.read(65536):
                got += data
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            ending = "reset"
        finally:
            self.endings.append(ending)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


@pytest.fixture
async def echo() -> AsyncIterator[EchoServer]:
    server_state = EchoServer()
    server = await asyncio.start_server(server_state.handle, "127.0.0.1", 0)
    server_state.port = server.sockets[0].getsockname()[1]
    try:
        yield server_state
    finally:
        server.close()
        for writer in server_state.writers:
            writer.close()
        await asyncio.gather(*server_state.handlers, return_exceptions=True)
        await server.wait_closed()


@contextlib.asynccontextmanager
async def connect(port: int) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def read_until_closed(reader: asyncio.StreamReader) -> tuple[bytes, str]:
    """Everything until the connection ends, and how: "eof" or "reset"."""
    got = bytearray()
    try:
        async with asyncio.timeout(WAIT):
            while data := await reader.read(65536):
                got += data
    except ConnectionError:
        return bytes(got), "reset"
    return bytes(got), "eof"


async def test_perfect_passes_bytes_unchanged(echo: EchoServer) -> None:
    payload = bytes(range(256)) * 1024  # 256 KiB, more than one chunk
    async with LossyProxy(target_port=echo.port, profile=PERFECT, seed=1) as proxy:
        async with connect(proxy.port) as (reader, writer):
            writer.write(payload)
            await writer.drain()
            got = await asyncio.wait_for(reader.readexactly(len(payload)), WAIT)
            assert got == payload
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), WAIT) == b""
        stats = proxy.statistics()
    assert stats.accepted == 1
    assert stats.bytes_to_target == stats.bytes_to_client == len(payload)
    assert stats.cuts == stats.peer_resets == stats.mid_packet_resets == 0


async def test_latency_delays_each_direction(echo: EchoServer) -> None:
    profile = NetemProfile(latency_ms=100, jitter_ms=20)
    async with (
        LossyProxy(target_port=echo.port, profile=profile, seed=2) as proxy,
        connect(proxy.port) as (reader, writer),
    ):
        for n in range(3):
            started = time.monotonic()
            writer.write(b"ping %d" % n)
            assert await asyncio.wait_for(reader.readexactly(6), WAIT) == b"ping %d" % n
            elapsed = time.monotonic() - started
            assert elapsed >= 0.8 * 2 * (0.100 - 0.020)
            assert elapsed < WAIT


async def test_bandwidth_limits_throughput(echo: EchoServer) -> None:
    profile = NetemProfile(bandwidth_bytes_per_s=400_000)
    payload = b"b" * 100_000  # 0.25 s each way at 400 kB/s; the directions overlap
    async with (
        LossyProxy(target_port=echo.port, profile=profile, seed=10) as proxy,
        connect(proxy.port) as (reader, writer),
    ):
        started = time.monotonic()
        writer.write(payload)
        assert await asyncio.wait_for(reader.readexactly(len(payload)), WAIT) == payload
        assert time.monotonic() - started >= 0.8 * 0.25


async def test_byte_order_survives_jitter(echo: EchoServer) -> None:
    profile = NetemProfile(latency_ms=5, jitter_ms=5)
    async with (
        LossyProxy(target_port=echo.port, profile=profile, seed=3) as proxy,
        connect(proxy.port) as (reader, writer),
    ):
        sent = bytearray()
        for n in range(50):
            chunk = b"%04d;" % n
            sent += chunk
            writer.write(chunk)
            await writer.drain()
            await asyncio.sleep(0.001)
        assert await asyncio.wait_for(reader.readexactly(len(sent)), WAIT) == sent


async def test_cut_all_resets_the_client(echo: EchoServer) -> None:
    async with LossyProxy(target_port=echo.port, profile=PERFECT, seed=4) as proxy:
        async with connect(proxy.port) as (reader, writer):
            writer.write(b"hello")
            assert await asyncio.wait_for(reader.readexactly(5), WAIT) == b"hello"
            assert proxy.cut_all() == 1
            _, ending = await read_until_closed(reader)
            assert ending == "reset"
        stats = proxy.statistics()
        assert stats.cuts == 1
        assert stats.open == 0
    assert echo.endings == ["reset"]


async def test_max_connection_age_cuts(echo: EchoServer) -> None:
    profile = NetemProfile(max_connection_s=0.2)
    async with LossyProxy(target_port=echo.port, profile=profile, seed=5) as proxy:
        async with connect(proxy.port) as (reader, _):
            started = time.monotonic()
            _, ending = await read_until_closed(reader)
            assert ending == "reset"
            assert time.monotonic() - started >= 0.8 * 0.2
        assert proxy.statistics().cuts == 1


def _stall_seed(profile: NetemProfile) -> int:
    """A seed whose connection 0 stalls right away, and then not again for a long while."""
    for seed in itertools.count():
        first, second = itertools.islice(fault_plan(profile, seed=seed, ordinal=0), 2)
        if first.at_s <= 0.03 and second.at_s >= 3.0:
            return seed
    raise AssertionError("unreachable")


async def test_stall_delays_without_closing(echo: EchoServer) -> None:
    profile = NetemProfile(stall_rate=0.3, stall_ms=800)
    seed = _stall_seed(profile)
    async with LossyProxy(target_port=echo.port, profile=profile, seed=seed) as proxy:
        async with connect(proxy.port) as (reader, writer):
            await asyncio.sleep(0.2)  # the stall began at ≤ 30 ms and lasts until ≥ 800 ms
            started = time.monotonic()
            writer.write(b"through the tunnel")
            got = await asyncio.wait_for(reader.readexactly(18), WAIT)
            assert got == b"through the tunnel"
            assert time.monotonic() - started >= 0.3
            writer.write(b"after")  # still the same open connection
            assert await asyncio.wait_for(reader.readexactly(5), WAIT) == b"after"
        stats = proxy.statistics()
    assert stats.stalls == 1
    assert stats.cuts == stats.peer_resets == 0


async def test_mid_packet_reset_delivers_a_strict_prefix(echo: EchoServer) -> None:
    profile = NetemProfile(reset_mid_packet_rate=50)  # armed within a few tens of ms
    payload = bytes(range(100))
    async with LossyProxy(target_port=echo.port, profile=profile, seed=6) as proxy:
        async with connect(proxy.port) as (reader, writer):
            await asyncio.sleep(0.3)
            writer.write(payload)
            _, ending = await read_until_closed(reader)
            assert ending == "reset"
        assert proxy.statistics().mid_packet_resets == 1
    async with asyncio.timeout(WAIT):
        while not echo.endings:
            await asyncio.sleep(0.01)
    (got,) = echo.received
    assert 0 < len(got) < len(payload)
    assert bytes(got) == payload[: len(got)]
    assert echo.endings == ["reset"]


async def test_pause_holds_new_and_open_connections_until_resume(echo: EchoServer) -> None:
    async with (
        LossyProxy(target_port=echo.port, profile=PERFECT, seed=7) as proxy,
        connect(proxy.port) as (reader, writer),
    ):
        proxy.pause()
        writer.write(b"held")
        async with connect(proxy.port) as (reader2, writer2):
            writer2.write(b"new")
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(reader.readexactly(4), 0.3)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(reader2.readexactly(3), 0.01)
            assert proxy.statistics().accepted == 1
            proxy.resume()
            assert await asyncio.wait_for(reader.readexactly(4), WAIT) == b"held"
            assert await asyncio.wait_for(reader2.readexactly(3), WAIT) == b"new"
            assert proxy.statistics().accepted == 2


async def test_unreachable_target_resets_the_client() -> None:
    async with LossyProxy(target_port=1, profile=PERFECT, seed=8) as proxy:
        async with connect(proxy.port) as (reader, _):
            _, ending = await read_until_closed(reader)
            assert ending == "reset"
        assert proxy.statistics().connect_failures == 1


async def test_chaos_never_raises_and_closes_cleanly(echo: EchoServer) -> None:
    async with LossyProxy(target_port=echo.port, profile=CHAOS, seed=9) as proxy:
        for _ in range(3):
            with contextlib.suppress(ConnectionError, TimeoutError):
                async with connect(proxy.port) as (reader, writer):
                    writer.write(b"x" * 1000)
                    await asyncio.wait_for(reader.read(10), 0.2)
    assert proxy.statistics().open == 0
    assert not [task for task in asyncio.all_tasks() if task.get_name().startswith("netem:")]


def test_same_seed_same_fault_decisions() -> None:
    profile = NetemProfile(cut_rate=0.05, stall_rate=2, stall_ms=100, reset_mid_packet_rate=1, max_connection_s=60)
    plan = list(fault_plan(profile, seed=42, ordinal=3))
    assert plan == list(fault_plan(profile, seed=42, ordinal=3))
    assert plan != list(fault_plan(profile, seed=42, ordinal=4))
    assert plan != list(fault_plan(profile, seed=43, ordinal=3))
    times = [fault.at_s for fault in plan]
    assert times == sorted(times)
    assert {fault.kind for fault in plan[:-1]} <= {FaultKind.STALL, FaultKind.RESET_MID_PACKET}
    assert plan[-1].kind in (FaultKind.CUT, FaultKind.EXPIRE)
    assert all(fault.at_s <= 60 for fault in plan)


def test_plan_shapes() -> None:
    assert list(fault_plan(PERFECT, seed=1, ordinal=0)) == []
    (expire,) = fault_plan(NetemProfile(max_connection_s=5), seed=1, ordinal=0)
    assert (expire.at_s, expire.kind) == (5, FaultKind.EXPIRE)
    stalls = list(itertools.islice(fault_plan(FLAKY_3G, seed=1, ordinal=0), 200))
    assert any(fault.kind is FaultKind.STALL and fault.duration_s == 3.0 for fault in stalls)


def test_prefix_is_strict() -> None:
    assert prefix_length(1, 0.5) == 0
    for size in (2, 3, 100, 65536):
        for fraction in (0.0, 0.3, 0.999999):
            assert 0 < prefix_length(size, fraction) < size


def test_profile_validation() -> None:
    with pytest.raises(ValueError, match="latency_ms"):
        NetemProfile(latency_ms=-1)
    with pytest.raises(ValueError, match="loopback"):
        LossyProxy(target_port=1, profile=PERFECT, seed=0, listen_host="0.0.0.0")
