"""Which access tokens are refused although they verify: those of a logged-out device (or of
every device of a deleted user) issued before the logout.

::

    logout / deletion ──▶ Accounts.revoke(user, device | None, before_ms)   (durable, every node reads it)
                     └──▶ Revocations.note(...) here, and the logout event to every node's broker,
                          whose Revocations.note makes it known there at once

    CONNECT / HTTP call ──▶ Revocations.check(identity): the user's revocations, read from the
                            store at most once per ``fresh_s`` per user (kept in a bounded memory)

    users to read ──▶ one reader task: takes up to READ_BATCH of them, one ``revocations_of``
                      read; those that came meanwhile go in the next (a reconnecting crowd of
                      thousands costs tens of reads, not thousands)

A token is refused when its ``iat`` (to the millisecond) is not after the latest revocation of its
device or of all of the user's devices; a token without ``iat`` is refused once any revocation applies to it. A node
that did not hear the event (a bridge process beside its own broker) learns of it within
``fresh_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict

from prometheus_client import Counter

from mqchat.errors import AuthError, StorageError
from mqchat.tokens import Identity
from storage.base import Accounts

REFUSED = Counter("mqchat_revoked_tokens_refused_total", "Tokens refused because their device was logged out")

ALL_DEVICES = ""
"""The key of a revocation that covers every device of a user."""

READ_BATCH = 500
"""Users per ``revocations_of`` read."""


class Revocations:
    """The revocation list of the store, remembered per user for ``fresh_s`` seconds."""

    def __init__(self, *, accounts: Accounts, fresh_s: float = 5.0, kept: int = 50_000) -> None:
        self._accounts = accounts
        self._fresh_s = fresh_s
        self._kept = kept
        self._known: OrderedDict[str, tuple[float, dict[str, int]]] = OrderedDict()
        self._unread: dict[str, asyncio.Future[dict[str, int]]] = {}  # users whose read has not begun
        self._reader: asyncio.Task[None] | None = None

    async def check(self, identity: Identity) -> None:
        """Raise AuthError when identity's token was issued before a logout that covers it."""
        cutoff = await self.cutoff(identity.user, identity.device)
        if cutoff and (identity.issued_at is None or round(identity.issued_at * 1000) <= cutoff):
            REFUSED.inc()
            raise AuthError("token revoked: the device was logged out; sign in again")

    async def cutoff(self, user: str, device: str) -> int:
        """Tokens of (user, device) issued before this (ms since the epoch) are refused; 0: none."""
        known = self._known.get(user)
        if known is None or time.monotonic() - known[0] > self._fresh_s:
            read_at = time.monotonic()
            fetched = await self._read(user)
            # What note() learnt while the store was read stays: a read that began before the
            # revocation was written must not hide it.
            noted = self._known.get(user)
            known = (read_at, _merged(fetched, noted[1]) if noted is not None else fetched)
            self._remember(user, known)
        else:
            self._known.move_to_end(user)
        revoked = known[1]
        return max(revoked.get(device, 0), revoked.get(ALL_DEVICES, 0))

    async def _read(self, user: str) -> dict[str, int]:
        """user's revocations, from a read that begins after this call (shared with the other
        users waiting for one)."""
        future = self._unread.get(user)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            future.add_done_callback(_retrieved)
            self._unread[user] = future
            if self._reader is None or self._reader.done():
                self._reader = asyncio.create_task(self._read_unread(), name="revocation-reads")
        return await asyncio.shield(future)

    async def _read_unread(self) -> None:
        while self._unread:
            users = list(self._unread)[:READ_BATCH]
            batch = {user: self._unread.pop(user) for user in users}
            try:
                found = await self._accounts.revocations_of(users)
            except BaseException as exc:  # each waiting check hears it (and answers "unavailable")
                error = exc if isinstance(exc, Exception) else StorageError("the revocation read was interrupted")
                for future in batch.values():
                    if not future.done():
                        future.set_exception(error)
                if not isinstance(exc, Exception):
                    raise
                continue
            for user, future in batch.items():
                if not future.done():
                    future.set_result(found.get(user, {}))

    def note(self, user: str, device: str | None, before_ms: int) -> None:
        """A revocation made (here or on another node): known at once, without a store read."""
        key = ALL_DEVICES if device is None else device
        known = self._known.get(user)
        # Unknown here: remembered as stale (the next check reads the store and keeps this too).
        read_at, revoked = known if known is not None else (float("-inf"), {})
        self._remember(user, (read_at, _merged(revoked, {key: before_ms})))

    def _remember(self, user: str, known: tuple[float, dict[str, int]]) -> None:
        self._known[user] = known
        self._known.move_to_end(user)
        while len(self._known) > self._kept:
            self._known.popitem(last=False)


def _retrieved(future: asyncio.Future[dict[str, int]]) -> None:
    """Marks a failed read's error as seen: a check that was cancelled meanwhile never will."""
    if not future.cancelled():
        with contextlib.suppress(Exception):
            future.exception()


def _merged(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    """Both revocation lists, the later moment of each device."""
    merged = dict(a)
    for key, before in b.items():
        merged[key] = max(merged.get(key, 0), before)
    return merged
