"""ACL/membership sync: subscriptions the ACL allowed end when membership says they no longer may.

::

    bridge ─$mqchat/membership {conv, kind, added, removed}─▶ changed()
        ├─▶ MembershipCache.changed (cached answers about conv and those users are dropped)
        ├─ channel: a removed member's c/{conv}/in subscriptions end at once
        └─ group:   job "acl-recheck": the presence subscriptions (p/…) of and to removed users
                    are asked of the ACL again; refused ones end
    worker "acl-revalidate": every revalidate_s, each p/… and c/… subscription is asked again
        (answers come from the cache, which expires), so one whose change never arrived ends too

``MqchatBroker`` is the ``SubscriptionAuthority``: it answers the ACL question and ends a
subscription.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Protocol

from amqtt.session import Session

from broker.membership import MembershipCache
from broker.plugins import session_identity
from broker.routing import SubscriptionIndex
from mqchat.protocol import channel_topic
from mqchat.service import Service

logger = logging.getLogger(__name__)

RECHECK_BATCH = 500


class SubscriptionAuthority(Protocol):
    async def may_subscribe(self, session: Session, topic_filter: str) -> bool:
        """What the ACL says now about session subscribing to topic_filter."""
        ...

    def end_subscription(self, topic_filter: str, session: Session) -> None: ...


class MembershipSync(Service):
    name = "acl-sync"

    def __init__(
        self,
        *,
        authority: SubscriptionAuthority,
        subscriptions: SubscriptionIndex,
        membership: MembershipCache | None,
        revalidate_s: float = 60.0,
    ) -> None:
        super().__init__()
        self._authority = authority
        self._subscriptions = subscriptions
        self.membership = membership
        self._revalidate_s = revalidate_s

    async def _start(self) -> None:
        if self.membership is not None and self._revalidate_s > 0:
            self.start_worker(self._revalidate_periodically(), name="acl-revalidate")

    def changed(self, payload: bytes) -> None:
        """A membership change from the bridge (``MEMBERSHIP_TOPIC``)."""
        try:
            change = json.loads(payload)
            conv, kind = str(change["conv"]), str(change["kind"])
            added = [str(u) for u in change.get("added", ())]
            removed = {str(u) for u in change.get("removed", ())}
        except (ValueError, KeyError, TypeError):
            logger.warning("ignored a malformed membership change")
            return
        if self.membership is not None:
            self.membership.changed(conv, [*added, *removed])
        if not removed:
            return
        if kind == "channel":
            topic = channel_topic(conv)
            for target, _ in list(self._subscriptions.get(topic, ())):
                identity = session_identity(target)
                if identity is not None and identity.user in removed:
                    self._authority.end_subscription(topic, target)
                    logger.info("ended %s's subscription to %s: no longer a member", identity.user, topic)
            return
        # A removal from a group may end the last conversation two users shared: their presence
        # subscriptions to each other are checked again.
        if not self.running:
            logger.debug("membership of %s changed while stopped: presence subscriptions not rechecked", conv)
            return
        pairs = [(s, f) for s, f in self.device_subscriptions("p/") if _user_of(s) in removed or f[2:] in removed]
        self.start_job(self._recheck_job(pairs), name="acl-recheck")

    def device_subscriptions(self, prefix: str) -> list[tuple[Session, str]]:
        """(session, filter) of every device subscription whose filter starts with prefix."""
        return [
            (target, topic_filter)
            for topic_filter in [f for f in self._subscriptions if f.startswith(prefix)]
            for target, _ in list(self._subscriptions.get(topic_filter, ()))
            if session_identity(target) is not None
        ]

    async def recheck(self, pairs: list[tuple[Session, str]]) -> int:
        """Ask the ACL again about each (session, filter); end the subscriptions it now refuses."""
        ended = 0
        for target, topic_filter in pairs:
            allowed = await self._authority.may_subscribe(target, topic_filter)
            if not allowed and any(s is target for s, _ in self._subscriptions.get(topic_filter, ())):
                self._authority.end_subscription(topic_filter, target)
                ended += 1
                logger.info("ended %s's subscription to %s: no longer allowed", _user_of(target), topic_filter)
        return ended

    async def _recheck_job(self, pairs: list[tuple[Session, str]]) -> None:
        await self.recheck(pairs)

    async def _revalidate_periodically(self) -> None:
        """A safety net under the membership changes (see the module docstring)."""
        while True:
            await asyncio.sleep(self._revalidate_s)
            try:
                pairs = self.device_subscriptions("p/") + self.device_subscriptions("c/")
                for start in range(0, len(pairs), RECHECK_BATCH):
                    await self.recheck(pairs[start : start + RECHECK_BATCH])
            except Exception:
                logger.exception("revalidating subscriptions failed; trying again later")


def _user_of(session: Session) -> str | None:
    identity = session_identity(session)
    return identity.user if identity is not None else None
