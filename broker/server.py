"""The broker process's core: ``MqchatBroker``, amqtt 0.12.1 made fit for mobile chat.

::

    TCP accept ─▶ limits (connections, connects/s per IP) ─▶ read CONNECT (timeout, size limit)
        ─▶ authenticate the *incoming* session ──✗──▶ CONNACK refused; nothing else changes
        ─▶ resolve the session (clean: new; persistent: the device's own, never another user's)
        ─▶ take over an older connection of the same device ─▶ CONNACK ─▶ queued messages
        ─▶ retained messages for this session's own subscriptions only
        ─▶ message loop (keepalive enforced) ─▶ on exit: route every PUBACKed publish still queued
           a device's request on its own out topic ─▶ inbound hook (the in-broker bridge adapter)

    routing: SubscriptionIndex (exact dict + wildcard trie) instead of a scan of every filter;
             per-session bounded queues (slow consumers lose messages, never the broker's memory)

amqtt stays a pinned dependency; these are overrides of its methods, written against 0.12.1
(``check_amqtt_version`` refuses to start on another version).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import itertools
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import amqtt
from amqtt.adapters import StreamWriterAdapter
from amqtt.broker import Broker, RetainedApplicationMessage
from amqtt.contexts import Action
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.events import BrokerEvents
from amqtt.mqtt.connack import SERVER_UNAVAILABLE, ConnackPacket
from amqtt.mqtt.constants import QOS_1, QOS_2
from amqtt.session import OutgoingApplicationMessage, Session
from prometheus_client import Counter

from broker.handler import InboundQueue, LimitedReader, MqchatProtocolHandler, publish_bytes
from broker.membership import MembershipCache
from broker.plugins import IDENTITY_KEY, SERVICE_KEY, is_service, session_identity
from broker.routing import SubscriptionIndex, is_wildcard
from mqchat.protocol import DEVICES_TOPIC_PREFIX, MEMBERSHIP_TOPIC, channel_topic, encode, out_topic, presence_topic
from mqchat.tasks import cancel_and_wait, ended
from storage.presence import Presence, PresenceRegistry

logger = logging.getLogger(__name__)

AMQTT_VERSION = "0.12.1"
"""The amqtt release whose internals ``MqchatBroker`` overrides."""

DROPPED = Counter("mqchat_broker_messages_dropped_total", "Messages a session could not take", ["reason"])
CONNECTS_LIMITED = Counter("mqchat_broker_connects_limited_total", "Connections refused by a limit", ["limit"])


def check_amqtt_version(version: str = amqtt.__version__) -> None:
    if version != AMQTT_VERSION:
        raise RuntimeError(
            f"mqchat's broker overrides amqtt {AMQTT_VERSION} internals but amqtt {version} is installed; "
            f"install amqtt=={AMQTT_VERSION}"
        )


@dataclass(frozen=True, slots=True)
class BrokerLimits:
    max_packet_bytes: int = 256 * 1024
    max_queued_per_session: int = 1000  # messages waiting for one device session (in flight or offline)
    max_queued_service: int = 200_000  # the same for the bridge's session, which carries everyone's requests
    max_connections: int = 0  # 0: unlimited
    connects_per_ip_per_s: float = 0.0  # 0: unlimited; a burst of 5 × the rate is allowed
    connect_timeout_s: float = 10.0  # a new connection must send CONNECT within this
    max_inbound_per_session: int = 256  # received publishes waiting to be routed (then TCP pushes back)
    # A device that stops reading: its socket's unsent bytes are bounded. Past the first bound QoS 0
    # messages (typing, presence) are dropped: they are momentary, and losing one costs nothing.
    # Past the second the connection is closed: QoS 1 messages cannot be dropped without a gap,
    # and a device that reconnects catches up over HTTP, which a stalled one never would.
    max_buffered_qos0: int = 256 * 1024
    max_buffered_bytes: int = 4 * 1024 * 1024
    keepalive_factor: float = 1.5
    max_keepalive_s: int = 1200  # clients asking for none or more get this


class _RateLimiter:
    """Token bucket per remote address."""

    def __init__(self, rate: float) -> None:
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


class ClosingStreamWriter(StreamWriterAdapter):
    """amqtt's stream writer drains before it closes; when the peer already hung up the drain
    raises and the socket is never closed (a file descriptor leaked per such disconnect). This
    one closes the socket whatever the drain does."""

    async def close(self) -> None:
        if self.is_closed:
            return
        try:
            await super().close()
        except (ConnectionError, OSError):
            self._writer.close()


InboundHook = Callable[[str, str, bytes], Awaitable[None]]
"""Takes (user, device, payload) of a device's request on its own ``u/{user}/{device}/out``."""


class MqchatBroker(Broker):
    """amqtt's broker with mqchat's fixes and policies (see the module docstring).

    With an inbound hook set, a device's publish on its own out topic goes to the hook (awaited:
    a slow hook slows that device down) instead of being routed to subscribers.

    With a presence registry, every device connection and its end (graceful, keepalive
    timeout, cut) are reported to it, in order, off the connect path; every transition the
    registry announces (from this broker or, with a shared registry, any other) becomes the
    retained ``p/{user}``. With a membership cache, the ACL can answer presence and channel
    subscriptions; the bridge's membership changes (``MEMBERSHIP_TOPIC``) invalidate it and
    end a removed member's channel subscription.
    """

    def __init__(
        self,
        config: Any = None,
        *,
        limits: BrokerLimits | None = None,
        inbound_hook: InboundHook | None = None,
        presence: PresenceRegistry | None = None,
        membership: MembershipCache | None = None,
        device_topics: bool = False,
        revalidate_s: float = 60.0,
        **kwargs: Any,
    ) -> None:
        check_amqtt_version()
        super().__init__(config, **kwargs)
        self.limits = limits or BrokerLimits()
        self.inbound_hook = inbound_hook
        self._subscriptions: SubscriptionIndex = SubscriptionIndex()
        self._connect_rate = _RateLimiter(self.limits.connects_per_ip_per_s)
        self._open_connections = 0
        self.presence = presence
        self.membership = membership
        self._connections = itertools.count(1)
        self._presence_events: asyncio.Queue[tuple[bool, str, str, str]] = asyncio.Queue(maxsize=200_000)
        # device_topics: keep the retained DEVICES_TOPIC of each user (which of their devices are
        # connected, as the registry says), for a bridge in another process without a shared registry.
        self._device_topics = device_topics
        self._revalidate_s = revalidate_s
        self._workers: list[asyncio.Task[None]] = []
        self._rechecks: set[asyncio.Task[int]] = set()
        if presence is not None:
            presence.listen(self._on_presence)

    async def start(self) -> None:
        await super().start()
        if self.presence is not None:
            self._workers.append(asyncio.create_task(self._report_presence(), name="presence-reports"))
        if self.membership is not None and self._revalidate_s > 0:
            self._workers.append(asyncio.create_task(self._revalidate_periodically(), name="acl-revalidate"))

    async def shutdown(self) -> None:
        try:
            await super().shutdown()
        finally:
            await cancel_and_wait([*self._workers, *self._rechecks], what="broker")

    def dead_workers(self) -> list[str]:
        return ended(self._workers)

    @property
    def bound_port(self) -> int:
        """The TCP port of the default listener (useful with port 0)."""
        server = self._servers["default"]
        port: int = server.instance.sockets[0].getsockname()[1]
        return port

    # --- connect ---------------------------------------------------------------------------------

    async def stream_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
    ) -> None:
        await self._client_connected(
            listener_name,
            LimitedReader(reader, max_packet_bytes=self.limits.max_packet_bytes),
            ClosingStreamWriter(writer),
        )

    async def _client_connected(self, listener_name: str, reader: Any, writer: Any) -> None:
        server = self._servers.get(listener_name)
        if server is None:
            await writer.close()
            return
        peer = writer.get_peer_info()
        if peer is None:
            await writer.close()
            return
        self._open_connections += 1
        await server.acquire_connection()
        try:
            await self._serve_connection(listener_name, reader, writer, peer[0])
        except (AMQTTError, MQTTError, NoDataError, ConnectionError, OSError) as exc:
            logger.debug("connection from %s ended: %s", peer[0], exc)
        finally:
            server.release_connection()
            self._open_connections -= 1

    async def _serve_connection(self, listener_name: str, reader: Any, writer: Any, address: str) -> None:
        try:
            async with asyncio.timeout(self.limits.connect_timeout_s):
                handler, incoming = await MqchatProtocolHandler.init_from_connect(
                    reader, writer, self.plugins_manager, loop=self._loop
                )
        except Exception as exc:
            logger.debug("no valid CONNECT from %s: %s", address, exc)
            await writer.close()
            return

        limit = self._connection_limit(address)
        if limit is not None:
            CONNECTS_LIMITED.labels(limit=limit).inc()
            logger.warning("refused a connection from %s: %s limit", address, limit)
            await self._refuse(handler, incoming, reader, writer, code=SERVER_UNAVAILABLE)
            return

        # Authenticate the incoming session before anything existing is looked at or changed.
        authenticated = await self._authenticate(incoming, self.listeners_config[listener_name])
        previous = self._sessions.get(incoming.client_id) if incoming.client_id else None
        session = self._resolve_session(incoming) if authenticated else None
        if session is None:
            await self._refuse(handler, incoming, reader, writer)
            return

        client_id = session.client_id
        assert client_id is not None
        if previous is not None and previous[0].transitions.is_connected():
            logger.info("client %s connected again; closing its previous connection", client_id)
            await previous[1].handle_connection_closed()
            await previous[1].stop()
        for _ in range(100):  # the old connection finishes its disconnect
            try:
                session.transitions.connect()
                break
            except Exception:
                await asyncio.sleep(0.01)
        else:
            await self._refuse(handler, session, reader, writer, code=SERVER_UNAVAILABLE)
            return

        ka = (
            session.keep_alive if 0 < session.keep_alive <= self.limits.max_keepalive_s else self.limits.max_keepalive_s
        )
        session.keep_alive = math.ceil(ka * self.limits.keepalive_factor)

        inbound = session.delivered_message_queue
        if not isinstance(inbound, InboundQueue):
            bounded = InboundQueue(self.limits.max_inbound_per_session)
            while not inbound.empty() and not bounded.full():
                bounded.put_nowait(inbound.get_nowait())
            session.delivered_message_queue = bounded
        if isinstance(reader, LimitedReader):
            reader.inbound = session.delivered_message_queue

        handler.attach(session, reader, writer)
        identity = session_identity(session)
        if self.inbound_hook is not None and identity is not None:
            handler.direct_inbound = (
                out_topic(identity.user, identity.device),
                functools.partial(self.inbound_hook, identity.user, identity.device),
            )
        self._sessions[client_id] = (session, handler)
        await handler.mqtt_connack_authorize(True)
        await self.plugins_manager.fire_event(
            BrokerEvents.CLIENT_CONNECTED, client_id=client_id, client_session=session
        )
        await handler.start()
        connection = f"{next(self._connections)}"
        if identity is not None and self.presence is not None:
            self._report((True, identity.user, identity.device, connection))
        try:
            await self._publish_session_retained_messages(session)
            for topic_filter in self._subscriptions.filters_of(client_id):  # only its own subscriptions
                subscribers = self._subscriptions.get(topic_filter, [])
                qos = next((q for s, q in subscribers if s.client_id == client_id), 0)
                await self._publish_retained_messages_for_subscription((topic_filter, qos), session)
            await self._client_message_loop(session, handler)
            if session.transitions.is_connected():
                # amqtt's loop stops on a forbidden PUBLISH (a wildcard or a $ topic) but leaves the
                # connection open and the session connected: end both, as an abnormal disconnect.
                ended: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
                ended.set_result(None)
                await self._handle_disconnect(session, handler, ended)
        finally:
            if identity is not None and self.presence is not None:
                self._report((False, identity.user, identity.device, connection))

    async def _authenticate(self, session: Session, _listener: Any) -> bool:
        """amqtt's rule (every plugin that answers says yes, and at least one answers), with the
        plugins awaited in turn instead of one task each plus a gather per connect."""
        answers = [await p.authenticate(session=session) for p in self.plugins_manager._auth_plugins]
        decided = [a for a in answers if a is not None]
        return bool(decided) and all(decided)

    async def _topic_filtering(self, session: Session, topic: str, action: Any) -> bool:
        """amqtt's rule (every topic plugin says yes; None is no), awaited in turn."""
        if not self.plugins_manager.is_topic_filtering_enabled():
            return True
        for plugin in self.plugins_manager._topic_plugins:
            if not await plugin.topic_filtering(session=session, topic=topic, action=action):
                return False
        return True

    def _connection_limit(self, address: str) -> str | None:
        if self.limits.max_connections and self._open_connections > self.limits.max_connections:
            return "max_connections"
        if not self._connect_rate.allow(address):
            return "connect_rate"
        return None

    async def _refuse(
        self, handler: Any, session: Session, reader: Any, writer: Any, *, code: int | None = None
    ) -> None:
        """CONNACK refused (not authorised, or ``code``), then close: no existing state changes."""
        handler.attach(session, reader, writer)
        try:
            if code is None:
                await handler.mqtt_connack_authorize(False)
            else:
                await handler._send_packet(ConnackPacket.build(0, code))
        finally:
            await writer.close()

    def _resolve_session(self, incoming: Session) -> Session | None:
        """The session an authenticated CONNECT gets; None to refuse it."""
        client_id = incoming.client_id
        existing = self._sessions.get(client_id) if client_id else None
        if existing is not None:
            old = existing[0]
            if is_service(old) != is_service(incoming) or (
                session_identity(old) is not None
                and session_identity(incoming) is not None
                and session_identity(old).user != session_identity(incoming).user  # type: ignore[union-attr]
            ):
                logger.info("refused connect: client id %s belongs to another user's session", client_id)
                return None
        # A clean session's state ends with its connection, even when the next CONNECT arrives
        # before that connection's end was handled: it is never resumed ([MQTT-3.2.2-2]: no
        # session present).
        if incoming.clean_session or existing is None or existing[0].clean_session:
            if existing is not None:
                self._drop_session(existing[0])
            incoming.parent = 0
            return incoming
        session = existing[0]
        for field in (
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
        ):
            setattr(session, field, getattr(incoming, field))
        session.attributes[IDENTITY_KEY] = incoming.attributes.get(IDENTITY_KEY)
        session.attributes[SERVICE_KEY] = incoming.attributes.get(SERVICE_KEY)
        session.parent = 1
        return session

    def _drop_session(self, session: Session) -> None:
        client_id = session.client_id
        if client_id is None:
            return
        self._sessions.pop(client_id, None)
        self._remove_all_subscriptions(session)
        session.clear_queues()

    async def _handle_disconnect(self, client_session: Session, handler: Any, disconnect_waiter: Any) -> None:
        # Publishes already PUBACKed but not yet routed when the connection ended: route them
        # before the session's queues are cleared.
        queue = client_session.delivered_message_queue
        while not queue.empty():
            message = queue.get_nowait()
            done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            done.set_result(message)
            await self._handle_message_delivery(client_session, handler, done)
        await super()._handle_disconnect(client_session, handler, disconnect_waiter)
        current = self._sessions.get(client_session.client_id) if client_session.client_id else None
        if client_session.clean_session and current is not None and current[0] is client_session:
            self._drop_session(client_session)  # a clean session ends with its connection

    # --- presence --------------------------------------------------------------------------------

    def _report(self, event: tuple[bool, str, str, str]) -> None:
        try:
            self._presence_events.put_nowait(event)
        except asyncio.QueueFull:
            DROPPED.labels(reason="presence_report").inc()

    async def _report_presence(self) -> None:
        """Connects and disconnects go to the registry one by one, in the order they happened
        (a device's connect is never overtaken by its own earlier disconnect); a registry that
        fails is retried a few times before the report is given up (logged, counted)."""
        assert self.presence is not None
        while True:
            connected, user, device, connection = await self._presence_events.get()
            for attempt in range(4):
                try:
                    if connected:
                        await self.presence.connected(user, device, connection)
                    else:
                        await self.presence.disconnected(user, device, connection)
                    break
                except Exception as exc:
                    if attempt == 3:
                        DROPPED.labels(reason="presence_report").inc()
                        logger.error("presence registry unavailable; %s/%s not reported: %s", user, device, exc)
                    else:
                        await asyncio.sleep(0.1 * 4**attempt)
            if self._device_topics:
                try:
                    devices = await self.presence.devices(user)
                except Exception as exc:  # one report fails alone; the next change publishes the list
                    logger.error("presence registry unavailable; devices of %s not published: %s", user, exc)
                    continue
                self._retain(f"{DEVICES_TOPIC_PREFIX}{user}", encode({"devices": sorted(devices)}))

    def _on_presence(self, presence: Presence) -> None:
        self._retain(presence_topic(presence.user), encode(presence.envelope()))

    def _retain(self, topic: str, payload: bytes) -> RetainedApplicationMessage:
        """A state the broker itself keeps on topic: retained for later subscribers, sent to current ones."""
        retained = RetainedApplicationMessage(None, topic, payload, QOS_1)
        self._retained_messages[topic] = retained
        self._deliver(topic, payload, None)
        return retained

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        """amqtt walks every retained message for every SUBSCRIBE (one per user's presence);
        an exact filter is one lookup. A presence topic without a retained state yet (this
        broker started after the user's last change) gets it from the registry."""
        topic_filter, qos = subscription
        if is_wildcard(topic_filter):
            await super()._publish_retained_messages_for_subscription(subscription, session)
            return
        retained = self._retained_messages.get(topic_filter)
        if retained is None and self.presence is not None and topic_filter.startswith("p/"):
            user = topic_filter[2:]
            found = (await self.presence.lookup([user]))[user]
            retained = self._retained_messages.get(topic_filter)
            if retained is None:  # no transition arrived meanwhile: what the registry said is current
                self._retain(topic_filter, encode(found.envelope()))
                return  # sent to every subscriber of the topic, this one included
        handler = self._get_handler(session)
        if retained is not None and retained.data and handler is not None:
            await handler.mqtt_publish(retained.topic, retained.data, min(qos, retained.qos or qos), retain=True)

    # --- membership changes --------------------------------------------------------------------

    def _membership_changed(self, payload: bytes) -> None:
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
                    self._del_subscription(topic, target)
                    logger.info("ended %s's subscription to %s: no longer a member", identity.user, topic)
            return
        # A removal from a group may end the last conversation two users shared: their presence
        # subscriptions to each other are checked again.
        pairs = [(s, f) for s, f in self._acl_subscriptions("p/") if _user_of(s) in removed or f[2:] in removed]
        task = asyncio.get_running_loop().create_task(self._recheck(pairs))
        self._rechecks.add(task)
        task.add_done_callback(self._rechecks.discard)

    def _acl_subscriptions(self, prefix: str) -> list[tuple[Session, str]]:
        """(session, filter) of every device subscription whose filter starts with prefix."""
        return [
            (target, topic_filter)
            for topic_filter in [f for f in self._subscriptions if f.startswith(prefix)]
            for target, _ in list(self._subscriptions.get(topic_filter, ()))
            if session_identity(target) is not None
        ]

    async def _recheck(self, pairs: list[tuple[Session, str]]) -> int:
        """Ask the ACL again about each (session, filter); end the subscriptions it now refuses."""
        ended = 0
        for target, topic_filter in pairs:
            allowed = await self._topic_filtering(target, topic_filter, Action.SUBSCRIBE)
            if not allowed and any(s is target for s, _ in self._subscriptions.get(topic_filter, ())):
                self._del_subscription(topic_filter, target)
                ended += 1
                logger.info("ended %s's subscription to %s: no longer allowed", _user_of(target), topic_filter)
        return ended

    async def _revalidate_periodically(self) -> None:
        """A safety net under the membership changes: every revalidate_s, each presence and
        channel subscription is checked again (answers come from the cache, which expires), so
        one whose change never arrived (say, the bridge could not reach the broker) ends too."""
        while True:
            await asyncio.sleep(self._revalidate_s)
            try:
                pairs = self._acl_subscriptions("p/") + self._acl_subscriptions("c/")
                for start in range(0, len(pairs), 500):
                    await self._recheck(pairs[start : start + 500])
            except Exception:
                logger.exception("revalidating subscriptions failed; trying again later")

    # --- messages ----------------------------------------------------------------------------

    async def _handle_message_delivery(self, client_session: Session, handler: Any, wait_deliver: Any) -> bool:
        hook = self.inbound_hook
        message = wait_deliver.result()
        if message is not None and message.topic == MEMBERSHIP_TOPIC and is_service(client_session):
            self._membership_changed(bytes(message.data))
            return True
        identity = session_identity(client_session)
        if (
            hook is not None
            and message is not None
            and identity is not None
            and message.topic == f"u/{identity.user}/{identity.device}/out"
        ):
            await hook(identity.user, identity.device, bytes(message.data))
            return True
        result: bool = await super()._handle_message_delivery(client_session, handler, wait_deliver)
        return result

    async def _run_broadcast(self, running_tasks: Any) -> None:
        broadcast = await self._broadcast_queue.get()
        self._deliver(broadcast["topic"], broadcast["data"], broadcast.get("qos"))

    async def internal_message_broadcast(self, topic: str, data: bytes, qos: int | None = None) -> None:
        """Publishes made inside the broker (the in-broker adapter's replies) are routed at once."""
        if topic == MEMBERSHIP_TOPIC:
            self._membership_changed(bytes(data))
            return
        self._deliver(topic, data, qos)

    def _deliver(self, topic: str, data: bytes | bytearray, published_qos: int | None) -> None:
        """Deliver one message to the sessions whose filters match, found through the index.

        Synchronous: each PUBLISH is encoded once per QoS and written straight to the socket; a
        QoS 1 message stays in the session's in-flight table until its PUBACK (and is resent
        with DUP on reconnect). No RECEIVE check per recipient: what a session may receive is
        decided by the ACL when it subscribes."""
        raw_topic = topic.encode()
        payload = bytes(data)
        qos0: bytes | None = None
        for topic_filter in list(self._subscriptions.matching_filters(topic)):
            for target, sub_qos in list(self._subscriptions.get(topic_filter, ())):
                # [MQTT-3.8.4-6] at min(the publish's QoS, the subscription's granted QoS)
                qos = sub_qos if published_qos is None else min(published_qos, sub_qos)
                if target.transitions.state != "connected":
                    self._queue_offline(target, topic, payload, qos)
                    continue
                handler = self._get_handler(target)
                if not isinstance(handler, MqchatProtocolHandler):
                    continue
                if not is_service(target):
                    buffered = handler.buffered_bytes()
                    if buffered > self.limits.max_buffered_bytes:
                        DROPPED.labels(reason="slow_consumer_closed").inc()
                        logger.info("closing %s: it stopped reading (%d bytes unsent)", target.client_id, buffered)
                        handler.abort()
                        continue
                    if qos == 0 and buffered > self.limits.max_buffered_qos0:
                        DROPPED.labels(reason="slow_consumer_qos0").inc()
                        continue
                if qos == 0:
                    qos0 = qos0 or publish_bytes(raw_topic, payload, 0, 0)
                    handler.write_publish(qos0)
                    continue
                limit = self.limits.max_queued_service if is_service(target) else self.limits.max_queued_per_session
                if len(target.inflight_out) >= limit:
                    DROPPED.labels(reason="slow_consumer").inc()
                    continue
                packet_id = target.next_packet_id
                message = OutgoingApplicationMessage(packet_id, topic, QOS_1, payload, False)
                message.publish_packet = message.build_publish_packet()  # marks it sent: a resend sets DUP
                target.inflight_out[packet_id] = message
                handler.write_publish(publish_bytes(raw_topic, payload, QOS_1, packet_id))

    def _queue_offline(self, target: Session, topic: str, payload: bytes, qos: int) -> None:
        if target.clean_session or qos not in (QOS_1, QOS_2) or target.is_anonymous:
            return
        if target.retained_messages.qsize() >= self.limits.max_queued_per_session:
            DROPPED.labels(reason="offline_queue_full").inc()
            return
        target.retained_messages.put_nowait(RetainedApplicationMessage(None, topic, payload, qos))

    async def retain_message(
        self,
        source_session: Session | None,
        topic_name: str | None,
        data: bytes | bytearray | None,
        qos: int | None = None,
    ) -> None:
        """Only the service (the bridge) may leave retained messages: a device's retained
        publish is routed but not retained, so it can never be replayed to other connections."""
        if source_session is not None and not is_service(source_session):
            logger.info("ignored a retained publish from device %s", source_session.client_id)
            return
        await super().retain_message(source_session, topic_name, data, qos)

    # --- subscriptions: keep the per-client index ------------------------------------------

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        topic_filter, requested = subscription
        if not 0 <= requested <= 2:
            return 0x80  # [MQTT-3.8.3-4] no such QoS: refused
        # Deliveries go out at QoS 0 or 1 (QoS 2 is not offered), so grant at most 1: a SUBACK
        # never promises what is not delivered.
        subscription = (topic_filter, min(requested, QOS_1))
        version = self.membership.version if self.membership is not None else 0
        result: int = await super().add_subscription(subscription, session)
        if result != 0x80 and session.client_id is not None:
            self._subscriptions.remember(session.client_id, subscription[0])
            if self.membership is not None and self.membership.version != version:
                # Membership changed while the ACL was deciding: decide again with what is true now.
                await self._recheck([(session, subscription[0])])
        return result

    def _del_subscription(self, a_filter: str, session: Session) -> int:
        deleted: int = super()._del_subscription(a_filter, session)
        if session.client_id is not None:
            self._subscriptions.forget(session.client_id, a_filter)
            if a_filter in self._subscriptions and not self._subscriptions[a_filter]:
                del self._subscriptions[a_filter]
        return deleted

    async def _del_all_subscriptions(self, session: Session) -> None:
        self._remove_all_subscriptions(session)

    def _remove_all_subscriptions(self, session: Session) -> None:
        if session.client_id is None:
            return
        for topic_filter in self._subscriptions.filters_of(session.client_id):
            self._del_subscription(topic_filter, session)


def _user_of(session: Session) -> str | None:
    identity = session_identity(session)
    return identity.user if identity is not None else None


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
