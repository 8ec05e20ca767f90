"""The presence and session registry: which devices are connected, and who is online.

::

    broker: device connected ──▶ connected(user, device, conn) ─▶ user offline? ─▶ online now
            device gone      ──▶ disconnected(user, device, conn) ─▶ last device? ─▶ due offline at
                                                                      now + grace window
    sweep (every process, a few times a second) ─▶ due and still no device ─▶ offline, last_seen

A transition reaches every ``listen``-er of every registry sharing the backend exactly once
(the in-memory one: this process only; Redis: every process, through pub/sub). A user who
drops and comes back within the grace window never appears offline.

``conn`` names one connection of a device: when a device reconnects (takeover), the old
connection's late ``disconnected`` does not remove the new one.

Since the registry knows which process holds each device, it also relays events between those
processes (a cluster's nodes): ``relay`` sends a user's events to the processes holding that
user's devices, and others (channel posts, membership changes) to all; each process hands what
it hears to the ``relay_to`` callback. The in-memory registry has no other process to relay to.

Backends: ``MemoryPresence`` (one process, the embedded default) and
``storage.redis_presence.RedisPresence`` (several processes; TTL liveness per process, so the
devices of a crashed broker go offline on their own). Both pass ``tests/test_presence_contract.py``.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

from prometheus_client import Counter

from mqchat.clock import SYSTEM_CLOCK, Clock
from mqchat.service import Service

logger = logging.getLogger(__name__)

ONLINE = "online"
OFFLINE = "offline"

TRANSITIONS = Counter("mqchat_presence_transitions_total", "Users going online or offline", ["state"])


@dataclass(frozen=True, slots=True)
class Presence:
    user: str
    state: str  # "online" | "offline"
    last_seen: int | None  # ms since the epoch: online since / last device gone; None: never seen

    @property
    def online(self) -> bool:
        return self.state == ONLINE

    def envelope(self) -> dict[str, object]:
        """The retained ``p/{user}`` payload and the HTTP answer."""
        return {"state": self.state, "last_seen": self.last_seen}


Listener = Callable[[Presence], None]


Event = tuple[str, bytes, int]
"""A publish relayed between processes: (topic, payload, qos)."""
Deliver = Callable[[Event], Awaitable[None]]
Routed = tuple[str | None, Event]
"""An event and the user whose devices it is for (None: for every process)."""


class PresenceRegistry(Service, ABC):
    """A service (async context manager, or ``start()``/``aclose()``): runs the sweep (and, per
    backend, liveness) as workers."""

    name = "presence"

    def __init__(self, *, grace_s: float = 5.0, sweep_interval_s: float = 0.25, clock: Clock = SYSTEM_CLOCK) -> None:
        super().__init__()
        self.grace_s = grace_s
        self.sweep_interval_s = sweep_interval_s
        self.clock = clock
        self._listeners: list[Listener] = []
        self._takeover_callbacks: list[Callable[[str, str, str], None]] = []

    def listen(self, listener: Listener) -> None:
        """Call listener (on this loop) with every transition, wherever it was made."""
        self._listeners.append(listener)

    def _emit(self, presence: Presence) -> None:
        TRANSITIONS.labels(state=presence.state).inc()
        for listener in self._listeners:
            try:
                listener(presence)
            except Exception:
                logger.exception("presence listener failed")

    @abstractmethod
    async def connected(self, user: str, device: str, conn: str) -> None:
        """Device connected (connection conn)."""

    @abstractmethod
    async def disconnected(self, user: str, device: str, conn: str) -> None:
        """Connection conn of device ended (graceful, keepalive timeout, cut: all the same)."""

    @abstractmethod
    async def lookup(self, users: Iterable[str]) -> dict[str, Presence]:
        """State of each user; users never seen are offline with last_seen None. Within the
        grace window a user is still online."""

    @abstractmethod
    async def devices(self, user: str) -> frozenset[str]:
        """The user's devices connected now."""

    @abstractmethod
    async def forget(self, user: str) -> None:
        """Erase the user (an account deleted): no state, no last seen; a disconnect reported
        after this for one of their devices changes nothing."""

    @abstractmethod
    async def sweep(self) -> None:
        """Turn users whose grace window ended (and, per backend, whose process died) offline."""

    # --- events between the processes that hold devices (a cluster's nodes) ----------------------

    def on_takeover(self, callback: Callable[[str, str, str], None]) -> None:
        """Call callback(user, device, conn) when a device that connection conn of this process
        holds connects through another process: this one's session is stale and should end. (One
        process sees its own takeovers itself: the MQTT client id is the device.)"""
        self._takeover_callbacks.append(callback)

    def _taken_over(self, user: str, device: str, conn: str) -> None:
        for callback in self._takeover_callbacks:
            try:
                callback(user, device, conn)
            except Exception:
                logger.exception("takeover callback failed")

    def relay_to(self, deliver: Deliver | None) -> None:
        """Hand deliver the events other processes relay to this one (in the order they were
        relayed); None: drop them (what they were for has stopped). A registry of one process
        hears none."""

    def relay(self, events: Sequence[Routed]) -> None:
        """Relay events to the other processes, in order, without waiting: an event for a user to
        those holding one of the user's devices, one for no user (None) to every process. At most
        once: an event lost on the way is repaired by the device's catch-up. A registry of one
        process has no one to relay to."""

    async def start(self) -> None:
        """Start the workers (what ``async with`` does on entry); ``aclose()`` stops them."""
        await self.__aenter__()

    async def _start(self) -> None:
        self.start_worker(self._sweep_loop(), name="presence-sweep")

    async def _sweep_loop(self) -> None:
        while True:
            try:
                await self.sweep()
            except Exception:
                logger.exception("presence sweep failed; retrying")
            await self.clock.sleep(self.sweep_interval_s)


class MemoryPresence(PresenceRegistry):
    """One process's registry (the embedded default)."""

    def __init__(self, *, grace_s: float = 5.0, sweep_interval_s: float = 0.25, clock: Clock = SYSTEM_CLOCK) -> None:
        super().__init__(grace_s=grace_s, sweep_interval_s=sweep_interval_s, clock=clock)
        self._devices: dict[str, dict[str, str]] = {}  # user -> device -> conn
        self._state: dict[str, Presence] = {}
        self._due: dict[str, tuple[float, int]] = {}  # user -> (monotonic deadline, left at ms)

    async def connected(self, user: str, device: str, conn: str) -> None:
        self._devices.setdefault(user, {})[device] = conn
        self._due.pop(user, None)
        current = self._state.get(user)
        if current is None or not current.online:
            self._set(Presence(user, ONLINE, self.clock.time_ms()))

    async def disconnected(self, user: str, device: str, conn: str) -> None:
        devices = self._devices.get(user)
        if devices is None or devices.get(device) != conn:
            return  # an older connection of a device that has connected again since
        del devices[device]
        if not devices:
            del self._devices[user]
            self._due[user] = (self.clock.monotonic() + self.grace_s, self.clock.time_ms())

    async def lookup(self, users: Iterable[str]) -> dict[str, Presence]:
        return {u: self._state.get(u) or Presence(u, OFFLINE, None) for u in users}

    async def devices(self, user: str) -> frozenset[str]:
        return frozenset(self._devices.get(user, ()))

    async def forget(self, user: str) -> None:
        self._devices.pop(user, None)
        self._state.pop(user, None)
        self._due.pop(user, None)

    async def sweep(self) -> None:
        if not self._due:
            return
        now = self.clock.monotonic()
        for user, (deadline, left_at) in list(self._due.items()):
            if deadline <= now:
                del self._due[user]
                if user not in self._devices:
                    self._set(Presence(user, OFFLINE, left_at))

    def _set(self, presence: Presence) -> None:
        self._state[presence.user] = presence
        self._emit(presence)
