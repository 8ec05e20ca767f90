"""The bridge's view of presence when no registry is shared with it.

In ``--adapter mqtt`` without Redis, the registry lives in the broker process; the broker
keeps each user's state as the retained ``p/{user}``, and the bridge subscribes to ``p/+``
and remembers the latest of each (DESIGN: "the bridge learns it from there").
"""

from __future__ import annotations

import json
import logging
from collections.abc import Container, Iterable

from storage.presence import OFFLINE, ONLINE, Presence

logger = logging.getLogger(__name__)


class PresenceMirror:
    def __init__(self) -> None:
        self._known: dict[str, Presence] = {}

    def update(self, topic: str, payload: bytes) -> None:
        """Take one ``p/{user}`` publish; anything malformed is ignored."""
        user = topic[2:] if topic.startswith("p/") else ""
        try:
            state = json.loads(payload)
            last_seen = state.get("last_seen")
            if not user or state.get("state") not in (ONLINE, OFFLINE):
                raise ValueError("not a presence state")
            if last_seen is not None and not isinstance(last_seen, int):
                raise ValueError("last_seen is not a number")
        except (ValueError, AttributeError):
            logger.warning("ignored a malformed presence publish on %s", topic[:80])
            return
        self._known[user] = Presence(user, state["state"], last_seen)

    async def lookup(self, users: Iterable[str]) -> dict[str, Presence]:
        return {u: self._known.get(u) or Presence(u, OFFLINE, None) for u in users}

    async def devices(self, user: str) -> Container[str]:
        """The retained state is per user, not per device: while the user is online, every one of
        their devices counts as connected (push then waits until the user is away everywhere)."""
        known = self._known.get(user)
        return _EVERY_DEVICE if known is not None and known.online else frozenset()


class _EveryDevice:
    def __contains__(self, device: object) -> bool:
        return True


_EVERY_DEVICE = _EveryDevice()
