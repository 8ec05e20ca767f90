"""What an external broker asks before it lets a client connect, publish or subscribe: EMQX 5's
HTTP authentication and authorisation hooks (``bridge.http.hooks`` serves them). The answers are
those of mqchat's own broker: the same access tokens, the same service credential, the same
topic table (``mqchat.topic_table``) with the same store behind its questions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mqchat.errors import AuthError
from mqchat.ids import is_valid_id
from mqchat.tokens import SERVICE_CLIENT_PREFIX, SERVICE_USERNAME, TokenVerifier, is_credential
from mqchat.topic_table import Ask, device_may, service_may_publish, service_may_subscribe
from storage import privacy
from storage.base import Groups, PrivacySettings
from storage.revocations import Revocations


@dataclass(frozen=True, slots=True)
class Admission:
    allowed: bool
    expires_at: int | None = None  # a device's token expiry (unix seconds): the broker ends its session then
    superuser: bool = False  # the bridge: the broker asks nothing more of its publishes and subscribes


class BrokerHooks:
    def __init__(
        self,
        *,
        verifier: TokenVerifier,
        revocations: Revocations,
        hooks_credential: str,
        groups: Groups,
        privacy_settings: PrivacySettings,
    ) -> None:
        self._verifier = verifier
        self._revocations = revocations
        self._credential = hooks_credential
        self._groups = groups
        self._privacy = privacy_settings

    def is_broker(self, credential: str) -> bool:
        """Whether credential is the hooks credential (``mqchat.tokens.hooks_credential``)."""
        return is_credential(credential, self._credential)

    async def authenticate(self, *, username: str, password: str, clientid: str) -> Admission:
        """A device's token names its user (the username) and device (the client id); the
        bridge's own workers present the service credential."""
        if not password.isascii():  # a token, like the service credential, is ASCII
            return Admission(False)
        if username == SERVICE_USERNAME:
            ok = clientid.startswith(SERVICE_CLIENT_PREFIX) and self._verifier.verify_service(password)
            # A bridge worker publishes every event: asking the hook at each would be an HTTP call
            # per delivery, so EMQX is told not to ask (a superuser). authorize() still answers
            # for it (service_may_*) to a broker that asks anyway.
            return Admission(ok, superuser=ok)
        try:
            identity = await self._verifier.verify(password)
        except AuthError:
            return Admission(False)
        if identity.user != username or identity.device != clientid:
            return Admission(False)
        try:
            await self._revocations.check(identity)  # a logged-out device (StorageError: 503, EMQX retries)
        except AuthError:
            return Admission(False)
        return Admission(True, identity.expires_at)

    async def authorize(
        self, *, username: str, clientid: str, topic: str, action: Literal["publish", "subscribe"]
    ) -> bool:
        """Whether an authenticated client may publish to or subscribe to topic."""
        if username == SERVICE_USERNAME:
            return service_may_publish(topic) if action == "publish" else service_may_subscribe(topic)
        if not (is_valid_id(username) and is_valid_id(clientid)):
            return False
        verdict = device_may(action, username, clientid, topic)
        return verdict if isinstance(verdict, bool) else await self._ask(username, verdict)

    async def _ask(self, user: str, ask: Ask) -> bool:
        if ask.question == "presence":
            return await privacy.sees_presence(user, ask.subject, groups=self._groups, privacy=self._privacy)
        standing = await self._groups.membership(conv=ask.subject, user=user)
        return standing is not None and standing.member is not None
