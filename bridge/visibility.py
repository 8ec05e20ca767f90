"""Who sees whom online: ``GET /v1/presence`` answers only for the caller and the users who
let the caller see them (storage.privacy: a shared conversation, presence not hidden)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

from mqchat.errors import ErrorCode, RequestError
from storage.base import Groups, PrivacySettings
from storage.presence import Presence
from storage.privacy import sees_presence

PresenceLookup = Callable[[list[str]], Awaitable[dict[str, Presence]]]


class Visibility:
    """Presence of users, for a viewer allowed to see each of them."""

    def __init__(self, *, groups: Groups, privacy: PrivacySettings, lookup: PresenceLookup | None = None) -> None:
        self._groups = groups
        self._privacy = privacy
        self._lookup = lookup  # None: this server has no presence (unavailable)

    async def presence(self, viewer: str, users: Sequence[str]) -> dict[str, Presence]:
        """The presence of each of users, or forbidden naming the users viewer may not see."""
        others = [u for u in users if u != viewer]
        visible = await asyncio.gather(
            *(sees_presence(viewer, u, groups=self._groups, privacy=self._privacy) for u in others)
        )
        hidden = [u for u, ok in zip(others, visible, strict=True) if not ok]
        if hidden:
            raise RequestError(
                ErrorCode.FORBIDDEN,
                f"the presence of {', '.join(hidden[:5])} is private (you share no conversation, or they hide it)",
            )
        if self._lookup is None:
            raise RequestError(ErrorCode.UNAVAILABLE, "presence is not available on this server")
        return await self._lookup(list(users))
