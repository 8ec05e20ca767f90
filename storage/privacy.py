"""Consent rules, over a backend's ``Groups`` and ``PrivacySettings``: who sees a user's
presence, who may add a user to a group or channel. One place for both, used by the broker's
ACL (through its membership cache) and by the HTTP API."""

from __future__ import annotations

from collections.abc import Sequence

from storage.base import Groups, PrivacySettings
from storage.records import DEFAULT_SETTINGS, UserSettings


async def sees_presence(viewer: str, target: str, *, groups: Groups, privacy: PrivacySettings) -> bool:
    """viewer may see target online: themselves, or a user sharing a conversation with target
    unless target hides their presence from everyone."""
    if viewer == target:
        return True
    settings = (await privacy.user_settings([target])).get(target, DEFAULT_SETTINGS)
    return settings.presence != "nobody" and await groups.shares_conversation(viewer, target)


async def refusing_to_be_added(
    adder: str, users: Sequence[str], *, groups: Groups, privacy: PrivacySettings, default: UserSettings
) -> list[str]:
    """Those of users who do not let adder put them in a group or channel: ``nobody``, or
    ``contacts`` and adder shares no conversation with them. adder may always add themselves."""
    others = [u for u in dict.fromkeys(users) if u != adder]
    saved = await privacy.user_settings(others)
    refusing = []
    for user in others:
        rule = saved.get(user, default).who_may_add
        if rule == "nobody" or (rule == "contacts" and not await groups.shares_conversation(adder, user)):
            refusing.append(user)
    return refusing
