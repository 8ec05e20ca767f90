"""The bridge's view of presence when no registry is shared with it.

In ``--adapter mqtt`` without Redis, the registry lives in the broker process; the broker
keeps each user's state as the retained ``p/{user}`` and the devices connected to it as the
retained ``$mqchat/devices/{user}``, and the bridge subscribes to both and remembers the latest
of each (DESIGN: "the bridge learns it from there").
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable

from mqchat.internal_topics import DEVICES_TOPIC_PREFIX
from storage.presence import OFFLINE, ONLINE, Presence

logger = logging.getLogger(__name__)


class PresenceMirror:
    def __init__(self) -> None:
        self._known: dict[str, Presence] = {}
        self._devices: dict[str, frozenset[str]] = {}

    def update(self, topic: str, payload: bytes) -> None:
        """Take one ``p/{user}`` or ``$mqchat/devices/{user}`` publish; anything malformed is ignored."""
        try:
            state = json.loads(payload)
            if topic.startswith(DEVICES_TOPIC_PREFIX):
                devices = state["devices"]
                if not isinstance(devices, list) or not all(isinstance(d, str) for d in devices):
                    raise ValueError("not a device list")
                user = topic[len(DEVICES_TOPIC_PREFIX) :]
                if devices:
                    self._devices[user] = frozenset(devices)
                else:
                    self._devices.pop(user, None)
                return
            user = topic[2:] if topic.startswith("p/") else ""
            last_seen = state.get("last_seen")
            if not user or state.get("state") not in (ONLINE, OFFLINE):
                raise ValueError("not a presence state")
            if last_seen is not None and not isinstance(last_seen, int):
                raise ValueError("last_seen is not a number")
        except (ValueError, AttributeError, KeyError, TypeError):
            logger.warning("ignored a malformed presence publish on %s", topic[:80])
            return
        self._known[user] = Presence(user, state["state"], last_seen)

    async def lookup(self, users: Iterable[str]) -> dict[str, Presence]:
        return {u: self._known.get(u) or Presence(u, OFFLINE, None) for u in users}

    async def devices(self, user: str) -> frozenset[str]:
        return self._devices.get(user, frozenset())
