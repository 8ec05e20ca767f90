"""Admission: who may connect, and which session a CONNECT gets.

::

    connection ─▶ refusal(address): max_connections, connects/s per IP ──✗──▶ CONNACK 3
    CONNECT    ─▶ authenticate(the *incoming* session) ──✗──▶ CONNACK 5; nothing else changes
               ─▶ resolve(): clean → the new session (an older one of the device is dropped)
                             persistent → the device's own session, never another user's
               ─▶ fit(): keepalive allowance, bounded inbound queue

Authentication comes before any existing session is looked at or changed: stock amqtt takes
over (and wipes) the victim's session first. ``MqchatBroker`` applies the decisions.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

from amqtt.session import Session
from prometheus_client import Counter

from broker.handler import LimitedReader
from broker.limits import BrokerLimits
from broker.plugins import IDENTITY_KEY, SERVICE_KEY, is_service, session_identity
from broker.session import InboundQueue

logger = logging.getLogger(__name__)

CONNECTS_LIMITED = Counter("mqchat_broker_connects_limited_total", "Connections refused by a limit", ["limit"])

_RESUMED_FIELDS = (
    "will_flag",
    "will_message",
    "will_topic",
    "will_qos",
    "will_retain",
    "keep_alive",
    "username",
    "password",
    "remote_address",
    "remote_port",
    "clean_session",
)
"""What a resumed persistent session takes from the CONNECT that resumes it."""


class ConnectRateLimiter:
    """Token bucket per remote address (a burst of 5 × the rate)."""

    def __init__(self, *, rate: float) -> None:
        self._rate = rate
        self._burst = max(1.0, rate * 5)
        self._buckets: dict[str, tuple[float, float]] = {}

    def allow(self, key: str) -> bool:
        if self._rate <= 0:
            return True
        now = time.monotonic()
        tokens, last = self._buckets.get(key, (self._burst, now))
        tokens = min(self._burst, tokens + (now - last) * self._rate)
        if tokens < 1:
            self._buckets[key] = (tokens, now)
            return False
        self._buckets[key] = (tokens - 1, now)
        if len(self._buckets) > 100_000:  # forget idle addresses
            self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < 60}
        return True


@dataclass(frozen=True, slots=True)
class Resolution:
    """The session an authenticated CONNECT gets (None: refused) and the one it ends (if any)."""

    session: Session | None
    dropped: Session | None = None


class Admission:
    """Connection limits, authentication of the incoming session, session resolution."""

    def __init__(self, *, limits: BrokerLimits, sessions: dict[str, tuple[Session, Any]]) -> None:
        self.limits = limits
        self._sessions = sessions  # the broker's own client id → (session, handler)
        self._connect_rate = ConnectRateLimiter(rate=limits.connects_per_ip_per_s)
        self.open_connections = 0

    def refusal(self, address: str) -> str | None:
        """The limit a new connection from address is over (counted), or None."""
        limit = None
        if self.limits.max_connections and self.open_connections > self.limits.max_connections:
            limit = "max_connections"
        elif not self._connect_rate.allow(address):
            limit = "connect_rate"
        if limit is not None:
            CONNECTS_LIMITED.labels(limit=limit).inc()
            logger.warning("refused a connection from %s: %s limit", address, limit)
        return limit

    @staticmethod
    async def authenticate(auth_plugins: list[Any], session: Session) -> bool:
        """amqtt's rule (every plugin that answers says yes, and at least one answers), with the
        plugins awaited in turn instead of one task each plus a gather per connect."""
        answers = [await p.authenticate(session=session) for p in auth_plugins]
        decided = [a for a in answers if a is not None]
        return bool(decided) and all(decided)

    def resolve(self, incoming: Session) -> Resolution:
        """The session an authenticated CONNECT gets."""
        client_id = incoming.client_id
        existing = self._sessions.get(client_id) if client_id else None
        old = existing[0] if existing is not None else None
        if old is not None and _another_owner(old, incoming):
            logger.info("refused connect: client id %s belongs to another user's session", client_id)
            return Resolution(None)
        # A clean session's state ends with its connection, even when the next CONNECT arrives
        # before that connection's end was handled: it is never resumed ([MQTT-3.2.2-2]: no
        # session present).
        if incoming.clean_session or old is None or old.clean_session:
            incoming.parent = 0
            return Resolution(incoming, dropped=old)
        for name in _RESUMED_FIELDS:
            setattr(old, name, getattr(incoming, name))
        old.attributes[IDENTITY_KEY] = incoming.attributes.get(IDENTITY_KEY)
        old.attributes[SERVICE_KEY] = incoming.attributes.get(SERVICE_KEY)
        old.parent = 1
        return Resolution(old)

    def fit(self, session: Session, reader: Any) -> None:
        """The connection's keepalive allowance, and its bounded queue of received publishes
        (which the reader waits on)."""
        limits = self.limits
        ka = session.keep_alive if 0 < session.keep_alive <= limits.max_keepalive_s else limits.max_keepalive_s
        session.keep_alive = math.ceil(ka * limits.keepalive_factor)
        inbound = session.delivered_message_queue
        if not isinstance(inbound, InboundQueue):
            bounded = InboundQueue(limits.max_inbound_per_session)
            while not inbound.empty() and not bounded.full():
                bounded.put_nowait(inbound.get_nowait())
            session.delivered_message_queue = bounded
        if isinstance(reader, LimitedReader):
            reader.inbound = session.delivered_message_queue


def _another_owner(old: Session, incoming: Session) -> bool:
    """Does the existing session belong to someone else (the service vs a device, another user)?"""
    if is_service(old) != is_service(incoming):
        return True
    old_identity, new_identity = session_identity(old), session_identity(incoming)
    return old_identity is not None and new_identity is not None and old_identity.user != new_identity.user
