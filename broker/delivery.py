"""Delivery: one message to the sessions whose filters match, and the states the broker retains.

::

    deliver(topic, data, qos) ─▶ SubscriptionIndex.matching_filters ─▶ each (session, granted qos)
        ├─ offline persistent session, QoS 1 ─▶ its offline queue (bounded)
        ├─ a device that stopped reading ─▶ QoS 0 dropped past one bound, closed past the second
        ├─ QoS 0 ─▶ one PUBLISH encoded once for every recipient, written to the socket
        └─ QoS 1 ─▶ in the session's in-flight table until its PUBACK, then written

    retain(topic, payload) ─▶ kept for later subscribers, and delivered to the current ones

Synchronous and in the broker's process: PUBLISH bytes come from ``mqchat.mqtt_codec``, written
straight to the socket. No RECEIVE check per recipient: what a session may receive is decided by
the ACL when it subscribes.
"""

from __future__ import annotations

import logging
from typing import Any

from amqtt.broker import RetainedApplicationMessage
from amqtt.mqtt.constants import QOS_1, QOS_2
from amqtt.session import OutgoingApplicationMessage, Session
from prometheus_client import Counter

from broker.handler import MqchatProtocolHandler
from broker.limits import BrokerLimits
from broker.plugins import is_service
from broker.routing import SubscriptionIndex
from mqchat.mqtt_codec import encode_publish

logger = logging.getLogger(__name__)

DROPPED = Counter("mqchat_broker_messages_dropped_total", "Messages a session could not take", ["reason"])


class Delivery:
    """Routes messages through the broker's subscription index to its sessions' sockets."""

    def __init__(
        self,
        *,
        limits: BrokerLimits,
        subscriptions: SubscriptionIndex,
        sessions: dict[str, tuple[Session, Any]],
        retained: dict[str, RetainedApplicationMessage],
    ) -> None:
        self.limits = limits
        self._subscriptions = subscriptions
        self._sessions = sessions  # the broker's own client id → (session, handler)
        self._retained = retained  # the broker's own retained messages

    def retain(self, topic: str, payload: bytes) -> RetainedApplicationMessage:
        """A state the broker itself keeps on topic: retained for later subscribers, sent to current ones."""
        retained = RetainedApplicationMessage(None, topic, payload, QOS_1)
        self._retained[topic] = retained
        self.deliver(topic, payload, None)
        return retained

    def forget(self, topic: str) -> None:
        """No longer keep a state on topic (later subscribers get nothing)."""
        self._retained.pop(topic, None)

    def retained_on(self, topic: str) -> RetainedApplicationMessage | None:
        """The message retained on topic, if any."""
        return self._retained.get(topic)

    def deliver(self, topic: str, data: bytes | bytearray, published_qos: int | None) -> None:
        """Deliver one message to the sessions whose filters match, found through the index.

        Each PUBLISH is encoded once per QoS and written straight to the socket; a QoS 1 message
        stays in the session's in-flight table until its PUBACK (and is resent with DUP on
        reconnect)."""
        raw_topic = topic.encode()
        payload = bytes(data)
        qos0: bytes | None = None
        limits = self.limits
        for topic_filter in list(self._subscriptions.matching_filters(topic)):
            for target, sub_qos in list(self._subscriptions.get(topic_filter, ())):
                # [MQTT-3.8.4-6] at min(the publish's QoS, the subscription's granted QoS)
                qos = sub_qos if published_qos is None else min(published_qos, sub_qos)
                if target.transitions.state != "connected":
                    self.queue_offline(target, topic, payload, qos)
                    continue
                handler = self._handler(target)
                if not isinstance(handler, MqchatProtocolHandler):
                    continue
                service = is_service(target)
                if not service and self._stalled(target, handler, qos):
                    continue
                if qos == 0:
                    qos0 = qos0 or encode_publish(raw_topic, payload, 0, 0)
                    handler.write_publish(qos0)
                    continue
                limit = limits.max_queued_service if service else limits.max_queued_per_session
                if len(target.inflight_out) >= limit:
                    DROPPED.labels(reason="slow_consumer").inc()
                    continue
                packet_id = target.next_packet_id
                message = OutgoingApplicationMessage(packet_id, topic, QOS_1, payload, False)
                message.publish_packet = message.build_publish_packet()  # marks it sent: a resend sets DUP
                target.inflight_out[packet_id] = message
                handler.write_publish(encode_publish(raw_topic, payload, QOS_1, packet_id))

    def _handler(self, session: Session) -> Any:
        client_id = session.client_id
        return self._sessions.get(client_id, (None, None))[1] if client_id else None

    def _stalled(self, target: Session, handler: MqchatProtocolHandler, qos: int) -> bool:
        """Is this device's socket too far behind to take the message (closed past the second bound)?"""
        buffered = handler.buffered_bytes()
        if buffered > self.limits.max_buffered_bytes:
            DROPPED.labels(reason="slow_consumer_closed").inc()
            logger.info("closing %s: it stopped reading (%d bytes unsent)", target.client_id, buffered)
            handler.abort()
            return True
        if qos == 0 and buffered > self.limits.max_buffered_qos0:
            DROPPED.labels(reason="slow_consumer_qos0").inc()
            return True
        return False

    def queue_offline(self, target: Session, topic: str, payload: bytes, qos: int) -> None:
        """Keep a QoS 1/2 message for a persistent session that is not connected (bounded)."""
        if target.clean_session or qos not in (QOS_1, QOS_2) or target.is_anonymous:
            return
        if target.retained_messages.qsize() >= self.limits.max_queued_per_session:
            DROPPED.labels(reason="offline_queue_full").inc()
            return
        target.retained_messages.put_nowait(RetainedApplicationMessage(None, topic, payload, qos))
