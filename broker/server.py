"""``MqchatBroker``: amqtt 0.12.1's broker, adapted; the work is done by named parts.

::

    TCP accept ─▶ read CONNECT (broker.connect: timeout, size limit, protocol level)
        ─▶ Admission: limits ─▶ authenticate the *incoming* session ─▶ resolve the session
        ─▶ take over an older connection of the same device ─▶ CONNACK ─▶ queued messages
        ─▶ retained messages for this session's own subscriptions only (p/{user} with none
           retained yet: PresenceReports asks the registry)
        ─▶ message loop (MqchatProtocolHandler: keepalive enforced, codec-framed reader)
           a device's request on its own out topic ─▶ inbound hook (the in-broker bridge adapter)
           $mqchat/membership from the service ─▶ MembershipSync
           anything else ─▶ Delivery (SubscriptionIndex, bounded per-session queues)
        ─▶ on exit: route every PUBACKed publish still queued; PresenceReports hears of the end

    PresenceReports  (a Service): connects/disconnects → registry → retained p/{user}
    MembershipSync   (a Service): membership changes and periodic revalidation end subscriptions

amqtt stays a pinned dependency; the methods here override its own, written against 0.12.1
(``check_amqtt_version`` refuses to start on another version). Each override either adapts
amqtt to a part or fixes one of its defects (keepalive, takeover before auth, retained leak,
lost QoS 1, O(all subscriptions) routing). ``broker.serve`` runs one in a process.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from http import HTTPStatus
from typing import Any

import websockets
import websockets.asyncio.server
from amqtt.broker import Broker
from amqtt.contexts import Action, ListenerType
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.events import BrokerEvents
from amqtt.mqtt.connack import SERVER_UNAVAILABLE, ConnackPacket
from amqtt.mqtt.constants import QOS_1
from amqtt.session import Session
from prometheus_client import Counter
from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response

from broker.admission import Admission
from broker.amqtt_compat import ClosingStreamWriter, check_amqtt_version
from broker.delivery import Delivery
from broker.handler import LimitedReader, MqchatProtocolHandler
from broker.limits import BrokerLimits
from broker.membership import MembershipCache
from broker.membership_sync import MembershipSync
from broker.plugins import REFUSAL_KEY, is_service, session_identity
from broker.presence_reports import PresenceReports
from broker.revocation_sweep import RevocationSweep
from broker.routing import SubscriptionIndex, is_wildcard
from broker.websocket import path_of, serve_websocket
from mqchat.errors import AuthError, StorageError
from mqchat.internal_topics import LOGOUT_TOPIC, MEMBERSHIP_TOPIC
from mqchat.protocol import out_topic, presence_topic
from mqchat.tokens import Identity
from storage.presence import PresenceRegistry
from storage.revocations import Revocations

__all__ = ["InboundHook", "MqchatBroker"]

logger = logging.getLogger(__name__)

LOGOUTS = Counter("mqchat_broker_logouts_total", "Device connections closed because the device logged out")
EXPIRED = Counter("mqchat_broker_expired_sessions_total", "Device connections closed because their token expired")
TAKEOVERS = Counter(
    "mqchat_broker_takeovers_total", "Device sessions ended here because the device connected through another node"
)

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
        tls: ssl.SSLContext | None = None,
        ws_path: str = "/mqtt",
        revocations: Revocations | None = None,
        token_grace_s: float = 30.0,
        **kwargs: Any,
    ) -> None:
        check_amqtt_version()
        super().__init__(config, **kwargs)
        self.tls = tls
        self.ws_path = ws_path
        self.revocations = revocations  # the JWT plugin refuses revoked tokens with it
        self.token_grace_s = token_grace_s
        self.limits = limits or BrokerLimits()
        self.inbound_hook = inbound_hook
        self.presence = presence
        self.membership = membership
        self._subscriptions: SubscriptionIndex = SubscriptionIndex()
        self._connections = itertools.count(1)
        # (user, device) -> (connection, client id) of the device sessions served now
        self._device_connections: dict[tuple[str, str], tuple[str, str]] = {}
        self._taken_over: set[str] = set()  # connections whose sessions are dropped when they end
        self._handlers: dict[str, MqchatProtocolHandler] = {}  # connection -> its handler
        if presence is not None:
            presence.on_takeover(self.taken_over)
        self.admission = Admission(limits=self.limits, sessions=self._sessions)
        self.delivery = Delivery(
            limits=self.limits,
            subscriptions=self._subscriptions,
            sessions=self._sessions,
            retained=self._retained_messages,
        )
        self.reports = (
            PresenceReports(presence=presence, delivery=self.delivery, device_topics=device_topics)
            if presence is not None
            else None
        )
        self.membership_sync = MembershipSync(
            authority=self, subscriptions=self._subscriptions, membership=membership, revalidate_s=revalidate_s
        )
        self.revocation_sweep = RevocationSweep(broker=self, interval_s=revalidate_s)
        self._parts = AsyncExitStack()

    async def start(self) -> None:
        await super().start()
        if self.reports is not None:
            await self._parts.enter_async_context(self.reports)
        await self._parts.enter_async_context(self.membership_sync)
        if self.revocations is not None:
            await self._parts.enter_async_context(self.revocation_sweep)

    async def shutdown(self) -> None:
        try:
            await super().shutdown()
        finally:
            await self._parts.aclose()

    async def _create_server_instance(
        self,
        listener_name: str,
        listener_type: ListenerType,
        address: str | None,
        port: int,
        ssl_context: ssl.SSLContext | None,
    ) -> Any:
        """amqtt's listener, with the accept queue of ``limits.listen_backlog`` for TCP (amqtt
        leaves asyncio's default of 100, which a reconnect storm overflows); a WebSocket listener
        serves MQTT on ``ws_path`` only (``broker.websocket``)."""
        if listener_type is ListenerType.WS:
            # Given to the event loop's create_server: a TLS handshake within the connect timeout.
            handshake: dict[str, Any] = {}
            if ssl_context is not None:
                handshake["ssl_handshake_timeout"] = self.limits.connect_timeout_s
            return await websockets.asyncio.server.serve(
                functools.partial(self._websocket_connected, listener_name=listener_name),
                address,
                port,
                ssl=ssl_context,
                subprotocols=[websockets.Subprotocol("mqtt")],
                process_request=self._websocket_request,
                max_size=self.limits.max_packet_bytes + 8,  # a frame holds at most one packet's worth
                max_queue=2,  # frames read ahead of the broker: back-pressure as close as TCP's
                ping_interval=None,  # MQTT's keepalive is enforced by the reader loop
                compression=None,
                backlog=self.limits.listen_backlog,
                **handshake,
            )
        if listener_type is not ListenerType.TCP:
            return await super()._create_server_instance(listener_name, listener_type, address, port, ssl_context)
        return await asyncio.start_server(
            functools.partial(self.stream_connected, listener_name=listener_name),
            address,
            port,
            reuse_address=True,
            ssl=ssl_context,
            ssl_handshake_timeout=self.limits.connect_timeout_s if ssl_context is not None else None,
            backlog=self.limits.listen_backlog,
        )

    def _create_ssl_context(self, listener: Any) -> ssl.SSLContext:
        """Every TLS listener shares the process's context (``mqchat.tls``: TLS 1.2+, reloaded
        in place when the certificate changes)."""
        if self.tls is None:
            raise AMQTTError(f"listener {listener.get('bind')!r} wants TLS but no certificate is configured")
        return self.tls

    def _websocket_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """Refuse a WebSocket handshake on another path (404) or without the "mqtt" subprotocol
        (400), before any MQTT is read."""
        if path_of(request.path) != self.ws_path:
            return connection.respond(HTTPStatus.NOT_FOUND, "MQTT is served on another path\n")
        offered = ",".join(request.headers.get_all("Sec-WebSocket-Protocol"))  # the header may repeat
        if "mqtt" not in (p.strip() for p in offered.split(",")):
            return connection.respond(HTTPStatus.BAD_REQUEST, 'the WebSocket subprotocol must be "mqtt"\n')
        return None

    async def _websocket_connected(self, connection: ServerConnection, listener_name: str) -> None:
        await serve_websocket(
            connection,
            functools.partial(self.stream_connected, listener_name=listener_name),
        )

    def listener_port(self, name: str) -> int | None:
        """The port listener ``name`` is bound to (useful with port 0); None when it is not open."""
        server = self._servers.get(name)
        if server is None:
            return None
        instance = server.instance
        sockets = instance.sockets
        port: int = next(iter(sockets)).getsockname()[1]
        return port

    def taken_over(self, user: str, device: str, connection: str) -> None:
        """The device connected through another node: end its connection here if it is still the
        one serving it, and drop its session even if persistent (nothing more is queued here for
        a device that lives elsewhere now; it catches up from the store)."""
        if self._end_connection(user, device, connection):
            TAKEOVERS.inc()

    def _end_connection(self, user: str, device: str, connection: str) -> bool:
        """End the device's connection if it is still the one serving it, and drop its session
        even if persistent once it has ended. False when it is not served here (any more)."""
        served = self._device_connections.get((user, device))
        handler = self._handlers.get(connection)
        if served is None or served[0] != connection or handler is None:
            return False
        self._taken_over.add(connection)  # the session is dropped once this connection has ended
        handler.abort()  # this connection's own handler (a newer one may hold the client id now)
        return True

    def device_connections(self) -> list[tuple[Identity, str]]:
        """Every device connection served here now: (identity, connection)."""
        served = []
        for connection, client_id in list(self._device_connections.values()):
            found = self._sessions.get(client_id)
            identity = session_identity(found[0]) if found is not None else None
            if identity is not None:
                served.append((identity, connection))
        return served

    async def recheck(self, identity: Identity, connection: str) -> None:
        """Close the connection if its token is revoked now (a logout that raced its CONNECT, or
        whose event never arrived). The store unreachable: left as it is, checked again later."""
        if self.revocations is None:
            return
        try:
            await self.revocations.check(identity)
        except AuthError:
            if self._end_connection(identity.user, identity.device, connection):
                LOGOUTS.inc()
        except StorageError as exc:
            logger.debug("revocation of %s/%s not checked now: %s", identity.user, identity.device, exc)

    def logged_out(self, data: bytes) -> None:
        """A logout (``LOGOUT_TOPIC``), from this node's bridge or relayed from another: the
        revocation is known here at once, and the device's (or every device of the user's)
        connections end now, their sessions dropped; an erased user's retained presence goes."""
        try:
            event = json.loads(data)
            user, device, before = event["user"], event.get("device"), event["before"]
            if not isinstance(user, str) or not (device is None or isinstance(device, str)):
                raise TypeError("user and device are strings")
            if not isinstance(before, int) or isinstance(before, bool):
                raise TypeError("before is a whole number of ms")
        except (ValueError, TypeError, KeyError) as exc:
            logger.warning("ignored a malformed logout event: %s", type(exc).__name__)
            return
        if self.revocations is not None:
            self.revocations.note(user, device, before)
        for (served_user, served_device), (connection, _) in list(self._device_connections.items()):
            wanted = served_user == user and (device is None or served_device == device)
            if wanted and self._end_connection(served_user, served_device, connection):
                LOGOUTS.inc()
        if event.get("erase") is True:
            if self.reports is not None:
                self.reports.forget(user)
            else:
                self.delivery.forget(presence_topic(user))

    def _expire_at(self, identity: Identity, handler: MqchatProtocolHandler) -> asyncio.TimerHandle:
        """Close the connection when its token has expired (plus ``token_grace_s``): an app
        refreshes its token and connects again."""

        def expire() -> None:
            EXPIRED.inc()
            handler.abort()

        delay = max(0.0, identity.expires_at + self.token_grace_s - time.time())
        return asyncio.get_running_loop().call_later(delay, expire)

    def dead_workers(self) -> list[str]:
        reports = self.reports.dead_workers() if self.reports is not None else []
        return [*reports, *self.membership_sync.dead_workers(), *self.revocation_sweep.dead_workers()]

    @property
    def bound_port(self) -> int:
        """The TCP port of the plain MQTT listener (useful with port 0); 0 when it is not open
        (amqtt's "default" listener is then the first TLS one)."""
        default = self.listeners_config.get("default")
        if default is None or default.get("ssl") or default.get("type") != ListenerType.TCP:
            return 0
        return self.listener_port("default") or 0

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
        self.admission.open_connections += 1
        await server.acquire_connection()
        try:
            await self._serve_connection(listener_name, reader, writer, peer[0])
        except (AMQTTError, MQTTError, NoDataError, ConnectionError, OSError) as exc:
            logger.debug("connection from %s ended: %s", peer[0], exc)
        finally:
            server.release_connection()
            self.admission.open_connections -= 1

    async def _serve_connection(self, listener_name: str, reader: Any, writer: Any, address: str) -> None:
        """Admit a connection (see ``broker.admission``), then serve its session."""
        try:
            async with asyncio.timeout(self.limits.connect_timeout_s):
                handler, incoming = await MqchatProtocolHandler.init_from_connect(
                    reader, writer, self.plugins_manager, loop=self._loop
                )
        except Exception as exc:
            logger.debug("no valid CONNECT from %s: %s", address, exc)
            await writer.close()
            return
        if self.admission.refusal(address) is not None:
            await self._refuse(handler, incoming, reader, writer, code=SERVER_UNAVAILABLE)
            return
        # Authenticate the incoming session before anything existing is looked at or changed.
        authenticated = await self._authenticate(incoming, self.listeners_config[listener_name])
        previous = self._sessions.get(incoming.client_id) if incoming.client_id else None
        session = self._resolve_session(incoming) if authenticated else None
        if session is None:
            await self._refuse(handler, incoming, reader, writer, code=incoming.attributes.get(REFUSAL_KEY))
            return
        if previous is not None and previous[0].transitions.is_connected():
            logger.info("client %s connected again; closing its previous connection", session.client_id)
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
        self.admission.fit(session, reader)
        handler.attach(session, reader, writer)
        await self._serve_session(session, handler)

    async def _serve_session(self, session: Session, handler: MqchatProtocolHandler) -> None:
        """CONNACK, then the session's life: queued and retained messages, the message loop, its end."""
        client_id = session.client_id
        assert client_id is not None
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
        self._handlers[connection] = handler
        if identity is not None:
            self._device_connections[(identity.user, identity.device)] = (connection, client_id)
        reports = self.reports if identity is not None else None
        reported = False
        expiry = self._expire_at(identity, handler) if identity is not None else None
        try:
            if identity is not None:
                await self.recheck(identity, connection)  # a logout that raced this CONNECT
                if reports is not None and not self._handler_closing(handler):
                    reports.connected(identity.user, identity.device, connection)
                    reported = True
            await self._publish_session_retained_messages(session)
            for subscription in self._subscriptions.granted(client_id):  # only its own subscriptions
                await self._publish_retained_messages_for_subscription(subscription, session)
            await self._client_message_loop(session, handler)
            if session.transitions.is_connected():
                # amqtt's loop stops on a forbidden PUBLISH (a wildcard or a $ topic) but leaves the
                # connection open and the session connected: end both, as an abnormal disconnect.
                ended: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
                ended.set_result(None)
                await self._handle_disconnect(session, handler, ended)
        finally:
            if expiry is not None:
                expiry.cancel()
            self._handlers.pop(connection, None)
            if connection in self._taken_over:
                self._taken_over.discard(connection)
                current = self._sessions.get(client_id)
                if current is not None and current[0] is session:
                    self._drop_session(session)
            if identity is not None:
                key = (identity.user, identity.device)
                if self._device_connections.get(key, (None,))[0] == connection:
                    del self._device_connections[key]
            if reported and reports is not None and identity is not None:
                reports.disconnected(identity.user, identity.device, connection)

    @staticmethod
    def _handler_closing(handler: MqchatProtocolHandler) -> bool:
        transport = handler._transport()
        return transport is not None and transport.is_closing()

    async def _authenticate(self, session: Session, _listener: Any) -> bool:
        return await Admission.authenticate(self.plugins_manager._auth_plugins, session)

    async def _topic_filtering(self, session: Session, topic: str, action: Any) -> bool:
        """amqtt's rule (every topic plugin says yes; None is no), awaited in turn."""
        if not self.plugins_manager.is_topic_filtering_enabled():
            return True
        for plugin in self.plugins_manager._topic_plugins:
            if not await plugin.topic_filtering(session=session, topic=topic, action=action):
                return False
        return True

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
        """The session an authenticated CONNECT gets (``Admission.resolve``); None to refuse it."""
        resolution = self.admission.resolve(incoming)
        if resolution.dropped is not None:
            self._drop_session(resolution.dropped)
        return resolution.session

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

    # --- retained messages -----------------------------------------------------------------------

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
        if retained is None and self.reports is not None and topic_filter.startswith("p/"):
            if await self.reports.retain_current(topic_filter[2:]):
                return  # sent to every subscriber of the topic, this one included
            retained = self._retained_messages.get(topic_filter)
        handler = self._get_handler(session)
        if retained is not None and retained.data and handler is not None:
            await handler.mqtt_publish(retained.topic, retained.data, min(qos, retained.qos or qos), retain=True)

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

    # --- messages ----------------------------------------------------------------------------

    async def _handle_message_delivery(self, client_session: Session, handler: Any, wait_deliver: Any) -> bool:
        hook = self.inbound_hook
        message = wait_deliver.result()
        if message is not None and message.topic == MEMBERSHIP_TOPIC and is_service(client_session):
            self.membership_sync.changed(bytes(message.data))
            return True
        if message is not None and message.topic == LOGOUT_TOPIC and is_service(client_session):
            self.logged_out(bytes(message.data))
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
        self.delivery.deliver(broadcast["topic"], broadcast["data"], broadcast.get("qos"))

    async def internal_message_broadcast(self, topic: str, data: bytes, qos: int | None = None) -> None:
        """Publishes made inside the broker (the in-broker adapter's replies) are routed at once."""
        if topic == MEMBERSHIP_TOPIC:
            self.membership_sync.changed(bytes(data))
            return
        if topic == LOGOUT_TOPIC:
            self.logged_out(bytes(data))
            return
        self.delivery.deliver(topic, data, qos)

    # --- subscriptions: keep the per-client index; the ACL's authority for MembershipSync -------

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
                await self.membership_sync.recheck([(session, subscription[0])])
        return result

    async def may_subscribe(self, session: Session, topic_filter: str) -> bool:
        return await self._topic_filtering(session, topic_filter, Action.SUBSCRIBE)

    def end_subscription(self, topic_filter: str, session: Session) -> None:
        self._del_subscription(topic_filter, session)

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
