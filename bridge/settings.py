"""A user's settings: their privacy (who may add them, who sees them online) and, per
conversation, mute (theirs) and end-to-end encryption (the conversation's, set by a member of
a 1:1 conversation or a group's admin).

A change of the presence setting reaches the broker (``MEMBERSHIP_TOPIC``, kind ``settings``)
after it is stored, so the broker's ACL checks every presence subscription to that user again.
"""

from __future__ import annotations

from dataclasses import dataclass

from bridge.groups import BrokerLink, group_member, membership_change
from bridge.history import require_member
from bridge.refusals import parse_conversation, push_store_or_refuse
from mqchat.errors import ErrorCode, RequestError
from storage.base import Groups, PrivacySettings, PushSettings
from storage.records import DEFAULT_SETTINGS, UserSettings


@dataclass(frozen=True, slots=True)
class ConversationSettings:
    conv: str
    muted: bool
    e2e: bool


class SettingsService:
    """Reads and changes a user's privacy settings and their conversations' settings."""

    def __init__(
        self,
        *,
        groups: Groups,
        privacy: PrivacySettings,
        broker: BrokerLink,
        push_settings: PushSettings | None = None,
        default_settings: UserSettings = DEFAULT_SETTINGS,
    ) -> None:
        self._groups = groups
        self._privacy = privacy
        self._broker = broker
        self._push_settings = push_settings
        self._default_settings = default_settings

    async def privacy(self, user: str) -> UserSettings:
        return (await self._privacy.user_settings([user])).get(user, self._default_settings)

    async def set_privacy(self, user: str, *, who_may_add: str | None, presence: str | None) -> UserSettings:
        """Change the given settings (None: keep), and tell the broker when presence changed."""
        current = await self.privacy(user)
        settings = UserSettings(who_may_add=who_may_add or current.who_may_add, presence=presence or current.presence)
        if settings.presence != current.presence:
            self._broker.require()
        await self._privacy.set_user_settings(user, settings)
        if settings.presence != current.presence:
            # The broker's ACL forgets its answers about this user and checks every presence
            # subscription to them again (a hidden user's followers stop hearing of them at once).
            await self._broker.publish([membership_change("", "settings", removed=[user])])
        return settings

    async def set_conversation(
        self, user: str, conv: str, *, muted: bool | None, e2e: bool | None
    ) -> ConversationSettings:
        """Mute conv for user and/or mark it end-to-end encrypted (None: keep); members only."""
        parsed = parse_conversation(conv)
        pushes = push_store_or_refuse(self._push_settings)
        if parsed.kind == "group":
            member = await group_member(self._groups, parsed.id, user)
            if e2e is not None and member.role != "admin":
                raise RequestError(ErrorCode.FORBIDDEN, "only the group's admins may change its encryption flag")
        else:
            await require_member(self._groups, user, parsed)
        if muted is not None:
            await pushes.set_muted(user, parsed.id, muted)
        if e2e is not None:
            await pushes.set_e2e(parsed.id, e2e)
        muted_now, e2e_now = await pushes.settings(user, parsed.id)
        return ConversationSettings(parsed.id, muted_now, e2e_now)
