"""A user's settings: their privacy (who may add them, who sees them online) and, per
conversation, mute (theirs) and end-to-end encryption (the conversation's, set by a member of
a 1:1 conversation or a group's admin).

A change of the presence setting reaches the broker (``MEMBERSHIP_TOPIC``, kind ``settings``)
after it is stored, so the broker's ACL checks every presence subscription to that user again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

from bridge.groups import BrokerLink, Groups, membership_change
from bridge.history import require_member
from mqchat.errors import ErrorCode, RequestError
from mqchat.ids import parse_conv
from storage.base import DEFAULT_SETTINGS, DeviceTokens, MessageStore, PushSettings, UserSettings

_Push = TypeVar("_Push", DeviceTokens, PushSettings)


@dataclass(frozen=True, slots=True)
class ConversationSettings:
    conv: str
    muted: bool
    e2e: bool


def push_store_or_refuse(push_store: _Push | None) -> _Push:
    """The push store, or unavailable (503) on a server without push."""
    if push_store is None:
        raise RequestError(ErrorCode.UNAVAILABLE, "push is not available on this server")
    return push_store


class Settings:
    """Reads and changes a user's privacy settings and their conversations' settings."""

    def __init__(
        self,
        *,
        store: MessageStore,
        groups: Groups,
        broker: BrokerLink,
        push_store: PushSettings | None = None,
        default_settings: UserSettings = DEFAULT_SETTINGS,
    ) -> None:
        self._store = store
        self._groups = groups
        self._broker = broker
        self._push_store = push_store
        self._default_settings = default_settings

    async def privacy(self, user: str) -> UserSettings:
        return (await self._store.user_settings([user])).get(user, self._default_settings)

    async def set_privacy(self, user: str, *, who_may_add: str | None, presence: str | None) -> UserSettings:
        """Change the given settings (None: keep), and tell the broker when presence changed."""
        current = await self.privacy(user)
        settings = UserSettings(who_may_add=who_may_add or current.who_may_add, presence=presence or current.presence)
        if settings.presence != current.presence:
            self._broker.require()
        await self._store.set_user_settings(user, settings)
        if settings.presence != current.presence:
            # The broker's ACL forgets its answers about this user and checks every presence
            # subscription to them again (a hidden user's followers stop hearing of them at once).
            await self._broker.publish([membership_change("", "settings", removed=[user])])
        return settings

    async def set_conversation(
        self, user: str, conv: str, *, muted: bool | None, e2e: bool | None
    ) -> ConversationSettings:
        """Mute conv for user and/or mark it end-to-end encrypted (None: keep); members only."""
        parsed = parse_conv(conv)
        if parsed is None:
            raise RequestError(ErrorCode.BAD_CONV, "not a conversation id")
        pushes = push_store_or_refuse(self._push_store)
        if parsed.kind == "group":
            member = await self._groups.membership(conv, user)
            if e2e is not None and member.role != "admin":
                raise RequestError(ErrorCode.FORBIDDEN, "only the group's admins may change its encryption flag")
        else:
            await require_member(self._store, user, parsed)
        if muted is not None:
            await pushes.set_muted(user, parsed.id, muted)
        if e2e is not None:
            await pushes.set_e2e(parsed.id, e2e)
        muted_now, e2e_now = await pushes.settings(user, parsed.id)
        return ConversationSettings(parsed.id, muted_now, e2e_now)
