"""`LogProvider`: logs the pushes of a platform without push settings instead of sending them.

It needs none of the push libraries, so it is the embedded default.
"""

from __future__ import annotations

import logging

from push.base import Outcome, PushConfigError, PushMessage, PushProvider, PushResult

log = logging.getLogger(__name__)


class LogProvider(PushProvider):
    """Logs what it would send (never the token, never the text) and reports it delivered."""

    def __init__(self, platform: str, *, level: int = logging.INFO) -> None:
        if platform not in ("apns", "fcm"):
            raise PushConfigError(f"unknown push platform {platform!r}")
        self.platform = platform
        self._level = level

    async def send(self, msg: PushMessage) -> PushResult:
        self._check_platform(msg)
        kind = "content-free" if msg.content_free else "alert" if msg.has_alert else "silent"
        log.log(
            self._level,
            "push (log only) %s %s id=%s collapse=%s priority=%s kind=%s badge=%s data=%s",
            msg.platform,
            msg.token_fingerprint,
            msg.notification_id,
            msg.collapse_id,
            msg.priority,
            kind,
            msg.badge,
            sorted(msg.data),
        )
        return PushResult(Outcome.DELIVERED, "logged", message_id=msg.notification_id)
