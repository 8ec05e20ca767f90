"""Presence reports: device connections → the presence registry → retained ``p/{user}``.

::

    MqchatBroker ─connected / disconnected─▶ queue (bounded) ─▶ worker "presence-reports"
                                                                   ├─▶ PresenceRegistry.connected/disconnected
                                                                   └─▶ retained $mqchat/devices/{user} (device_topics)
    PresenceRegistry ─transition (this broker's or, shared, any other's)─▶ retained p/{user}
    a subscription to p/{user} with nothing retained yet ─▶ retain_current: the registry's answer

Reports leave the connect path at once and reach the registry one by one, in the order they
happened (a device's connect is never overtaken by its own earlier disconnect).
"""

from __future__ import annotations

import asyncio
import logging
import time

from broker.delivery import DROPPED, Delivery
from mqchat.internal_topics import DEVICES_TOPIC_PREFIX
from mqchat.protocol import encode, presence_topic
from mqchat.service import Service
from storage.presence import Presence, PresenceRegistry

logger = logging.getLogger(__name__)

ATTEMPTS = 4
"""A report the registry refuses is tried this many times (backoff 0.1 s × 4ⁿ) before it is given up."""


ERASED_KEPT_S = 600.0
"""How long an erased user's presence stays suppressed (longer than any grace window)."""


class PresenceReports(Service):
    name = "presence-reports"

    def __init__(
        self, *, presence: PresenceRegistry, delivery: Delivery, device_topics: bool = False, max_queued: int = 200_000
    ) -> None:
        super().__init__()
        self.presence = presence
        self._delivery = delivery
        # device_topics: keep the retained DEVICES_TOPIC of each user (which of their devices are
        # connected, as the registry says), for a bridge in another process without a shared registry.
        self._device_topics = device_topics
        self._events: asyncio.Queue[tuple[str, str, str, str]] = asyncio.Queue(maxsize=max_queued)
        # Users erased (accounts deleted) lately: no presence of theirs is retained again, whatever
        # transition a registry still announces (user -> until, monotonic).
        self._erased: dict[str, float] = {}
        presence.listen(self._on_presence)

    async def _start(self) -> None:
        self.start_worker(self._report_all(), name="presence-reports")

    def connected(self, user: str, device: str, connection: str) -> None:
        self._put(("connected", user, device, connection))

    def disconnected(self, user: str, device: str, connection: str) -> None:
        self._put(("disconnected", user, device, connection))

    def forget(self, user: str) -> None:
        """The user's account is deleted: their retained presence goes now, none is retained for
        ERASED_KEPT_S, and the registry forgets them (after the reports queued before this)."""
        now = time.monotonic()
        for gone in [u for u, until in self._erased.items() if until <= now]:
            del self._erased[gone]
        self._erased[user] = now + ERASED_KEPT_S
        self._delivery.forget(presence_topic(user))
        self._put(("forget", user, "", ""))

    def _put(self, event: tuple[str, str, str, str]) -> None:
        try:
            self._events.put_nowait(event)
        except asyncio.QueueFull:
            DROPPED.labels(reason="presence_report").inc()

    async def _report_all(self) -> None:
        while True:
            kind, user, device, connection = await self._events.get()
            await self._report(kind, user, device, connection)
            if self._device_topics and kind == "forget":
                self._delivery.forget(f"{DEVICES_TOPIC_PREFIX}{user}")
            elif self._device_topics:
                await self._publish_devices(user)

    async def _report(self, kind: str, user: str, device: str, connection: str) -> None:
        """One report to the registry, retried a few times; given up (logged, counted) after that."""
        for attempt in range(ATTEMPTS):
            try:
                if kind == "connected":
                    await self.presence.connected(user, device, connection)
                elif kind == "disconnected":
                    await self.presence.disconnected(user, device, connection)
                else:
                    await self.presence.forget(user)
                return
            except Exception as exc:
                if attempt == ATTEMPTS - 1:
                    DROPPED.labels(reason="presence_report").inc()
                    logger.error("presence registry unavailable; %s/%s not reported: %s", user, device, exc)
                else:
                    await asyncio.sleep(0.1 * 4**attempt)

    async def _publish_devices(self, user: str) -> None:
        try:
            devices = await self.presence.devices(user)
        except Exception as exc:  # one report fails alone; the next change publishes the list
            logger.error("presence registry unavailable; devices of %s not published: %s", user, exc)
            return
        self._delivery.retain(f"{DEVICES_TOPIC_PREFIX}{user}", encode({"devices": sorted(devices)}))

    async def retain_current(self, user: str) -> bool:
        """Retain ``p/{user}`` as the registry has it now, for a subscriber whose broker holds no
        state for the user yet (it started after the user's last change). False when a
        transition arrived while the registry was asked: that one is retained and current."""
        found = (await self.presence.lookup([user]))[user]
        topic = presence_topic(user)
        until = self._erased.get(user)
        if until is not None and until > time.monotonic():
            return False
        if self._delivery.retained_on(topic) is not None:
            return False
        self._delivery.retain(topic, encode(found.envelope()))
        return True

    def _on_presence(self, presence: Presence) -> None:
        until = self._erased.get(presence.user)
        if until is not None and until > time.monotonic():
            return  # an erased user's last transition: nothing of theirs is kept
        self._delivery.retain(presence_topic(presence.user), encode(presence.envelope()))
