"""Running a broker in a process: amqtt's configuration for it, the collector's tuning, and
``serve_broker``, which runs an ``MqchatBroker`` for the length of an ``async with`` block."""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from broker.limits import BrokerLimits
from broker.membership import MembershipCache
from broker.server import InboundHook, MqchatBroker
from storage.presence import PresenceRegistry

logger = logging.getLogger(__name__)


def broker_config(*, host: str, port: int, secret: str, max_connections: int = 0) -> dict[str, Any]:
    """amqtt configuration for mqchat's broker."""
    return {
        "listeners": {
            "default": {"type": "tcp", "bind": f"{host}:{port}", "max_connections": max_connections},
        },
        "plugins": {
            "broker.plugins.JwtAuthPlugin": {"secret": secret},
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
    host: str,
    port: int,
    secret: str,
    limits: BrokerLimits | None = None,
    inbound_hook: InboundHook | None = None,
    presence: PresenceRegistry | None = None,
    membership: MembershipCache | None = None,
    device_topics: bool = False,
    revalidate_s: float = 60.0,
) -> AsyncIterator[MqchatBroker]:
    """Run the broker until the block exits."""
    broker = MqchatBroker(
        broker_config(host=host, port=port, secret=secret),
        limits=limits,
        inbound_hook=inbound_hook,
        presence=presence,
        membership=membership,
        device_topics=device_topics,
        revalidate_s=revalidate_s,
    )
    await broker.start()
    logger.info("MQTT broker listening on %s:%d", host, broker.bound_port)
    try:
        yield broker
    finally:
        with contextlib.suppress(Exception):
            await broker.shutdown()
