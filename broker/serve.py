"""Running a broker in a process: amqtt's configuration for it, the collector's tuning, and
``serve_broker``, which runs an ``MqchatBroker`` for the length of an ``async with`` block."""

from __future__ import annotations

import contextlib
import gc
import logging
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from broker.limits import BrokerLimits
from broker.membership import MembershipCache
from broker.server import InboundHook, MqchatBroker
from mqchat.errors import ConfigError
from mqchat.tokens import TokenVerifier
from storage.presence import PresenceRegistry
from storage.revocations import Revocations

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class Listeners:
    """Where the broker listens: MQTT over TCP, TLS, WebSocket and WebSocket over TLS; a port of
    None is not opened, 0 picks a free one."""

    host: str
    mqtt: int | None = 1883
    mqtts: int | None = None
    ws: int | None = None
    wss: int | None = None
    ws_path: str = "/mqtt"

    def open(self) -> dict[str, tuple[str, int, bool]]:
        """Each open listener: kind → (amqtt type, port, TLS). amqtt requires a listener named
        "default"; it is the plain MQTT one, or the first TLS one when plain text is off."""
        wanted = {"mqtt": ("tcp", self.mqtt, False), "mqtts": ("tcp", self.mqtts, True)}
        wanted |= {"ws": ("ws", self.ws, False), "wss": ("ws", self.wss, True)}
        return {kind: (kind_type, port, tls) for kind, (kind_type, port, tls) in wanted.items() if port is not None}

    def names(self) -> dict[str, str]:
        """kind → the amqtt listener's name."""
        kinds = list(self.open())
        return {kind: "default" if kind == kinds[0] else kind for kind in kinds}


def broker_config(
    *, listeners: Listeners, secret: str, max_connections: int = 0, verifier: TokenVerifier | None = None
) -> dict[str, Any]:
    """amqtt configuration for mqchat's broker; tokens are checked by verifier (one the caller
    runs), else with the HS256 secret alone."""
    names = listeners.names()
    if not names:
        raise ConfigError("the broker has no listener open (plain text off and no TLS configured)")
    return {
        "listeners": {
            names[kind]: {
                "type": kind_type,
                "bind": f"{listeners.host}:{port}",
                "max_connections": max_connections,
                "ssl": tls,
            }
            for kind, (kind_type, port, tls) in listeners.open().items()
        },
        "plugins": {
            "broker.plugins.JwtAuthPlugin": {"secret": secret, "verifier": verifier},
            "broker.plugins.TopicAclPlugin": {},
            "broker.plugins.MetricsPlugin": {},
        },
    }


def tune_gc() -> None:
    """A broker holds tens of thousands of long-lived objects per thousand connections; with
    CPython's default thresholds the cyclic collector walks them again and again, and connects
    slow down as the broker fills. Move what exists at start-up out of the collector's view and
    collect the young generation less often. Call it once in a process that runs a broker."""
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


@asynccontextmanager
async def serve_broker(
    *,
    listeners: Listeners,
    secret: str,
    verifier: TokenVerifier | None = None,
    tls: ssl.SSLContext | None = None,
    limits: BrokerLimits | None = None,
    inbound_hook: InboundHook | None = None,
    presence: PresenceRegistry | None = None,
    membership: MembershipCache | None = None,
    device_topics: bool = False,
    revalidate_s: float = 60.0,
    revocations: Revocations | None = None,
    token_grace_s: float = 30.0,
) -> AsyncIterator[MqchatBroker]:
    """Run the broker until the block exits. ``verifier`` checks device tokens (its caller enters
    it, so that a JWKS is refreshed while the broker runs); without one, the HS256 secret does."""
    broker = MqchatBroker(
        broker_config(listeners=listeners, secret=secret, verifier=verifier),
        tls=tls,
        ws_path=listeners.ws_path,
        limits=limits,
        inbound_hook=inbound_hook,
        presence=presence,
        membership=membership,
        device_topics=device_topics,
        revalidate_s=revalidate_s,
        revocations=revocations,
        token_grace_s=token_grace_s,
    )
    await broker.start()
    for kind, name in listeners.names().items():
        logger.info("MQTT broker listening on %s://%s:%d", kind, listeners.host, broker.listener_port(name) or 0)
    try:
        yield broker
    finally:
        with contextlib.suppress(Exception):
            await broker.shutdown()
