"""One proxied connection and what the links of one proxy share.

::

    Link.run():  recv-up ──▶ queue ──▶ send-up        (client → target)
                 recv-down ─▶ queue ──▶ send-down     (target → client)
                 faults (when the profile has any)    cut | stall | arm a mid-packet reset | expire
                 ...until the link ends (eof both ways, a cut, a reset): then every pump stops

``Network`` holds what every link of a proxy reads and counts into: the profile, the seed, the
read size, whether the network is up (``pause()``/``resume()``) and the counters behind
``LossyProxy.statistics()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import struct
from typing import Literal

from clients.testing.netem.profiles import FaultKind, NetemProfile, fault_plan, prefix_length

logger = logging.getLogger(__name__)

_READ_SIZE = 65536
_QUEUE_CHUNKS = 64  # per direction: at most 64 chunks (4 MiB) read ahead of the sender
_RST_LINGER = struct.pack("ii", 1, 0)

End = Literal["eof", "cut", "expire", "mid_packet", "peer_reset"]
_Direction = Literal["up", "down"]  # up: client → target, down: target → client
_Queue = asyncio.Queue[tuple[float, bytes] | None]


def reset(sock: socket.socket) -> None:
    """Close abruptly: SO_LINGER 0 makes the kernel send RST instead of FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST_LINGER)
    sock.close()


def nodelay(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Network:
    """What the links of one proxy share: the profile and seed, up or paused, the counters."""

    def __init__(self, *, profile: NetemProfile, seed: int) -> None:
        self.profile = profile
        self.seed = seed
        if profile.bandwidth_bytes_per_s is None:
            self.read_size = _READ_SIZE
        else:  # small enough chunks that one takes at most ~20 ms on the wire
            self.read_size = max(512, min(_READ_SIZE, int(profile.bandwidth_bytes_per_s / 50)))
        self.up = asyncio.Event()  # cleared while paused
        self.up.set()
        self.port = 0  # the proxy's listening port, for log lines
        self.cuts = 0
        self.stalls = 0
        self.mid_packet_resets = 0
        self.peer_resets = 0
        self.bytes: dict[_Direction, int] = {"up": 0, "down": 0}


class Link:
    """One proxied connection's sockets, fault state and pumps."""

    def __init__(self, network: Network, ordinal: int, client: socket.socket, upstream: socket.socket) -> None:
        self.network = network
        self.ordinal = ordinal
        self.client = client
        self.upstream = upstream
        self.stalled_until = 0.0
        self.armed: float | None = None  # a pending mid-packet reset's fraction
        self.eofs = 0
        self.reason: End | None = None
        self.ended = asyncio.Event()

    def end(self, reason: End) -> bool:
        """End the link for ``reason`` (the first reason wins) and count it."""
        if self.reason is not None:
            return False
        self.reason = reason
        self.ended.set()
        net = self.network
        if reason in ("cut", "expire"):
            net.cuts += 1
        elif reason == "mid_packet":
            net.mid_packet_resets += 1
        elif reason == "peer_reset":
            net.peer_resets += 1
        logger.debug("netem proxy on port %d: connection %d ends: %s", net.port, self.ordinal, reason)
        return True

    def close(self) -> None:
        """Close both sockets: quietly after an eof (or when the proxy closes), else with a reset."""
        if self.reason in (None, "eof"):  # None: the proxy is closing
            self.client.close()
            self.upstream.close()
        else:
            reset(self.client)
            reset(self.upstream)

    async def run(self) -> None:
        """Pump both directions (and run the faults) until the link ends."""
        up: _Queue = asyncio.Queue(maxsize=_QUEUE_CHUNKS)
        down: _Queue = asyncio.Queue(maxsize=_QUEUE_CHUNKS)
        name = f"netem:{self.network.port}:link-{self.ordinal}"
        async with asyncio.TaskGroup() as tg:
            tasks = [
                tg.create_task(self._receive(self.client, up, "up"), name=f"{name}:recv-up"),
                tg.create_task(self._send(up, self.upstream, "up"), name=f"{name}:send-up"),
                tg.create_task(self._receive(self.upstream, down, "down"), name=f"{name}:recv-down"),
                tg.create_task(self._send(down, self.client, "down"), name=f"{name}:send-down"),
            ]
            if self.network.profile.has_faults:
                tasks.append(tg.create_task(self._run_faults(), name=f"{name}:faults"))
            try:
                await self.ended.wait()
            finally:
                for task in tasks:
                    task.cancel()

    async def _receive(self, source: socket.socket, queue: _Queue, direction: _Direction) -> None:
        """Read chunks and stamp each with the time it may leave: never earlier than the last."""
        loop = asyncio.get_running_loop()
        net = self.network
        rng = random.Random(f"netem-delay:{net.seed}:{self.ordinal}:{direction}")
        base = net.profile.latency_ms / 1000
        jitter = net.profile.jitter_ms / 1000
        last_due = 0.0
        while True:
            try:
                data = await loop.sock_recv(source, net.read_size)
            except OSError:
                self.end("peer_reset")
                return
            if not data:
                await queue.put(None)
                return
            delay = base + rng.uniform(-jitter, jitter) if jitter else base
            last_due = max(last_due, loop.time() + max(0.0, delay))
            await queue.put((last_due, data))

    async def _send(self, queue: _Queue, sink: socket.socket, direction: _Direction) -> None:
        loop = asyncio.get_running_loop()
        bandwidth = self.network.profile.bandwidth_bytes_per_s
        sent = self.network.bytes
        link_free_at = 0.0
        while True:
            item = await queue.get()
            if item is None:  # the source closed its side: pass the FIN on
                with contextlib.suppress(OSError):
                    sink.shutdown(socket.SHUT_WR)
                self.eofs += 1
                if self.eofs == 2:
                    self.end("eof")
                return
            due, data = item
            await self._wait_sendable(max(due, link_free_at))
            if self.armed is not None:
                data = data[: prefix_length(len(data), self.armed)]
            try:
                await loop.sock_sendall(sink, data)
            except OSError:
                self.end("peer_reset")
                return
            sent[direction] += len(data)
            if self.armed is not None:
                self.end("mid_packet")
                return
            if bandwidth is not None:
                link_free_at = loop.time() + len(data) / bandwidth

    async def _wait_sendable(self, at: float) -> None:
        """Wait until ``at``, then while the network is paused or the link is stalled."""
        loop = asyncio.get_running_loop()
        up = self.network.up
        while True:
            delay = at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            elif not up.is_set():
                await up.wait()
            elif self.stalled_until > loop.time():
                at = self.stalled_until
            else:
                return

    async def _run_faults(self) -> None:
        loop = asyncio.get_running_loop()
        net = self.network
        start = loop.time()
        for fault in fault_plan(net.profile, seed=net.seed, ordinal=self.ordinal):
            delay = start + fault.at_s - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if fault.kind is FaultKind.CUT:
                self.end("cut")
                return
            if fault.kind is FaultKind.EXPIRE:
                self.end("expire")
                return
            if fault.kind is FaultKind.STALL:
                net.stalls += 1
                self.stalled_until = max(self.stalled_until, loop.time() + fault.duration_s)
            elif self.armed is None:
                self.armed = fault.fraction
