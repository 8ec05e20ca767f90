"""The topic table of wire protocol v1: who may publish and subscribe where. One table for every
broker that devices reach: mqchat's own (``broker.plugins.TopicAclPlugin``) and an external one
that asks mqchat over HTTP (EMQX's authorisation hook, ``bridge.http.hooks``).

A device publishes only to ``u/{self}/{device}/out`` and subscribes only to ``u/{self}/in``,
``u/{self}/{device}/in``, ``p/{user}`` when it may see that user's presence, and ``c/{conv}/in``
when it is a member of channel conv (never a wildcard). The last two need the store: the table
says which question to ask it. The bridge service subscribes to out topics, presence and device
reports, and publishes replies and events.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mqchat.ids import is_valid_id, parse_conv
from mqchat.internal_topics import DEVICES_TOPIC_FILTER, LOGOUT_TOPIC, MEMBERSHIP_TOPIC
from mqchat.protocol import OUT_TOPIC_FILTER, PRESENCE_TOPIC_FILTER

__all__ = ["SHARED_REQUESTS", "Ask", "device_may", "service_may_publish", "service_may_subscribe"]

SHARED_REQUESTS = f"$share/mqchat-bridge/{OUT_TOPIC_FILTER}"
"""Every device's requests, as the bridge workers' shared subscription (one worker takes each)."""


@dataclass(frozen=True, slots=True)
class Ask:
    """Allowed if the store says so: ``presence`` (may the device's user see ``subject``'s
    presence?) or ``member`` (is the device's user a member of conversation ``subject``?)."""

    question: Literal["presence", "member"]
    subject: str


def device_may(action: Literal["publish", "subscribe"], user: str, device: str, topic: str) -> bool | Ask:
    """Whether device of user may publish to or subscribe to topic, or what to ask the store."""
    if action == "publish":
        return topic == f"u/{user}/{device}/out"
    if topic in (f"u/{user}/in", f"u/{user}/{device}/in"):
        return True
    parts = topic.split("/")
    if len(parts) == 2 and parts[0] == "p" and is_valid_id(parts[1]):
        return True if parts[1] == user else Ask("presence", parts[1])
    if len(parts) == 3 and parts[0] == "c" and parts[2] == "in":
        conv = parse_conv(parts[1])
        if conv is not None and conv.kind == "group":
            return Ask("member", conv.id)
    return False


def service_may_publish(topic: str) -> bool:
    if topic in (MEMBERSHIP_TOPIC, LOGOUT_TOPIC):
        return True
    parts = topic.split("/")
    if parts[0] == "u":
        return (len(parts) == 3 and parts[2] == "in") or (len(parts) == 4 and parts[3] == "in")
    if parts[0] == "p":
        return len(parts) == 2
    if parts[0] == "c":
        return len(parts) == 3 and parts[2] == "in"
    return False


def service_may_subscribe(topic: str) -> bool:
    """The bridge's subscriptions: every out topic (also as a worker's shared subscription),
    presence, device reports."""
    return topic in (OUT_TOPIC_FILTER, SHARED_REQUESTS, PRESENCE_TOPIC_FILTER, DEVICES_TOPIC_FILTER)
