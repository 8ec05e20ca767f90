"""amqtt 0.12 plugins: JWT authentication, the topic ACL of wire protocol v1, metrics."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from amqtt.contexts import Action
from amqtt.mqtt.connack import SERVER_UNAVAILABLE
from amqtt.plugins.base import BaseAuthPlugin, BasePlugin, BaseTopicPlugin
from amqtt.session import Session
from prometheus_client import Counter, Gauge

from broker.membership import MembershipCache
from mqchat.errors import AuthError, ErrorCode, StorageError
from mqchat.protocol import (
    device_in_topic,
    encode,
    error_envelope,
    out_topic,
)
from mqchat.tokens import SERVICE_CLIENT_PREFIX, SERVICE_USERNAME, Identity, TokenVerifier
from mqchat.topic_table import Ask, device_may, service_may_publish, service_may_subscribe
from storage.revocations import Revocations

logger = logging.getLogger(__name__)

IDENTITY_KEY = "mqchat.identity"
REFUSAL_KEY = "mqchat.refusal"  # the CONNACK code of a refusal other than "not authorised"
SERVICE_KEY = "mqchat.service"

CONNECTED_CLIENTS = Gauge(
    "mqchat_broker_connected_clients", "MQTT clients connected to the broker", multiprocess_mode="livesum"
)
CONNECTS_REFUSED = Counter("mqchat_broker_connects_refused_total", "CONNECTs refused", ["reason"])
ACL_DENIED = Counter("mqchat_broker_acl_denied_total", "Publishes and subscribes refused by the ACL", ["action"])


def session_identity(session: Session | None) -> Identity | None:
    if session is None:
        return None
    identity = session.attributes.get(IDENTITY_KEY)
    return identity if isinstance(identity, Identity) else None


def is_service(session: Session | None) -> bool:
    return session is not None and session.attributes.get(SERVICE_KEY) is True


def _short(value: object) -> str:
    return repr(value)[:80]


class JwtAuthPlugin(BaseAuthPlugin):
    """CONNECT: username = ``sub``, client id = ``dev``, password = a valid JWT; or the service.
    Tokens are checked by ``Config.verifier`` (built and started by whoever runs the broker:
    ``broker.serve.serve_broker``), else by an HS256 verifier of ``Config.secret``."""

    @dataclass
    class Config:
        secret: str = ""
        verifier: TokenVerifier | None = None

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self._verifier = self.config.verifier or TokenVerifier(secret=self.config.secret)

    async def authenticate(self, *, session: Session) -> bool | None:
        # MqchatBroker calls this with the incoming session, before any existing one is touched.
        username, client_id = session.username, session.client_id
        if username == SERVICE_USERNAME:
            if (
                isinstance(client_id, str)
                and client_id.startswith(SERVICE_CLIENT_PREFIX)
                and self._verifier.verify_service(session.password)
            ):
                session.attributes[SERVICE_KEY] = True
                return True
            return self._refuse("service_credential", "a service connect with a wrong credential", client_id)
        if not isinstance(session.password, str) or not session.password:
            return self._refuse("no_token", "connect without a token", client_id)
        try:
            identity = await self._verifier.verify(session.password)
        except AuthError as exc:
            return self._refuse("bad_token", str(exc), client_id)
        if identity.user != username or identity.device != client_id:
            return self._refuse(
                "mismatch", f"token is for another user or device (username {_short(username)})", client_id
            )
        if session.will_flag and session.will_topic != out_topic(identity.user, identity.device):
            # amqtt publishes a will without consulting the ACL: refuse what the device may not publish.
            return self._refuse("will_topic", "will on a topic the device may not publish", client_id)
        broker = getattr(self.context, "_broker_instance", None)
        grace = getattr(broker, "token_grace_s", 0.0)
        if identity.expires_at + grace <= time.time():  # within the leeway, but it would be closed at once
            return self._refuse("bad_token", "token expired", client_id)
        revocations = getattr(broker, "revocations", None)
        if isinstance(revocations, Revocations):
            try:
                await revocations.check(identity)  # a token of a logged-out device
            except AuthError as exc:
                return self._refuse("revoked", str(exc), client_id)
            except StorageError:  # cannot tell now: "server unavailable", so the app retries, token kept
                session.attributes[REFUSAL_KEY] = SERVER_UNAVAILABLE
                return self._refuse("store_unavailable", "the revocation list cannot be read", client_id)
        session.attributes[IDENTITY_KEY] = identity
        return True

    @staticmethod
    def _refuse(reason: str, why: str, client_id: object) -> bool:
        CONNECTS_REFUSED.labels(reason=reason).inc()
        logger.info("refused connect (client %s): %s", _short(client_id), why)
        return False


class TopicAclPlugin(BaseTopicPlugin):
    """The topic table of wire protocol v1 (``mqchat.topic_table``), enforced. A refused
    publish is dropped and answered with an ``error`` envelope (code ``forbidden``) on the
    device's own in topic; a refused subscribe gets SUBACK 0x80.

    Membership answers come from the broker's ``MembershipCache`` (``MqchatBroker.membership``;
    without one, presence and channel subscriptions are refused).
    """

    @dataclass
    class Config:
        pass

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: Action | None = None
    ) -> bool | None:
        if topic is None or action is None:
            return False
        if action == Action.RECEIVE:
            return True  # what a session may receive was decided when it subscribed
        if is_service(session):
            if action == Action.PUBLISH:
                return service_may_publish(topic)
            return service_may_subscribe(topic)
        identity = session_identity(session)
        if identity is None:
            return False
        verdict = device_may(
            "publish" if action == Action.PUBLISH else "subscribe", identity.user, identity.device, topic
        )
        allowed = verdict if isinstance(verdict, bool) else await self._ask(identity, verdict)
        if not allowed:
            ACL_DENIED.labels(action=str(action)).inc()
            logger.info("ACL refused %s on %s for %s/%s", action, _short(topic), identity.user, identity.device)
            if action == Action.PUBLISH:
                await self.context.broadcast_message(
                    device_in_topic(identity.user, identity.device),
                    encode(error_envelope(ErrorCode.FORBIDDEN, f"you may not publish to {topic[:128]}")),
                    qos=1,
                )
        return allowed

    async def _ask(self, identity: Identity, ask: Ask) -> bool:
        # amqtt gives each plugin a copy of the broker's context, made before MqchatBroker's own
        # __init__ finishes; the broker itself is reachable from it.
        membership = getattr(getattr(self.context, "_broker_instance", None), "membership", None)
        if not isinstance(membership, MembershipCache):
            return False
        if ask.question == "presence":
            return await membership.sees_presence(identity.user, ask.subject)
        return await membership.is_member(ask.subject, identity.user)


class MetricsPlugin(BasePlugin[Any]):
    """Counts connected clients for Prometheus."""

    async def on_broker_client_connected(self, *, client_id: str, client_session: Session) -> None:
        CONNECTED_CLIENTS.inc()

    async def on_broker_client_disconnected(self, *, client_id: str, client_session: Session) -> None:
        CONNECTED_CLIENTS.dec()
