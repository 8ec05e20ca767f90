"""A device's push registration: the APNs/FCM token the push dispatcher sends to.

A device registers and removes only its own token (the access token's device). Without a push
store on this server both answer unavailable (503).
"""

from __future__ import annotations

from bridge.refusals import push_store_or_refuse
from mqchat.clock import SYSTEM_CLOCK, Clock
from mqchat.errors import ErrorCode, RequestError
from mqchat.tokens import Identity
from storage.base import DeviceTokens
from storage.records import DeviceToken


class DeviceService:
    """Registers and removes devices' push tokens."""

    def __init__(self, *, tokens: DeviceTokens | None = None, clock: Clock = SYSTEM_CLOCK) -> None:
        self._tokens = tokens
        self._clock = clock

    async def register_push(
        self, who: Identity, device: str, *, platform: str, token: str, topic: str | None, sandbox: bool
    ) -> None:
        if device != who.device:
            raise RequestError(ErrorCode.FORBIDDEN, "register the push token of your own device (the token's device)")
        await push_store_or_refuse(self._tokens).put_token(
            DeviceToken(who.user, device, platform, token, topic, sandbox, self._clock.time_ms())
        )

    async def remove_push(self, who: Identity, device: str) -> None:
        if device != who.device:
            raise RequestError(ErrorCode.FORBIDDEN, "remove the push token of your own device")
        if not await push_store_or_refuse(self._tokens).delete_device_token(who.user, device):
            raise RequestError(ErrorCode.NOT_FOUND, "no push token for this device")
