"""``LossyProxy``: a loopback listener whose accepted connections run as ``Link``s to the target.

::

    async with LossyProxy(target_port=..., profile=..., seed=...) as proxy:
        _start():  listen ──▶ worker "netem:PORT:accept" ──accept #n──▶ job "netem:PORT:link-n"
                                                                          connect target, Link.run()
    aclose():  the accept loop and every link cancelled (links get no grace), listener closed
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from dataclasses import dataclass

from clients.testing.netem.link import Link, Network, nodelay, reset
from clients.testing.netem.profiles import NetemProfile
from mqchat.service import Service, ServiceStatistics

__all__ = ["LossyProxy", "ProxyStatistics"]

logger = logging.getLogger(__name__)

_BACKLOG = 1024
_ACCEPT_BATCH = 128  # connections accepted per wake-up of the accept loop
_CONNECT_TIMEOUT_S = 10.0


@dataclass(frozen=True, kw_only=True)
class ProxyStatistics(ServiceStatistics):
    """A snapshot of a proxy's counters (and of its tasks)."""

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


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class LossyProxy(Service):
    """A TCP proxy on loopback that forwards to ``target_port`` through a simulated bad network.

    ``async with LossyProxy(target_port=broker_port, profile=FLAKY_3G, seed=1) as proxy:`` then
    point clients at ``proxy.port``.
    """

    name = "netem proxy"
    job_grace_s = 0.0  # at aclose() a connection is closed, not drained

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
        super().__init__()
        self._target = (target_host, target_port)
        self._listen = (listen_host, listen_port)
        self._network = Network(profile=profile, seed=seed)
        self._listener: socket.socket | None = None
        self._port: int | None = None
        self._links: dict[int, Link] = {}
        self._wake_accept: asyncio.Future[None] | None = None
        self._accepted = 0
        self._connect_failures = 0

    # --- lifecycle (mqchat.service.Service) -----------------------------------------------------

    async def _start(self) -> None:
        host, port = self._listen
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
        listener = socket.create_server((host, port), family=family, backlog=_BACKLOG)
        listener.setblocking(False)
        self._listener = listener
        self._port = self._network.port = listener.getsockname()[1]
        self.start_worker(self._accept_loop(listener), name=f"netem:{self._port}:accept")
        logger.debug("netem proxy on %s:%d → %s:%d", host, self._port, *self._target)

    async def _stopped(self) -> None:
        if self._listener is not None:
            self._listener.close()

    @property
    def port(self) -> int:
        """The listening port (known once the proxy is entered)."""
        if self._port is None:
            raise RuntimeError("the proxy is not started; use it as `async with LossyProxy(...)`")
        return self._port

    @property
    def profile(self) -> NetemProfile:
        return self._network.profile

    # --- control ------------------------------------------------------------------------------

    def statistics(self) -> ProxyStatistics:
        tasks = self.task_statistics()
        net = self._network
        return ProxyStatistics(
            workers=tasks.workers,
            dead_workers=tasks.dead_workers,
            jobs=tasks.jobs,
            accepted=self._accepted,
            open=len(self._links),
            cuts=net.cuts,
            stalls=net.stalls,
            mid_packet_resets=net.mid_packet_resets,
            peer_resets=net.peer_resets,
            connect_failures=self._connect_failures,
            bytes_to_target=net.bytes["up"],
            bytes_to_client=net.bytes["down"],
        )

    def cut_all(self) -> int:
        """Reset every open connection now (both sides see RST); return how many were cut."""
        return sum(link.end("cut") for link in list(self._links.values()))

    def pause(self) -> None:
        """A whole-network outage: stop accepting (new connections wait in the listen backlog)
        and forward nothing on any connection until ``resume()``. Nothing is closed."""
        self._network.up.clear()
        if self._wake_accept is not None:
            _resolve(self._wake_accept)

    def resume(self) -> None:
        """End the outage: accept again and deliver what was held."""
        self._network.up.set()

    @property
    def paused(self) -> bool:
        return not self._network.up.is_set()

    # --- accepting ----------------------------------------------------------------------------

    async def _accept_loop(self, listener: socket.socket) -> None:
        """Accept while the network is up. It waits for readability rather than inside
        ``sock_accept`` so that ``pause()`` stops it without losing an accepted socket."""
        loop = asyncio.get_running_loop()
        fd = listener.fileno()
        up = self._network.up
        while True:
            await up.wait()
            wake: asyncio.Future[None] = loop.create_future()
            self._wake_accept = wake
            loop.add_reader(fd, _resolve, wake)
            try:
                await wake
            finally:
                loop.remove_reader(fd)
                self._wake_accept = None
            for _ in range(_ACCEPT_BATCH):
                if not up.is_set():
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
                nodelay(client)
                ordinal = self._accepted
                self._accepted += 1
                self.start_job(self._serve(ordinal, client), name=f"netem:{self._port}:link-{ordinal}")

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
        nodelay(sock)
        return sock

    async def _serve(self, ordinal: int, client: socket.socket) -> None:
        try:
            await self._network.up.wait()  # accepted just as the network went down: hold it
            upstream = await self._connect_target()
        except OSError as exc:  # TimeoutError included
            self._connect_failures += 1
            logger.info("netem proxy on port %d: target unreachable: %s", self._port, exc)
            reset(client)
            return
        except BaseException:
            client.close()
            raise
        link = Link(self._network, ordinal, client, upstream)
        self._links[ordinal] = link
        try:
            await link.run()
        except Exception:  # a bug here must not take the other connections down
            logger.exception("netem proxy on port %d: connection %d failed", self._port, ordinal)
        finally:
            del self._links[ordinal]
            link.close()
