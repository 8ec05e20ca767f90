"""Logout, revocation and account deletion.

::

    logout(user, device | None)
        ─▶ Accounts.revoke: tokens issued before now refused (durable; every node reads it)
        ─▶ the device's push token gone (every device's, for None)
        ─▶ LOGOUT_TOPIC to every node's broker: its connections closed at once, the revocation
           known there without a store read (storage.revocations)

    delete_account(user) ─▶ Accounts.begin_deletion (durable) ─▶ AccountDeletions job:
        logout(user, every device, erase) ─▶ push state forgotten
        ─▶ in every conversation they ever wrote in: their messages redacted (kind "deleted", seq kept)
        ─▶ the groups and channels they are in: left (the members hear ``members_removed``)
        ─▶ privacy settings deleted ─▶ logout again, and a second pass over what changed meanwhile
        ─▶ their uploads and files deleted (bytes, then records)
        ─▶ their own one-to-one conversation states forgotten ─▶ Accounts.finish_deletion

Every step is idempotent and a conversation is left only after its messages are redacted, so a
deletion interrupted anywhere (kill -9) is finished by running it again: ``AccountDeletions``
resumes every begun deletion at start and every ``sweep_s``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter

from bridge.groups import BrokerLink, GroupService
from bridge.media.service import MediaService
from bridge.outgoing import Outgoing
from mqchat.clock import SYSTEM_CLOCK, Clock
from mqchat.errors import ErrorCode, RequestError
from mqchat.internal_topics import LOGOUT_TOPIC
from mqchat.protocol import encode
from mqchat.service import Service
from storage.base import Accounts, ConversationStates, PushStore, StoreRefusal
from storage.revocations import Revocations

logger = logging.getLogger(__name__)

DELETIONS = Counter("mqchat_account_deletions_total", "Account deletions run", ["outcome"])
LOGOUTS = Counter("mqchat_logouts_total", "Devices (or all of a user's devices) logged out", ["scope"])

_PAGE = 500

ConnectedDevices = Callable[[str], Awaitable[Collection[str]]]
"""A user's devices connected now (the presence registry's answer)."""


@dataclass(frozen=True, slots=True)
class DeletionState:
    user: str
    started_at: int  # ms since the epoch
    finished: bool


class AccountService:
    """Logs devices out and erases accounts; the HTTP routes (the user's own and the admin API)
    share it."""

    def __init__(
        self,
        *,
        accounts: Accounts,
        states: ConversationStates,
        groups: GroupService,
        push_store: PushStore | None,
        revocations: Revocations,
        broker: BrokerLink,
        connected: ConnectedDevices,
        clock: Clock = SYSTEM_CLOCK,
        media: MediaService | None = None,
    ) -> None:
        self._media = media
        self._connected = connected
        self._accounts = accounts
        self._states = states
        self._groups = groups
        self._push = push_store
        self.revocations = revocations
        self._broker = broker
        self._clock = clock

    async def logout(self, user: str, device: str | None, *, erase: bool = False) -> int:
        """Log device (None: every device of user) out: returns the moment (ms) before which its
        tokens are refused. Needs the broker (its connections must close): 503 otherwise."""
        self._broker.require()
        before = self._clock.time_ms()
        await self._accounts.revoke(user, device=device, before_ms=before)
        self.revocations.note(user, device, before)
        event = {"user": user, "device": device, "before": before, "erase": erase}
        await self._broker.publish([Outgoing(LOGOUT_TOPIC, encode(event))])  # connections closed first
        if self._push is not None:
            if device is None:
                await self._push.forget_user(user)
            else:
                await self._push.delete_device_token(user, device)
        LOGOUTS.labels(scope="user" if device is None else "device").inc()
        logger.info("logged out %s (%s)", user, "every device" if device is None else f"device {device}")
        return before

    async def devices(self, user: str) -> list[dict[str, Any]]:
        """The user's devices known here (connected now, or with a push token) and their state."""
        connected = await self._connected(user)
        pushed = {t.device: t.platform for t in await self._push.tokens([user])} if self._push is not None else {}
        return [
            {"device": device, "connected": device in connected, "push": pushed.get(device)}
            for device in sorted({*connected, *pushed})
        ]

    async def begin_deletion(self, user: str) -> DeletionState:
        started = await self._accounts.begin_deletion(user, at_ms=self._clock.time_ms())
        return DeletionState(user, started, False)

    async def deletion_state(self, user: str) -> DeletionState | None:
        found = await self._accounts.deletion_state(user)
        return None if found is None else DeletionState(user, found[0], found[1])

    async def erase(self, user: str) -> None:
        """Run (or finish) the erasure of user; every step may be run again."""
        started = await self._states.current_version()
        await self.logout(user, None, erase=True)
        # Every conversation they ever wrote in (groups left long ago included), then the
        # groups and channels they are in now: redacted first, so a crash in between finds the
        # conversation again.
        for conv in await self._accounts.sender_conversations(user):
            await self._accounts.redact_messages(conv=conv, sender=user)
        await self._erase_conversations(user, since=0, redact=False)
        await self._accounts.delete_user_settings(user)
        # A token issued while this ran (a sign-in during the erasure) ends now, and whatever it
        # changed since the start is erased too.
        await self.logout(user, None, erase=True)
        await self._erase_conversations(user, since=started, redact=True)
        if self._media is not None:  # their files: no message shows them any more
            await self._media.erase_user(user)
        await self._accounts.forget_conversation_states(user)
        await self._accounts.finish_deletion(user)

    async def _erase_conversations(self, user: str, *, since: int, redact: bool) -> None:
        """Leave each group and channel of the user's changed after ``since`` (first, with
        ``redact``, redact their messages in each of those conversations)."""
        version = since
        while True:
            page = await self._states.changes_since(user=user, version=version, limit=_PAGE)
            for state in page.states:
                if redact:
                    await self._accounts.redact_messages(conv=state.conv, sender=user)
                if state.kind in ("group", "channel"):
                    await self._leave(state.conv, user)
            if not page.more:
                break
            version = page.version

    async def _leave(self, conv: str, user: str) -> None:
        try:
            await self._groups.remove_member(conv, by=user, user=user)
        except (RequestError, StoreRefusal) as exc:
            if exc.code not in (ErrorCode.NOT_FOUND, ErrorCode.NOT_MEMBER):
                raise  # other than gone already (a repeated step)


class AccountDeletions(Service):
    """Runs account deletions as jobs (one at a time per user) and resumes, at start and every
    ``sweep_s``, every deletion begun and not finished (a process killed in the middle)."""

    name = "account deletions"

    def __init__(self, *, service: AccountService, accounts: Accounts, sweep_s: float = 30.0) -> None:
        super().__init__()
        self._service = service
        self._accounts = accounts
        self._sweep_s = sweep_s
        self._running: dict[str, asyncio.Future[None]] = {}

    async def _start(self) -> None:
        self.start_worker(self._sweep(), name="account-deletion-sweep")

    def run(self, user: str) -> asyncio.Future[None]:
        """The deletion of user, started now unless it is running; the future ends with it."""
        running = self._running.get(user)
        if running is not None and not running.done():
            return running
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._running[user] = done
        self.start_job(self._erase(user, done), name=f"delete-account-{user}")
        return done

    async def _erase(self, user: str, done: asyncio.Future[None]) -> None:
        try:
            await self._service.erase(user)
        except Exception as exc:
            DELETIONS.labels(outcome="failed").inc()
            logger.warning("deleting account %s failed (resumed at the next sweep): %s", user, type(exc).__name__)
            if not done.done():
                done.set_exception(exc)
            done.exception()  # retrieved: nobody may be waiting
            return
        finally:
            if self._running.get(user) is done:
                del self._running[user]
        DELETIONS.labels(outcome="finished").inc()
        logger.info("account %s deleted", user)
        if not done.done():
            done.set_result(None)

    async def _sweep(self) -> None:
        while True:
            try:
                for user, started in await self._accounts.pending_deletions():
                    if await self._accounts.deletion_state(user) is None:  # pending, never recorded
                        await self._accounts.begin_deletion(user, at_ms=started)
                    self.run(user)
            except Exception as exc:  # the store is away: try again at the next sweep
                logger.warning("could not list pending account deletions: %s", type(exc).__name__)
            await asyncio.sleep(self._sweep_s)
