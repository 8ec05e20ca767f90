"""Membership answers for the broker's ACL, cached with invalidation.

A device's SUBSCRIBE to ``c/{conv}/in`` needs "is this user a member of conv?", and to
``p/{user}`` "do these two users share a conversation?". Both are store reads; a reconnecting
fleet asks them thousands of times a second, so answers are cached:

- every answer carries the *generation* of what it depends on (the conversation; each user)
  taken before the store was asked; a membership change (``changed``) bumps those
  generations, so an answer read before the change is never served after it, even if the
  read was still in flight;
- a "no" about sharing a conversation is not cached: a first 1:1 message creates one without
  any membership event;
- entries also expire (``ttl_s``), which bounds staleness should an invalidation be lost
  (e.g. the broker restarted between change and event: then the cache is empty anyway).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from prometheus_client import Counter

from mqchat.clock import SYSTEM_CLOCK, Clock
from storage import privacy
from storage.base import Groups, PrivacySettings

LOOKUPS = Counter(
    "mqchat_broker_membership_lookups_total", "Membership questions of the broker's ACL", ["question", "result"]
)


@dataclass(slots=True)
class _Entry:
    answer: bool
    expires: float
    generations: tuple[int, ...]


class MembershipCache:
    def __init__(
        self,
        *,
        groups: Groups,
        privacy: PrivacySettings,
        ttl_s: float = 60.0,
        max_entries: int = 200_000,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._groups = groups
        self._privacy = privacy
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        self._clock = clock
        self._entries: dict[tuple[str, str, str], _Entry] = {}
        self._conv_gen: dict[str, int] = {}
        self._user_gen: dict[str, int] = {}
        self.version = 0  # counts membership changes: a check that spans one is made again

    async def is_member(self, conv: str, user: str) -> bool:
        """Whether user is a member of group or channel conv now."""

        async def ask() -> bool:
            standing = await self._groups.membership(conv=conv, user=user)
            return standing is not None and standing.member is not None

        generations = (self._conv_gen.get(conv, 0), self._user_gen.get(user, 0))
        return await self._cached(("member", conv, user), generations, ask, keep_no=True)

    async def shares_conversation(self, a: str, b: str) -> bool:
        if a == b:
            return True
        a, b = min(a, b), max(a, b)
        generations = (self._user_gen.get(a, 0), self._user_gen.get(b, 0))
        return await self._cached(
            ("shares", a, b), generations, lambda: self._groups.shares_conversation(a, b), keep_no=False
        )

    async def sees_presence(self, viewer: str, target: str) -> bool:
        """May viewer follow target's presence (``storage.privacy.sees_presence``)? A change of
        target's settings is announced like a membership change naming target."""
        if viewer == target:
            return True
        generations = (self._user_gen.get(viewer, 0), self._user_gen.get(target, 0))
        return await self._cached(
            ("presence", viewer, target),
            generations,
            lambda: privacy.sees_presence(viewer, target, groups=self._groups, privacy=self._privacy),
            keep_no=False,
        )

    async def _cached(
        self,
        key: tuple[str, str, str],
        generations: tuple[int, ...],
        ask: Callable[[], Awaitable[bool]],
        *,
        keep_no: bool,
    ) -> bool:
        """The cached answer to key, or ask the store (generations taken before asking)."""
        question = key[0]
        cached = self._get(key, generations)
        if cached is not None:
            LOOKUPS.labels(question=question, result="hit").inc()
            return cached
        LOOKUPS.labels(question=question, result="miss").inc()
        answer = await ask()
        if answer or keep_no:
            self._put(key, answer, generations)
        return answer

    def changed(self, conv: str, users: Iterable[str]) -> None:
        """conv's membership changed for users (added or removed)."""
        self.version += 1
        self._conv_gen[conv] = self._conv_gen.get(conv, 0) + 1
        for user in users:
            self._user_gen[user] = self._user_gen.get(user, 0) + 1

    def __len__(self) -> int:
        return len(self._entries)

    def _get(self, key: tuple[str, str, str], generations: tuple[int, ...]) -> bool | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.generations != generations or entry.expires < self._clock.monotonic():
            del self._entries[key]
            return None
        return entry.answer

    def _put(self, key: tuple[str, str, str], answer: bool, generations: tuple[int, ...]) -> None:
        if len(self._entries) >= self._max_entries:  # forget the older half (dicts keep insertion order)
            for old in list(self._entries)[: self._max_entries // 2]:
                del self._entries[old]
        self._entries[key] = _Entry(answer, self._clock.monotonic() + self._ttl_s, generations)
