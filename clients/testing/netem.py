"""A lossy-network TCP proxy: a simulated mobile network between MQTT clients and the broker.

::

    client ──▶ listener (loopback) ──accept #n──▶ link n ──connect──▶ target (the broker)

    link n:  client ─recv─▶ [due = now + latency ± jitter] ─▶ queue ─▶ wait(due, stall, pause,
                                                                       bandwidth) ─send─▶ target
             target ─recv─▶ ...the same, the other way...                          ─send─▶ client
             faults: fault_plan(profile, seed, n) ─▶ cut (RST both) | stall | arm mid-packet reset
                     | expire after max_connection_s (RST both)

Each direction keeps its byte order: a chunk is never sent before the one read ahead of it, so
jitter stretches gaps but never reorders. A connection's faults come from ``fault_plan``, a pure
generator seeded by the proxy's seed and the connection's ordinal (accept order), so a run with
the same seed and the same connection order makes the same fault decisions; the same goes for
the per-direction delay draws. ``LossyProxy`` is an async context manager owning a ``TaskGroup``:
one accept task and one task per connection (which owns its own pumps and fault timer);
``aclose()`` cancels and awaits all of them. An idle connection only waits on its sockets and on
its next fault time. Abrupt cuts close both sockets with ``SO_LINGER`` 0, so both peers see a
reset; a reset from a peer is counted and passed on to the other side, never raised.

Only the standard library is used, so tests and ``mqchat bench`` can import it anywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import socket
import struct
from collections.abc import Coroutine, Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType, TracebackType
from typing import Any, Literal, Self

__all__ = [
    "CHAOS",
    "FLAKY_3G",
    "GOOD_4G",
    "PERFECT",
    "PRESETS",
    "Fault",
    "FaultKind",
    "LossyProxy",
    "NetemProfile",
    "ProxyStatistics",
    "fault_plan",
]

logger = logging.getLogger(__name__)

_READ_SIZE = 65536
_QUEUE_CHUNKS = 64  # per direction: at most 64 chunks (4 MiB) read ahead of the sender
_BACKLOG = 1024
_ACCEPT_BATCH = 128  # connections accepted per wake-up of the accept loop
_CONNECT_TIMEOUT_S = 10.0
_RST_LINGER = struct.pack("ii", 1, 0)

_End = Literal["eof", "cut", "expire", "mid_packet", "peer_reset"]
_Direction = Literal["up", "down"]  # up: client → target, down: target → client


@dataclass(frozen=True, slots=True)
class NetemProfile:
    """How bad the network is. Rates are expected events per connection per second (Poisson)."""

    latency_ms: float = 0.0
    """One-way base delay, applied in each direction."""
    jitter_ms: float = 0.0
    """Uniform ± around ``latency_ms`` (a delay never goes below 0 and never reorders bytes)."""
    cut_rate: float = 0.0
    """Abrupt cuts: both sides closed with a reset."""
    stall_rate: float = 0.0
    """Stalls: the link forwards nothing, in either direction, for ``stall_ms``, without closing."""
    stall_ms: float = 0.0
    reset_mid_packet_rate: float = 0.0
    """Forward only a strict prefix of the next chunk (either direction), then reset both sides."""
    max_connection_s: float | None = None
    """Reset every connection this long after it was established."""
    bandwidth_bytes_per_s: float | None = None
    """Per direction, per connection."""

    def __post_init__(self) -> None:
        for name in ("latency_ms", "jitter_ms", "cut_rate", "stall_rate", "stall_ms", "reset_mid_packet_rate"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.max_connection_s is not None and self.max_connection_s <= 0:
            raise ValueError("max_connection_s must be > 0 (or None)")
        if self.bandwidth_bytes_per_s is not None and self.bandwidth_bytes_per_s <= 0:
            raise ValueError("bandwidth_bytes_per_s must be > 0 (or None)")

    @property
    def has_faults(self) -> bool:
        """True when connections get a fault timer (any rate, or a maximum age)."""
        rates = (self.cut_rate, self.stall_rate, self.reset_mid_packet_rate)
        return any(rate > 0 for rate in rates) or self.max_connection_s is not None


PERFECT = NetemProfile()
"""Forward everything at once: the proxy is transparent."""

GOOD_4G = NetemProfile(
    latency_ms=30,
    jitter_ms=10,
    cut_rate=1 / 600,
    stall_rate=1 / 120,
    stall_ms=500,
    reset_mid_packet_rate=1 / 1800,
    bandwidth_bytes_per_s=2_500_000,
)
"""A decent mobile link: a cut every ~10 minutes, a short stall every ~2 minutes."""

FLAKY_3G = NetemProfile(
    latency_ms=150,
    jitter_ms=75,
    cut_rate=1 / 30,
    stall_rate=1 / 15,
    stall_ms=3000,
    reset_mid_packet_rate=1 / 60,
    bandwidth_bytes_per_s=100_000,
)
"""A poor link: a cut every ~30 s, a 3 s stall every ~15 s, slow."""

CHAOS = NetemProfile(
    latency_ms=20,
    jitter_ms=20,
    cut_rate=0.5,
    stall_rate=1.0,
    stall_ms=500,
    reset_mid_packet_rate=0.5,
    max_connection_s=10.0,
)
"""For tests: a fault every second or so, and no connection lives longer than 10 s."""

PRESETS: Mapping[str, NetemProfile] = MappingProxyType(
    {"perfect": PERFECT, "good_4g": GOOD_4G, "flaky_3g": FLAKY_3G, "chaos": CHAOS}
)


class FaultKind(StrEnum):
    CUT = "cut"
    STALL = "stall"
    RESET_MID_PACKET = "reset_mid_packet"
    EXPIRE = "expire"
    """``max_connection_s`` reached: a cut."""


@dataclass(frozen=True, slots=True)
class Fault:
    """One fault decision, ``at_s`` seconds after the connection was established."""

    at_s: float
    kind: FaultKind
    duration_s: float = 0.0
    """For a stall."""
    fraction: float = 0.0
    """For a mid-packet reset: which share of the chunk gets through (always a strict prefix)."""


def fault_plan(profile: NetemProfile, *, seed: int, ordinal: int) -> Iterator[Fault]:
    """The fault decisions for connection ``ordinal``, in time order; pure and reproducible.

    Cuts, stalls and mid-packet resets are independent Poisson processes merged in time order.
    The plan ends after the first cut, or with an ``EXPIRE`` at ``max_connection_s``; without
    either it is endless when any rate is positive (and empty when none is).
    """
    rng = random.Random(f"netem-faults:{seed}:{ordinal}")
    rates = {
        FaultKind.CUT: profile.cut_rate,
        FaultKind.STALL: profile.stall_rate,
        FaultKind.RESET_MID_PACKET: profile.reset_mid_packet_rate,
    }
    upcoming = {kind: rng.expovariate(rate) for kind, rate in rates.items() if rate > 0}
    end = profile.max_connection_s
    while upcoming:
        kind = min(upcoming, key=upcoming.__getitem__)
        at = upcoming[kind]
        if end is not None and at >= end:
            break
        if kind is FaultKind.CUT:
            yield Fault(at, kind)
            return
        if kind is FaultKind.STALL:
            yield Fault(at, kind, duration_s=profile.stall_ms / 1000)
        else:
            yield Fault(at, kind, fraction=rng.random())
        upcoming[kind] = at + rng.expovariate(rates[kind])
    if end is not None:
        yield Fault(end, FaultKind.EXPIRE)


def prefix_length(size: int, fraction: float) -> int:
    """How many bytes of a ``size``-byte chunk a mid-packet reset lets through: a strict prefix,
    non-empty whenever the chunk has at least 2 bytes."""
    if size < 2:
        return 0
    return min(size - 1, max(1, int(size * fraction)))


@dataclass(frozen=True, slots=True)
class ProxyStatistics:
    """A snapshot of a proxy's counters."""

    accepted: int
    open: int
    cuts: int
    """Abrupt resets by the proxy: random cuts, ``max_connection_s`` and ``cut_all()``."""
    stalls: int
    mid_packet_resets: int
    peer_resets: int
    """Connections ended because a peer reset (or broke) its side; passed on as a reset."""
    connect_failures: int
    """Accepted connections reset because the target could not be reached."""
    bytes_to_target: int
    bytes_to_client: int


class _Link:
    """One proxied connection's sockets and fault state."""

    def __init__(self, ordinal: int, client: socket.socket, upstream: socket.socket) -> None:
        self.ordinal = ordinal
        self.client = client
        self.upstream = upstream
        self.stalled_until = 0.0
        self.armed: float | None = None  # a pending mid-packet reset's fraction
        self.eofs = 0
        self.reason: _End | None = None
        self.ended = asyncio.Event()


def _reset(sock: socket.socket) -> None:
    """Close abruptly: SO_LINGER 0 makes the kernel send RST instead of FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST_LINGER)
    sock.close()


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _nodelay(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class LossyProxy:
    """A TCP proxy on loopback that forwards to ``target_port`` through a simulated bad network.

    ``async with LossyProxy(target_port=broker_port, profile=FLAKY_3G, seed=1) as proxy:`` then
    point clients at ``proxy.port``.
    """

    def __init__(
        self,
        *,
        target_host: str = "127.0.0.1",
        target_port: int,
        profile: NetemProfile,
        seed: int,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
    ) -> None:
        try:
            loopback = ipaddress.ip_address(listen_host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ValueError("a LossyProxy listens on a loopback address only, e.g. 127.0.0.1")
        self._target = (target_host, target_port)
        self._profile = profile
        self._seed = seed
        self._listen = (listen_host, listen_port)
        if profile.bandwidth_bytes_per_s is None:
            self._read_size = _READ_SIZE
        else:  # small enough chunks that one takes at most ~20 ms on the wire
            self._read_size = max(512, min(_READ_SIZE, int(profile.bandwidth_bytes_per_s / 50)))

        self._listener: socket.socket | None = None
        self._port: int | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._links: dict[int, _Link] = {}
        self._up = asyncio.Event()  # cleared while paused
        self._up.set()
        self._wake_accept: asyncio.Future[None] | None = None
        self._started = False
        self._closed = False

        self._accepted = 0
        self._cuts = 0
        self._stalls = 0
        self._mid_packet_resets = 0
        self._peer_resets = 0
        self._connect_failures = 0
        self._bytes = {"up": 0, "down": 0}

    # --- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._started:
            raise RuntimeError("a LossyProxy can be entered only once")
        self._started = True
        host, port = self._listen
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
        listener = socket.create_server((host, port), family=family, backlog=_BACKLOG)
        listener.setblocking(False)
        self._listener = listener
        self._port = listener.getsockname()[1]
        tg = asyncio.TaskGroup()
        await tg.__aenter__()
        self._tg = tg
        self._spawn(self._accept_loop(listener), name=f"netem:{self._port}:accept")
        logger.debug("netem proxy on %s:%d → %s:%d", host, self._port, *self._target)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop accepting, close every connection and wait until nothing of the proxy runs."""
        if self._closed:
            return
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        tg, self._tg = self._tg, None
        try:
            if tg is not None:
                await tg.__aexit__(None, None, None)
        finally:
            if self._listener is not None:
                self._listener.close()

    def _spawn(self, coro: Coroutine[Any, Any, None], *, name: str) -> None:
        assert self._tg is not None
        task = self._tg.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def port(self) -> int:
        """The listening port (known once the proxy is entered)."""
        if self._port is None:
            raise RuntimeError("the proxy is not started; use it as `async with LossyProxy(...)`")
        return self._port

    @property
    def profile(self) -> NetemProfile:
        return self._profile

    # --- control ------------------------------------------------------------------------------

    def statistics(self) -> ProxyStatistics:
        return ProxyStatistics(
            accepted=self._accepted,
            open=len(self._links),
            cuts=self._cuts,
            stalls=self._stalls,
            mid_packet_resets=self._mid_packet_resets,
            peer_resets=self._peer_resets,
            connect_failures=self._connect_failures,
            bytes_to_target=self._bytes["up"],
            bytes_to_client=self._bytes["down"],
        )

    def cut_all(self) -> int:
        """Reset every open connection now (both sides see RST); return how many were cut."""
        return sum(self._end(link, "cut") for link in list(self._links.values()))

    def pause(self) -> None:
        """A whole-network outage: stop accepting (new connections wait in the listen backlog)
        and forward nothing on any connection until ``resume()``. Nothing is closed."""
        self._up.clear()
        if self._wake_accept is not None:
            _resolve(self._wake_accept)

    def resume(self) -> None:
        """End the outage: accept again and deliver what was held."""
        self._up.set()

    @property
    def paused(self) -> bool:
        return not self._up.is_set()

    # --- accepting ----------------------------------------------------------------------------

    async def _accept_loop(self, listener: socket.socket) -> None:
        """Accept while the network is up. It waits for readability rather than inside
        ``sock_accept`` so that ``pause()`` stops it without losing an accepted socket."""
        loop = asyncio.get_running_loop()
        fd = listener.fileno()
        while True:
            await self._up.wait()
            wake: asyncio.Future[None] = loop.create_future()
            self._wake_accept = wake
            loop.add_reader(fd, _resolve, wake)
            try:
                await wake
            finally:
                loop.remove_reader(fd)
                self._wake_accept = None
            for _ in range(_ACCEPT_BATCH):
                if not self._up.is_set():
                    break
                try:
                    client, _ = listener.accept()
                except BlockingIOError:
                    break
                except OSError as exc:  # e.g. EMFILE, or a connection aborted in the backlog
                    logger.warning("netem proxy on port %d: accept failed: %s", self._port, exc)
                    await asyncio.sleep(0.05)
                    break
                client.setblocking(False)
                _nodelay(client)
                ordinal = self._accepted
                self._accepted += 1
                self._spawn(self._serve(ordinal, client), name=f"netem:{self._port}:link-{ordinal}")

    async def _connect_target(self) -> socket.socket:
        loop = asyncio.get_running_loop()
        host, port = self._target
        async with asyncio.timeout(_CONNECT_TIMEOUT_S):
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            family, type_, proto, _, address = infos[0]
            sock = socket.socket(family, type_, proto)
            try:
                sock.setblocking(False)
                await loop.sock_connect(sock, address)
            except BaseException:
                sock.close()
                raise
        _nodelay(sock)
        return sock

    async def _serve(self, ordinal: int, client: socket.socket) -> None:
        try:
            await self._up.wait()  # accepted just as the network went down: hold it
            upstream = await self._connect_target()
        except OSError as exc:  # TimeoutError included
            self._connect_failures += 1
            logger.info("netem proxy on port %d: target unreachable: %s", self._port, exc)
            _reset(client)
            return
        except BaseException:
            client.close()
            raise
        link = _Link(ordinal, client, upstream)
        self._links[ordinal] = link
        try:
            await self._run_link(link)
        except Exception:  # a bug here must not take the other connections down
            logger.exception("netem proxy on port %d: connection %d failed", self._port, ordinal)
        finally:
            del self._links[ordinal]
            if link.reason in (None, "eof"):  # None: the proxy is closing
                client.close()
                upstream.close()
            else:
                _reset(client)
                _reset(upstream)

    def _end(self, link: _Link, reason: _End) -> bool:
        """End ``link`` for ``reason`` (the first reason wins) and count it."""
        if link.reason is not None:
            return False
        link.reason = reason
        link.ended.set()
        if reason in ("cut", "expire"):
            self._cuts += 1
        elif reason == "mid_packet":
            self._mid_packet_resets += 1
        elif reason == "peer_reset":
            self._peer_resets += 1
        logger.debug("netem proxy on port %d: connection %d ends: %s", self._port, link.ordinal, reason)
        return True

    # --- one connection -----------------------------------------------------------------------

    async def _run_link(self, link: _Link) -> None:
        up: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(maxsize=_QUEUE_CHUNKS)
        down: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(maxsize=_QUEUE_CHUNKS)
        name = f"netem:{self._port}:link-{link.ordinal}"
        async with asyncio.TaskGroup() as tg:
            tasks = [
                tg.create_task(self._receive(link, link.client, up, "up"), name=f"{name}:recv-up"),
                tg.create_task(self._send(link, up, link.upstream, "up"), name=f"{name}:send-up"),
                tg.create_task(self._receive(link, link.upstream, down, "down"), name=f"{name}:recv-down"),
                tg.create_task(self._send(link, down, link.client, "down"), name=f"{name}:send-down"),
            ]
            if self._profile.has_faults:
                tasks.append(tg.create_task(self._run_faults(link), name=f"{name}:faults"))
            try:
                await link.ended.wait()
            finally:
                for task in tasks:
                    task.cancel()

    async def _receive(
        self,
        link: _Link,
        source: socket.socket,
        queue: asyncio.Queue[tuple[float, bytes] | None],
        direction: _Direction,
    ) -> None:
        """Read chunks and stamp each with the time it may leave: never earlier than the last."""
        loop = asyncio.get_running_loop()
        rng = random.Random(f"netem-delay:{self._seed}:{link.ordinal}:{direction}")
        base = self._profile.latency_ms / 1000
        jitter = self._profile.jitter_ms / 1000
        last_due = 0.0
        while True:
            try:
                data = await loop.sock_recv(source, self._read_size)
            except OSError:
                self._end(link, "peer_reset")
                return
            if not data:
                await queue.put(None)
                return
            delay = base + rng.uniform(-jitter, jitter) if jitter else base
            last_due = max(last_due, loop.time() + max(0.0, delay))
            await queue.put((last_due, data))

    async def _send(
        self,
        link: _Link,
        queue: asyncio.Queue[tuple[float, bytes] | None],
        sink: socket.socket,
        direction: _Direction,
    ) -> None:
        loop = asyncio.get_running_loop()
        bandwidth = self._profile.bandwidth_bytes_per_s
        link_free_at = 0.0
        while True:
            item = await queue.get()
            if item is None:  # the source closed its side: pass the FIN on
                with contextlib.suppress(OSError):
                    sink.shutdown(socket.SHUT_WR)
                link.eofs += 1
                if link.eofs == 2:
                    self._end(link, "eof")
                return
            due, data = item
            await self._wait_sendable(link, max(due, link_free_at))
            if link.armed is not None:
                data = data[: prefix_length(len(data), link.armed)]
            try:
                await loop.sock_sendall(sink, data)
            except OSError:
                self._end(link, "peer_reset")
                return
            self._bytes[direction] += len(data)
            if link.armed is not None:
                self._end(link, "mid_packet")
                return
            if bandwidth is not None:
                link_free_at = loop.time() + len(data) / bandwidth

    async def _wait_sendable(self, link: _Link, at: float) -> None:
        """Wait until ``at``, then while the network is paused or the link is stalled."""
        loop = asyncio.get_running_loop()
        while True:
            delay = at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            elif not self._up.is_set():
                await self._up.wait()
            elif link.stalled_until > loop.time():
                at = link.stalled_until
            else:
                return

    async def _run_faults(self, link: _Link) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        for fault in fault_plan(self._profile, seed=self._seed, ordinal=link.ordinal):
            delay = start + fault.at_s - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if fault.kind is FaultKind.CUT:
                self._end(link, "cut")
                return
            if fault.kind is FaultKind.EXPIRE:
                self._end(link, "expire")
                return
            if fault.kind is FaultKind.STALL:
                self._stalls += 1
                link.stalled_until = max(link.stalled_until, loop.time() + fault.duration_s)
            elif link.armed is None:
                link.armed = fault.fraction
